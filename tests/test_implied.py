"""Closed questions implied by the open answers of the same image (dataset/implied.py)."""
import json
import random
from collections import Counter

import pytest

import convert_slake_dataset
from dataset.contract import answer_of, question_of, read_answers, read_jsonl
from dataset.demo import REGIONS, VERIFY_TEMPLATES
from dataset.implied import MIN_SUPPORT, find_implications, implied_questions
from dataset.resplit import text_key

# (open question, closed question, closed answer when the open answer is "Left") in several
# phrasings, negated or not, in two languages: the rule is found from the data, never from words
PHRASINGS = [
    ("Where is the lesion located?", "Is the lesion on the left side?", "Yes"),
    ("Where is the lesion located?", "Is the lesion not on the left side?", "No"),
    ("Where is the lesion located?", "Is the lesion on the right side?", "No"),
    ("Which side is the nodule on?", "Is no lesion present on the left?", "No"),
    ("病灶在哪一侧?", "病灶在左侧吗?", "是的"),
    ("病灶在哪一侧?", "病灶不在左侧吗?", "不是"),
]


def _flip(answer: str) -> str:
    return {"Yes": "No", "No": "Yes", "是的": "不是", "不是": "是的"}[answer]


def _images(open_q, closed_q, left_answer, n=40, asked_share=0.25, seed=0):
    """n images, each asked the open question (Left or Right, even); a quarter also asked the
    closed one, with the answer its side implies. Returns (per_image, truth: image -> closed answer)."""
    rng = random.Random(seed)
    per_image, truth = {}, {}
    for i in range(n):
        side = "Left" if i % 2 else "Right"
        answer = left_answer if side == "Left" else _flip(left_answer)
        qas = [(open_q, side, "OPEN"), ("What modality is this?", "CT", "OPEN")]
        if rng.random() < asked_share or i < 2 * MIN_SUPPORT:  # enough asked on each side
            qas.append((closed_q, answer, "CLOSED"))
        per_image[f"img{i}"], truth[f"img{i}"] = qas, answer
    return per_image, truth


@pytest.mark.parametrize("open_q,closed_q,left_answer", PHRASINGS)
def test_implications_are_read_from_the_data_in_any_phrasing(open_q, closed_q, left_answer):
    per_image, _ = _images(open_q, closed_q, left_answer)
    rules = find_implications(per_image)
    assert [(r.open_key, r.closed_key) for r in rules] == [(text_key(open_q), text_key(closed_q))]
    assert rules[0].implied("Left") == left_answer and rules[0].implied("Right") == _flip(left_answer)
    assert rules[0].implied("Top") is None


@pytest.mark.parametrize("open_q,closed_q,left_answer", PHRASINGS)
def test_implied_answers_are_right_and_even_out_the_text(open_q, closed_q, left_answer):
    per_image, truth = _images(open_q, closed_q, left_answer)
    # skew the text: the asked images mostly get the usual answer, as a text prior does
    for key, qas in per_image.items():
        if qas[-1][0] == closed_q and qas[-1][1] != left_answer and int(key[3:]) >= 2 * MIN_SUPPORT:
            per_image[key] = qas[:-1]
    before = Counter(a for qas in per_image.values() for q, a, t in qas if q == closed_q)
    assert before[left_answer] > before[_flip(left_answer)]
    added = implied_questions(per_image, seed=3)
    new = [(key, q, a) for key, qas in added.items() for q, a in qas]
    assert new and all(q == closed_q and a == truth[key] for key, q, a in new)  # right, by the image
    assert all(a == _flip(left_answer) for _, _, a in new)  # only the answer the text lacks
    assert not {key for key, _, _ in new} & {k for k, qas in per_image.items() if any(q == closed_q for q, _, _ in qas)}
    after = before + Counter(a for _, _, a in new)
    assert after[_flip(left_answer)] == after[left_answer]  # even, never past (the images allow it here)
    assert implied_questions(per_image, seed=3) == added  # seeded
    assert Counter(a for qas in implied_questions(per_image, seed=4).values() for _, a in qas) == \
        Counter(a for _, _, a in new)


def test_one_counter_example_or_thin_support_finds_nothing():
    per_image, _ = _images(*PHRASINGS[0])
    asked = [k for k, qas in per_image.items() if qas[-1][2] == "CLOSED"]
    broken = {k: list(qas) for k, qas in per_image.items()}
    q, a, t = broken[asked[0]][-1]
    broken[asked[0]][-1] = (q, _flip(a), t)  # one image contradicts the rule
    assert find_implications(broken) == [] and implied_questions(broken) == {}
    # fewer than MIN_SUPPORT images behind one open answer: that answer implies nothing,
    # and with a single trusted answer the rule would say no more than the text
    thin = {k: qas for k, qas in per_image.items()
            if qas[-1][2] != "CLOSED" or qas[0][1] == "Left" or k in asked[:2 * MIN_SUPPORT]}
    rights = [k for k in thin if thin[k][-1][2] == "CLOSED" and thin[k][0][1] == "Right"]
    for k in rights[MIN_SUPPORT - 1:]:
        thin[k] = thin[k][:-1]
    assert find_implications(thin) == []


