"""Making yes/no answers depend on the image where the data has no boxes: the changing-prior
re-split (--split cp), the attribute-prior trap and the verification questions."""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

import pytest

import convert_slake_dataset
from dataset.contract import answer_of, is_derived, question_of, read_jsonl
from dataset.demo import REGIONS, VERIFY_TEMPLATES, sample_params, verify_questions
from dataset.resplit import QA, changing_prior_split, prior_conflicting, text_key
from dataset.slake import convert, read_release, verification_questions
from evaluation.metrics import baselines
from tests.test_convert import needs_slake, release_copy


def _closed_prior(rows_train, rows_test) -> float:
    b = baselines([{"question": question_of(r), "answer": answer_of(r), "answer_type": r["answer_type"]}
                   for r in rows_train if not is_derived(r)],
                  [{"question": question_of(r), "answer": answer_of(r), "answer_type": r["answer_type"],
                    "content_type": None, "modality": None} for r in rows_test])
    return b["majority_per_question"]["closed_accuracy"]


@pytest.fixture(scope="module")
def real_cp(tmp_path_factory):
    src = release_copy(tmp_path_factory.mktemp("slake_cp"))
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 3)):
        out = tmp_path_factory.mktemp(f"cp_{name}")
        outs[name] = (out, convert(read_release(src), out, split="cp", seed=seed, priors=baselines))
    return outs


@needs_slake
def test_cp_split_real_slake_images_one_side_and_prior_moved(real_cp):
    out, m = real_cp["a"]
    assert m["images"] == {"train": 450, "validation": 96, "test": 96}  # the release's image counts
    assert m["image_overlap"] == {"train&validation": 0, "train&test": 0, "validation&test": 0}
    rows = {s: read_jsonl(out / f"medical_vqa_{s}.jsonl") for s in ("train", "validation", "test")}
    images = {s: {r["image"] for r in rs} for s, rs in rows.items()}
    assert not images["train"] & images["test"] and not images["validation"] & images["test"]
    # the text prior scores 0 on the test split's closed questions (67 % on the release split)
    assert m["split"]["kind"] == "cp" and m["split"]["closed_prior_test_before"] > 0.6
    # far below 50 % (not 0: texts seen once, or only in test, fall back to the answer type's majority)
    assert m["split"]["closed_prior_test_after"] < 0.3
    assert _closed_prior(rows["train"], rows["test"]) == pytest.approx(m["split"]["closed_prior_test_after"])
    assert m["split"]["texts_moved"] > 0.5 * m["split"]["texts_movable"]
    closed_test = [r for r in rows["test"] if r["answer_type"] == "CLOSED"]
    assert len(closed_test) >= 100  # enough questions left to measure on
    # validation follows the training distribution (model selection never sees the shift)
    assert _closed_prior(rows["train"], rows["validation"]) > 0.6


