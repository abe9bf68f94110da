"""convert_slake_dataset.py against the real SLAKE annotations, hub layouts, the demo set
and bad input."""
from __future__ import annotations

import io
import json
import random
import re
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import convert_slake_dataset
from dataset.contract import answer_of, is_derived, question_of, read_jsonl
from dataset.demo import REGIONS, draw, sample_params, write_demo_release
from dataset.slake import ConversionError, convert, read_hub_vqa, read_release

SLAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slake"
needs_slake = pytest.mark.skipif(not SLAKE.is_dir(), reason="../shared/data/slake (real annotations) not present")


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), color=seed % 256).save(buf, format="JPEG")
    return buf.getvalue()


def release_copy(dst: Path, names=("train.json", "validate.json", "test.json"), limit=None, zipped=False):
    """Real annotation files + a placeholder image at every img_name."""
    dst.mkdir(parents=True, exist_ok=True)
    img_names = set()
    for src, name in zip(("train.json", "validate.json", "test.json"), names):
        rows = json.loads((SLAKE / src).read_text())
        if limit:
            rows = rows[:limit]
        (dst / name).write_text(json.dumps(rows))
        img_names |= {r["img_name"] for r in rows}
    if zipped:
        with zipfile.ZipFile(dst / "imgs.zip", "w") as z:
            for i, n in enumerate(sorted(img_names)):
                z.writestr(f"imgs/{n}", jpeg_bytes(i))
    else:
        for i, n in enumerate(sorted(img_names)):
            p = dst / "imgs" / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg_bytes(i))
    return dst


@pytest.fixture(scope="module")
def real_release(tmp_path_factory):
    return release_copy(tmp_path_factory.mktemp("slake"))