def test_a_closed_text_the_open_answer_does_not_decide_is_not_implied():
    """"What modality is this?" is CT on every image: it cannot imply the side question."""
    per_image, _ = _images(*PHRASINGS[0])
    rules = find_implications(per_image)
    assert all(r.open_key != text_key("What modality is this?") for r in rules)


def test_disagreeing_implications_add_nothing_on_that_image():
    per_image = {}
    for i in range(12):
        a, b = ("L", "X") if i % 2 else ("R", "Y")
        qas = [("Side?", a, "OPEN"), ("Kind?", b, "OPEN")]
        if i < 8:
            qas.append(("Left?", "Yes" if a == "L" else "No", "CLOSED"))
        per_image[f"i{i}"] = qas
    per_image["i8"] = [("Side?", "L", "OPEN"), ("Kind?", "Y", "OPEN")]  # the two rules disagree here
    assert {r.open_key for r in find_implications(per_image)} == {"side?", "kind?"}
    assert "i8" not in implied_questions(per_image)


def _truth(params: dict, text: str) -> str:
    """The demo generator's own answer to one of its closed texts on an image (dataset/demo.py)."""
    n, region = params["lesions"], REGIONS[params["region"]]
    truth = {"modality": params["modality"], "part": region[1].lower(), "side": (params["side"] or "").lower(),
             "size": (params["size"] or "").lower()}
    for attr, templates in VERIFY_TEMPLATES.items():
        for template, negated in templates:
            for v in ([None] if attr == "lesion" else [truth[attr]] if "{v}" not in template else
                      {"modality": ["CT", "MRI", "X-Ray"], "part": [r[1].lower() for r in REGIONS.values()],
                       "side": ["left", "right"], "size": ["small", "large"]}[attr]):
                if template.format(v=v) == text:
                    holds = n > 0 if attr == "lesion" else v == truth[attr]
                    return "Yes" if holds != negated else "No"
    raise AssertionError(f"not a demo text: {text}")


def test_the_converter_adds_right_answers_to_training_only(tmp_path):
    """On the attribute-prior trap (phrasings, negation, a prior per text): every implied answer
    is the image's own answer, they are in both stages' training data only, and the answer
    priors a model is compared with do not count them."""
    base = ["--demo", "attribute-prior", "--demo_images", "100", "6", "10"]
    on, off = tmp_path / "on", tmp_path / "off"
    assert convert_slake_dataset.main(base + ["--out_dir", str(on), "--implied_questions", "both"]) == 0
    assert convert_slake_dataset.main(base + ["--out_dir", str(off), "--implied_questions", "none"]) == 0
    params = json.loads(next(on.glob("**/demo_params.json")).read_text())
    train = read_jsonl(on / "medical_vqa_train.jsonl", require_vqa=True)
    implied = [r for r in train if r.get("source") == "implied"]
    manifest = json.loads((on / "manifest.json").read_text())
    assert len(implied) == manifest["implied_questions"] > 20
    assert all(answer_of(r) == _truth(params[r["image"]], question_of(r)) for r in implied)
    stage1 = [r for r in read_jsonl(on / "medical_pretrain.jsonl") if r.get("source") == "implied"]
    assert sorted((r["image"], question_of(r), answer_of(r)) for r in stage1) == \
        sorted((r["image"], question_of(r), answer_of(r)) for r in implied)
    for split in ("validation", "test"):
        assert (on / f"medical_vqa_{split}.jsonl").read_bytes() == (off / f"medical_vqa_{split}.jsonl").read_bytes()
    assert read_answers(on / "medical_vqa_train.jsonl") == read_answers(off / "medical_vqa_train.jsonl")
    assert manifest["baselines_test"] == json.loads((off / "manifest.json").read_text())["baselines_test"]
    # the texts move toward even: the mean share of each closed text's commonest answer falls
    def majority(rows):
        by_text = {}
        for r in rows:
            if r["answer_type"] == "CLOSED" and r.get("source") != "verify":
                by_text.setdefault(question_of(r), Counter())[answer_of(r)] += 1
        return sum(max(c.values()) / sum(c.values()) for c in by_text.values()) / len(by_text)
    assert majority(train) < majority(read_jsonl(off / "medical_vqa_train.jsonl", require_vqa=True)) - 0.03