@needs_slake
def test_cp_split_deterministic_in_seed(real_cp):
    files = lambda out: {s: (out / f"medical_vqa_{s}.jsonl").read_text() for s in ("train", "validation", "test")}
    assert files(real_cp["a"][0]) == files(real_cp["b"][0])
    assert files(real_cp["a"][0])["test"] != files(real_cp["c"][0])["test"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_changing_prior_split_synthetic(seed):
    """Random texts with a usual answer: the test side's usual answer flips for some texts (whole
    images move, each with one question per text), the counts are kept, and the kept test
    questions never carry their text's usual training answer."""
    rng = random.Random(seed)
    qas = []
    for i in range(120):
        for t in range(4):
            usual = "yes" if t % 2 else "no"
            a = usual if rng.random() < 0.8 else ("no" if usual == "yes" else "yes")
            qas.append(QA(f"img{i}", f"Question {t}?", a))
    cp = changing_prior_split(qas, 10, 20, seed)
    assert Counter(cp.split_of.values()) == {"train": 90, "validation": 10, "test": 20}
    assert cp.texts_movable == 4 and cp.texts_moved >= 2
    train = [q for q in qas if cp.split_of[q.image] == "train"]
    test = [q for q in qas if cp.split_of[q.image] == "test"]
    keep = prior_conflicting(train, test)
    usual = {t: Counter(q.answer for q in train if text_key(q.question) == t).most_common(1)[0][0]
             for t in {text_key(q.question) for q in qas}}
    kept = [q for q, k in zip(test, keep) if k]
    assert kept and all(q.answer != usual[text_key(q.question)] for q in kept)
    assert all(q.answer == usual[text_key(q.question)] for q, k in zip(test, keep) if not k)


def test_changing_prior_split_refuses_too_few_images():
    with pytest.raises(ValueError, match="training images"):
        changing_prior_split([QA("a", "q?", "yes"), QA("b", "q?", "no")], 1, 1)


@pytest.mark.parametrize("kind", ["easy-prior", "attribute-prior", "shifted-prior"])
def test_cp_split_demo_sets(tmp_path, kind, capsys):
    out = tmp_path / kind
    assert convert_slake_dataset.main(["--demo", kind, "--split", "cp", "--out_dir", str(out),
                                       "--demo_images", "60", "10", "15"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    after = m["split"]["closed_prior_test_after"]
    assert after < 0.45 and m["split"]["closed_prior_test_before"] > 0.6
    assert m["baselines_test"]["majority_per_question"]["closed_accuracy"] == pytest.approx(after)
    assert m["images"] == {"train": 60, "validation": 10, "test": 15}


def test_shifted_prior_trap_moves_the_anatomy_and_keeps_the_answers():
    """--demo shifted-prior: each image's drawing moves (up to SHIFT_MAX pixels) and changes size,
    so the organ is not at fixed pixels; its boxes follow the drawing; every lesion stays on the
    side its answer names (the extremes of shift and zoom included); with no shift the image is
    the easy set's, pixel for pixel."""
    import numpy as np
    from dataset.demo import SHIFT_MAX, SIZE, ZOOM, boxes, draw, sample_shifted_params
    rng = random.Random(0)
    organ_x, organ_y = [], []
    for i in range(400):
        p = sample_shifted_params(rng)
        if i % 4 == 0:  # the extremes
            p = dict(p, shift=[rng.choice([-SHIFT_MAX, SHIFT_MAX]), rng.choice([-SHIFT_MAX, SHIFT_MAX])],
                     zoom=rng.choice(ZOOM))
        (x, y, w, h), = boxes(p)[0].values()
        organ_x.append(x + w / 2)
        organ_y.append(y + h / 2)
        for b in boxes(p):
            x, _, w, _ = b.get("Lesion", [0, 0, SIZE, 0])
            assert "Lesion" not in b or (x + w / 2 < SIZE / 2) == (p["side"] == "Left"), p
    assert np.std(organ_x) > 8 and np.std(organ_y) > 8  # more than half a 14-pixel patch
    p = sample_shifted_params(random.Random(5))
    p["lesions"], p["side"], p["size"] = 2, "Left", "Large"
    img = np.asarray(draw(p), dtype=np.float32)
    for b in [b for b in boxes(p) if "Lesion" in b]:  # the speckled lesion is inside its box: high contrast
        x, y, w, h = b["Lesion"]
        inner = img[int(y + h / 3):int(y + 2 * h / 3), int(x + w / 3):int(x + 2 * w / 3)]
        assert inner.std() > 60, b
    still = {k: v for k, v in p.items() if k not in ("shift", "zoom")}
    assert np.array_equal(np.asarray(draw(dict(still, shift=[0, 0], zoom=1.0))), np.asarray(draw(still)))
    assert boxes(still) == [{k: [round(c) for c in v]} for b in boxes(dict(still, shift=[0, 0], zoom=1.0))
                            for k, v in b.items()]


def test_attribute_prior_trap_structure():
    """Every closed text names an attribute an open question asks about (or a lesion), some are
    negated, each text has its own usual answer (Yes for some texts, No for others) and the
    answers follow from the drawing."""
    rng = random.Random(0)
    by_text = defaultdict(Counter)
    for _ in range(600):
        p = sample_params(rng)
        for q in verify_questions(p, rng):
            if q["answer_type"] != "CLOSED":
                continue
            by_text[q["question"]][q["answer"]] += 1
            text = q["question"].lower()
            negated = " not " in text or text.startswith("is no ")
            if "lesion" in text and ("side" in text or "large" in text or "small" in text):
                assert p["lesions"]
                named = "left" if "left" in text else "right" if "right" in text else \
                    "large" if "large" in text else "small"
                truth = (p["side"] if "side" in text else p["size"]).lower()
                holds = named == truth
            elif "lesion" in text:
                holds = p["lesions"] > 0
            elif any(m.lower() in text for m in ("CT", "MRI", "X-Ray")):
                holds = p["modality"].lower() in text.split()[-2].lower() or \
                    f" {p['modality'].lower()}" in text.replace("?", " ")
            else:
                holds = REGIONS[p["region"]][1].lower() in text
            assert (q["answer"] == "Yes") == (holds != negated), q
    usual = {t: c.most_common(1)[0][0] for t, c in by_text.items()}
    assert set(usual.values()) == {"Yes", "No"}
    total = sum(sum(c.values()) for c in by_text.values())
    share = sum(max(c.values()) for c in by_text.values()) / total
    assert 0.7 < share < 0.9  # a strong per-text prior, as in easy-prior and real SLAKE (74 %)
    negated_texts = [t for t in by_text if " not " in t.lower() or t.lower().startswith("is no ")]
    assert len(negated_texts) >= 8
    assert len(VERIFY_TEMPLATES) == 5


def test_verification_questions_balanced_per_text():
    per_image = {f"img{i}": [("What modality is used?", ["CT", "MRI", "X-Ray"][i % 3], "OPEN"),
                             ("Is it normal?", "Yes", "CLOSED"), ("Where is the lesion?", ["Left", "Right"][i % 2], "OPEN")]
                 for i in range(30)}
    out = verification_questions(per_image, seed=1)
    assert set(out) == set(per_image)
    by_text = defaultdict(Counter)
    for key, qas in out.items():
        assert len(qas) == 4  # one Yes and one No per open question, none from the closed one
        for q, a in qas:
            by_text[q.rsplit(" Is it ", 1)[0]][a] += 1
            named = q.rsplit(" Is it ", 1)[1].rstrip("?")
            truth = dict((oq, oa) for oq, oa, _ in per_image[key])[q.rsplit(" Is it ", 1)[0]]
            assert (a == "Yes") == (named == truth)
    for c in by_text.values():
        assert c["Yes"] == c["No"]  # the text alone predicts nothing
    assert verification_questions(per_image, seed=1) == out


@pytest.mark.parametrize("mode, in_train", [("none", 0), ("stage1", 0), ("both", 1)])
def test_converter_verification_questions(tmp_path, mode, in_train):
    out = tmp_path / mode
    assert convert_slake_dataset.main(["--demo", "easy-prior", "--out_dir", str(out), "--demo_images", "20", "4", "4",
                                       "--verify_questions", mode]) == 0
    m = json.loads((out / "manifest.json").read_text())
    pre = read_jsonl(out / "medical_pretrain.jsonl")
    train = read_jsonl(out / "medical_vqa_train.jsonl", require_vqa=True)  # what stage 2 reads: no DataError
    verify_pre = [r for r in pre if r.get("source") == "verify"]
    verify_train = [r for r in train if r.get("source") == "verify"]
    assert len(verify_pre) == m["pretrain_verify_questions"] == (0 if mode == "none" else len(verify_pre))
    assert (mode == "none") == (not verify_pre)
    assert len(verify_train) == in_train * len(verify_pre) == m["train_verify_questions"]
    answers = Counter(answer_of(r) for r in verify_pre)
    assert answers["Yes"] == answers["No"]
    test = read_jsonl(out / "medical_vqa_test.jsonl")
    assert not any(r.get("source") == "verify" for r in test)  # never in validation or test
    train_images = {r["image"] for r in train if r.get("source") != "verify"}
    assert {r["image"] for r in verify_pre} <= train_images


@pytest.mark.parametrize("demo, also", [("easy-prior", []), ("hard", []), ("easy", ["--lang", "all"])])
def test_stage_one_trains_on_every_training_question(tmp_path, demo, also):
    """Stage 1 holds each training question once (open and closed, every language), with its
    qid and answer type, and no validation or test question or image."""
    out = tmp_path / demo
    assert convert_slake_dataset.main(["--demo", demo, "--out_dir", str(out), "--demo_images", "12", "3", "3",
                                       *also]) == 0
    m = json.loads((out / "manifest.json").read_text())
    pre = read_jsonl(out / "medical_pretrain.jsonl")
    own = [r for r in read_jsonl(out / "medical_vqa_train.jsonl") if not is_derived(r)]
    asked = [r for r in pre if "qid" in r]
    key = lambda r: (r["qid"], r["image"], r["answer_type"], question_of(r), answer_of(r))
    assert sorted(map(key, asked)) == sorted(map(key, own)) and len(asked) == m["pretrain_train_questions"] > 0
    assert {r["answer_type"] for r in asked} == {"OPEN", "CLOSED"}
    held_out = read_jsonl(out / "medical_vqa_validation.jsonl") + read_jsonl(out / "medical_vqa_test.jsonl")
    assert not {r["image"] for r in pre} & {r["image"] for r in held_out}
    assert not {r["qid"] for r in asked} & {r["qid"] for r in held_out}


def test_verification_questions_are_the_default_in_one_place():
    """The converter's flag default mirrors the library's (kept apart so --help imports nothing)."""
    from dataset.slake import VERIFY_DEFAULT, BuildOptions
    assert convert_slake_dataset.VERIFY_DEFAULT == VERIFY_DEFAULT == BuildOptions().verify_qa == "both"
    assert convert_slake_dataset.parse_args([]).verify_questions == VERIFY_DEFAULT
    from dataset.slake import IMPLIED_DEFAULT
    assert convert_slake_dataset.IMPLIED_DEFAULT == IMPLIED_DEFAULT == BuildOptions().implied_qa == "both"
    assert convert_slake_dataset.parse_args([]).implied_questions == IMPLIED_DEFAULT


def test_answer_priors_leave_the_derived_questions_out(tmp_path):
    """The baselines a model is compared with come from the source's own training questions: the
    converter's verification questions (balanced by construction) are trained on, not counted."""
    from dataset.contract import read_answers
    out = tmp_path / "d"
    assert convert_slake_dataset.main(["--demo", "easy-prior", "--out_dir", str(out), "--demo_images", "12", "2", "2",
                                       "--verify_questions", "both"]) == 0
    rows = read_jsonl(out / "medical_vqa_train.jsonl", require_vqa=True)
    own = [r for r in rows if not is_derived(r)]
    assert len(own) < len(rows) and len(read_answers(out / "medical_vqa_train.jsonl")) == len(own)
    assert not any(" Is it " in r["question"] for r in read_answers(out / "medical_vqa_train.jsonl"))