@pytest.fixture(scope="module")
def real_converted(real_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    manifest = convert(read_release(real_release), out)
    return out, manifest


@needs_slake
def test_real_counts(real_converted):
    out, m = real_converted
    assert m["counts"] == {"train": 4918, "validation": 1053, "test": 1061}
    assert m["images"] == {"train": 450, "validation": 96, "test": 96}
    assert m["image_overlap"] == {"train&validation": 0, "train&test": 0, "validation&test": 0}
    assert sum(m["answer_types"]["train"].values()) == 4918
    assert m["answer_types"]["test"] == {"CLOSED": 416, "OPEN": 645}
    assert len(list((out / "medical_images").rglob("source.jpg"))) == 642


@needs_slake
def test_qid_1622_reported(real_converted):
    out, m = real_converted
    assert [(s["split"], s["qid"], s["reason"]) for s in m["skipped"]] == [("train", 1622, "empty answer")]
    assert 1622 not in {r["qid"] for r in read_jsonl(out / "medical_vqa_train.jsonl")}


@needs_slake
def test_jsonl_schema_and_disjointness(real_converted):
    out, _ = real_converted
    splits = {s: read_jsonl(out / f"medical_vqa_{s}.jsonl", require_vqa=True) for s in ("train", "validation", "test")}
    rec = splits["train"][0]
    assert set(rec) == {"conversations", "image", "qid", "answer_type", "content_type", "modality", "location"}
    assert rec["conversations"][0] == {"role": "user", "content": "<image>\nWhat modality is used to take this image?"}
    assert rec["conversations"][1] == {"role": "assistant", "content": "MRI"}
    assert rec["image"] == "xmlab1/source.jpg" and (out / "medical_images" / rec["image"]).is_file()
    imgs = {s: {r["image"] for r in recs} for s, recs in splits.items()}
    assert not imgs["train"] & imgs["test"] and not imgs["train"] & imgs["validation"]
    assert not imgs["validation"] & imgs["test"]
    assert all(r["conversations"][0]["content"].startswith("<image>\n") for r in splits["test"])


@needs_slake
def test_captions_cover_training_images_only(real_converted):
    out, _ = real_converted
    pre = read_jsonl(out / "medical_pretrain.jsonl")
    caps = [r for r in pre if not r.get("source") and "qid" not in r]  # captions; box, verification and
    # training questions follow them
    assert {r.get("source") for r in pre} == {None, "verify", "implied"}  # real copies here have no detection.json
    train = read_jsonl(out / "medical_vqa_train.jsonl")
    train_imgs = {r["image"] for r in train}
    test_imgs = {r["image"] for r in read_jsonl(out / "medical_vqa_test.jsonl")}
    own = sorted(r["qid"] for r in train if not is_derived(r))
    assert sorted(r["qid"] for r in pre if "qid" in r) == own and len(own) > 4000  # every training question
    assert len(caps) == 450 and {c["image"] for c in caps} == train_imgs
    assert not {c["image"] for c in caps} & test_imgs
    first = next(c for c in caps if c["image"] == "xmlab1/source.jpg")
    text = answer_of(first)
    assert text.startswith("This is an MRI image of the abdomen.")


@needs_slake
def test_chinese_and_all_follow_the_english_image_splits(real_release, tmp_path):
    """In the release the Chinese test images are English *training* images (142 shared).
    The split rule: every image keeps its English split, Chinese questions follow their
    image, so no image is in two splits, within or across languages."""
    en = convert(read_release(real_release), tmp_path / "en", lang="en")
    zh = convert(read_release(real_release), tmp_path / "zh", lang="zh")
    assert sum(zh["counts"].values()) == 4916 + 1046 + 1033
    assert any("split rule" in n for n in zh["notes"])

    def images(folder, split):
        return {r["image"] for r in read_jsonl(folder / f"medical_vqa_{split}.jsonl")}
    for split in ("train", "validation", "test"):
        assert images(tmp_path / "zh", split) == images(tmp_path / "en", split)
    assert zh["image_overlap"] == {"train&validation": 0, "train&test": 0, "validation&test": 0}
    m_all = convert(read_release(real_release), tmp_path / "all", lang="all")
    assert m_all["image_overlap"]["train&test"] == 0
    assert m_all["counts"]["test"] == en["counts"]["test"] + zh["counts"]["test"]
    assert en["notes"] == []  # English is the anchor: nothing moves


@needs_slake
def test_rerun_is_idempotent(real_release, tmp_path):
    m1 = convert(read_release(real_release), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    m2 = convert(read_release(real_release), tmp_path)
    assert m1["images_written"] == 642 and m2["images_written"] == 0
    assert before == {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    assert not list(tmp_path.rglob("*.tmp"))


@needs_slake
def test_hub_snapshot_layout_with_zip(tmp_path):
    """BoKelvin/SLAKE's files: validation.json (not validate.json) and imgs.zip."""
    snap = release_copy(tmp_path / "snap", names=("train.json", "validation.json", "test.json"), limit=300,
                        zipped=True)
    assert not (snap / "imgs").exists()
    rc = convert_slake_dataset.main(["--slake_dir", str(snap), "--out_dir", str(tmp_path / "out")])
    assert rc == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    en = {s: sum(1 for r in json.loads((snap / f).read_text()) if r["q_lang"] == "en")
          for s, f in (("train", "train.json"), ("validation", "validation.json"), ("test", "test.json"))}
    assert m["counts"] == en
    assert (tmp_path / "out" / "medical_images" / "xmlab1" / "source.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_hub_vqa_parquet_layout(tmp_path):
    """Embedded-image parquet laid out like mdwiratathya/SLAKE-vqa-english (no answer_type)."""
    import datasets
    folder = tmp_path / "slake-vqa-english" / "data"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("train", 12), ("validation", 4), ("test", 5)):
        imgs = [Image.new("L", (20, 20), color=rng.randrange(256)) for _ in range(n)]
        ds = datasets.Dataset.from_dict({
            "image": imgs, "question": [f"Is there a lesion {i}?" if i % 2 else f"Which organ {i}?" for i in range(n)],
            "answer": ["yes" if i % 2 else "liver" for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                        "answer": datasets.Value("string")}))
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    m = convert(read_hub_vqa(str(tmp_path / "slake-vqa-english")), tmp_path / "out")
    assert m["counts"] == {"train": 12, "validation": 4, "test": 5}
    assert any("inferred" in n for n in m["notes"])
    recs = read_jsonl(tmp_path / "out" / "medical_vqa_train.jsonl", require_vqa=True)
    assert [r["answer_type"] for r in recs[:4]] == ["OPEN", "CLOSED", "OPEN", "CLOSED"]
    assert all((tmp_path / "out" / "medical_images" / r["image"]).is_file() for r in recs)


def _tiny_release(root: Path, train_rows, test_rows, val_rows=()):
    (root / "imgs").mkdir(parents=True)
    for name, rows in (("train.json", train_rows), ("validate.json", val_rows), ("test.json", test_rows)):
        (root / name).write_text(json.dumps(list(rows)))
    return root


def _row(qid, img, q="Is this normal?", a="Yes"):
    return {"qid": qid, "img_name": img, "question": q, "answer": a, "q_lang": "en", "answer_type": "CLOSED",
            "content_type": "Abnormality", "modality": "CT", "location": "Lung"}


def _put(root: Path, img: str, data: bytes):
    p = root / "imgs" / img
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_bad_records_are_skipped_with_reasons(tmp_path):
    root = _tiny_release(tmp_path / "r", [
        _row(0, "a/source.jpg"), _row(1, "missing/source.jpg"), _row(2, "broken/source.jpg"),
        _row(3, "../../etc/passwd"), "not a record", {"qid": 5, "question": "no image"},
        _row(6, "a/source.jpg", q=""),
    ], [_row(10, "t/source.jpg")])
    _put(root, "a/source.jpg", jpeg_bytes(1))
    _put(root, "t/source.jpg", jpeg_bytes(2))
    _put(root, "broken/source.jpg", b"\xff\xd8garbage")
    m = convert(read_release(root), tmp_path / "out")
    reasons = {s["qid"]: s["reason"] for s in m["skipped"]}
    assert m["counts"]["train"] == 1 and m["counts"]["test"] == 1
    assert reasons[1].startswith("missing image") and "missing/source.jpg" in reasons[1]
    assert reasons[2].startswith("unreadable image")
    assert "escapes the image folder" in reasons[3]
    assert "missing field" in reasons[5] and reasons[6] == "empty question"
    assert any(s["reason"] == "record is not a JSON object" for s in m["skipped"])
    assert not (tmp_path / "out" / "medical_images" / "etc").exists()
    with pytest.raises(ConversionError, match=r"train.json\[3\] \(qid 3\): image path .* escapes.*--strict"):
        convert(read_release(root), tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_overlap_is_refused_and_nothing_looks_complete(tmp_path):
    root = _tiny_release(tmp_path / "r", [_row(0, "a/source.jpg")], [_row(1, "a/source.jpg")])
    _put(root, "a/source.jpg", jpeg_bytes(1))
    out = tmp_path / "out"
    convert(read_release(root), out, allow_overlap=True)
    assert json.loads((out / "manifest.json").read_text())["image_overlap"]["train&test"] == 1
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConversionError, match="--allow_overlap"):
        convert(read_release(root), out)
    # the refused run changed nothing: the previous (complete) dataset is still there
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_missing_split_file_and_offline_hub(tmp_path, monkeypatch, capsys):
    root = tmp_path / "r"
    (root / "imgs").mkdir(parents=True)
    (root / "train.json").write_text("[]")
    with pytest.raises(ConversionError, match="validate.json"):
        read_release(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = convert_slake_dataset.main(["--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--slake_dir" in err and "--demo" in err and "BoKelvin/SLAKE" in err
    assert not (tmp_path / "o").exists()


def derive_answer(question: str, p: dict) -> str:
    """Independent of dataset/demo.py's question code: the answer from parameters alone."""
    yn = lambda b: "Yes" if b else "No"  # noqa: E731
    organ = REGIONS[p["region"]][2]
    if question == "What modality is used to take this image?":
        return p["modality"]
    if m := re.fullmatch(r"Is this a (.+) image\?", question):
        return yn(m.group(1) == p["modality"])
    if question == "Which part of the body does this image belong to?":
        return REGIONS[p["region"]][1]
    if m := re.fullmatch(r"Does the picture contain (.+)\?", question):
        return yn(m.group(1) == organ)
    if question == "What scanning plane does this image belong to?":
        return "Coronal Plane" if p["modality"] == "X-Ray" else "Transverse Plane"
    if question == "How many lesions are in the image?":
        return str(p["lesions"])
    if question == "Is this image abnormal?":
        return yn(p["lesions"] > 0)
    if question == "Is this image normal?":
        return yn(p["lesions"] == 0)
    if question == "Where is the lesion located?":
        return p["side"]
    if m := re.fullmatch(r"Is the lesion on the (left|right) side of the image\?", question):
        return yn(m.group(1) == p["side"].lower())
    if question == "How big is the lesion?":
        return p["size"]
    if question == "Is the lesion large?":
        return yn(p["size"] == "Large")
    raise AssertionError(f"unknown demo question {question!r}")


def test_demo_set_is_deterministic_and_answers_follow_from_parameters(tmp_path):
    a = write_demo_release(tmp_path / "a", seed=3, n_train=20, n_val=4, n_test=6)
    b = write_demo_release(tmp_path / "b", seed=3, n_train=20, n_val=4, n_test=6)
    for name in ("train.json", "validate.json", "test.json", "demo_params.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "imgs/xmlab7/source.jpg").read_bytes() == (b / "imgs/xmlab7/source.jpg").read_bytes()
    params = json.loads((a / "demo_params.json").read_text())
    m = convert(read_release(a), tmp_path / "out")
    assert m["images"] == {"train": 20, "validation": 4, "test": 6} and not m["skipped"]
    n = 0
    for split in ("train", "validation", "test"):
        for rec in read_jsonl(tmp_path / "out" / f"medical_vqa_{split}.jsonl", require_vqa=True):
            if rec.get("source") == "verify":  # derived from an open question: tested in test_image_use.py
                continue
            assert answer_of(rec) == derive_answer(question_of(rec), params[rec["image"]]), rec
            n += 1
    assert n > 200
    types = {r["content_type"] for r in read_jsonl(tmp_path / "out" / "medical_vqa_train.jsonl")}
    assert {"Modality", "Organ", "Position", "Abnormality", "Quantity", "Plane", "Size"} <= types
    assert write_demo_release(tmp_path / "c", seed=4, n_train=20, n_val=1, n_test=1).joinpath("train.json") \
        .read_bytes() != (a / "train.json").read_bytes()


def test_demo_images_show_the_parameters():
    """Lesions are drawn where the parameters say: the lesion side differs from the other."""
    rng = random.Random(0)
    import numpy as np
    for _ in range(20):
        p = sample_params(rng)
        img = np.asarray(draw(p), dtype=float)
        if p["lesions"]:
            p2 = dict(p, lesions=0)
            diff = np.abs(img - np.asarray(draw(p2), dtype=float))
            left, right = diff[:, :112].sum(), diff[:, 112:].sum()
            assert (left > right) == (p["side"] == "Left")


def test_demo_cli_writes_contract(tmp_path):
    rc = convert_slake_dataset.main(["--demo", "--demo_images", "10", "3", "3", "--out_dir", str(tmp_path)])
    assert rc == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["source"] == "demo:seed=0" and m["images"]["test"] == 3 and m["pretrain_captions"] == 10


@pytest.mark.parametrize("seed", range(12))
def test_easy_demo_boxes_hold_what_was_drawn(seed):
    """The easy demo's detection.json boxes are the drawing's own organ and lesions: each lesion box
    is mostly speckle (pure black/white pixels), its organ box centres on the organ, and the
    traps have no boxes."""
    import numpy as np
    from dataset.demo import ORGAN_SHAPES, boxes
    params = sample_params(random.Random(seed))
    img = np.asarray(draw(params), dtype=np.float32)
    found = boxes(params)
    lesions = [b["Lesion"] for b in found if "Lesion" in b]
    organs = [(name, box) for b in found for name, box in b.items() if name != "Lesion"]
    assert len(lesions) == params["lesions"] and len(organs) == len(ORGAN_SHAPES[params["region"]])
    assert {name for name, _ in organs} == {REGIONS[params["region"]][2].title()}
    for x, y, w, h in lesions:
        core = img[y + h // 3:y + 2 * h // 3, x + w // 3:x + 2 * w // 3]
        assert ((core < 60) | (core > 190)).mean() > 0.8  # the lesion's speckle (noise included)
    for _, (x, y, w, h) in organs:
        assert 0 <= x and 0 <= y and x + w <= 224 and y + h <= 224


def test_only_the_plain_easy_demo_has_boxes(tmp_path):
    plain = write_demo_release(tmp_path / "plain", seed=0, n_train=3, n_val=1, n_test=1)
    trap = write_demo_release(tmp_path / "trap", seed=0, n_train=3, n_val=1, n_test=1, prior=True)
    assert len(list(plain.glob("imgs/*/detection.json"))) == 5
    assert not list(trap.glob("imgs/*/detection.json"))
