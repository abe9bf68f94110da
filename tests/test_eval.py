"""eval_vlm.py: metrics, baselines, outputs, DICOM, single questions and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

import eval_vlm
from dataset.images import ImageReadError, load_image, read_dicom
from evaluation.metrics import baselines, compute_metrics, exact_match, llava_med_closed_hit, normalize, token_recall
from tests.helpers import train_tiny_on_demo

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled with pydicom, no download


def item(answer, prediction, answer_type="OPEN", content_type="Organ", modality="CT", question="q"):
    return dict(answer=answer, prediction=prediction, answer_type=answer_type, content_type=content_type,
                modality=modality, question=question)


def test_normalisation_cases():
    assert normalize("The Liver.") == "liver"
    assert normalize("Two") == "2" and normalize("an X-Ray") == "x ray"
    assert normalize("  Left   Lung, Right ") == "left lung right"
    assert exact_match("yes!", "Yes") and exact_match("three", "3") and not exact_match("liver", "livers")


def test_metrics_on_hand_written_predictions():
    items = [
        item("Yes", "yes", "CLOSED", "Abnormality", "CT"),
        item("No", "none", "CLOSED", "Abnormality", "MRI"),     # wrong, but right under LLaVA-Med's rule
        item("Yes", "no", "CLOSED", "Organ", "MRI"),
        item("Liver", "the liver", "OPEN", "Organ", "CT"),
        item("Left Lung, Right", "left lung", "OPEN", "Position", "X-Ray"),  # recall 2/3
        item("2", "two", "OPEN", "Quantity", "CT"),
        item("Brain Edema", "heart", "OPEN", "Abnormality", "MRI"),
    ]
    m = compute_metrics(items)
    assert m["count"] == {"all": 7, "closed": 3, "open": 4}
    assert m["closed_accuracy"] == pytest.approx(1 / 3)
    assert m["open_accuracy"] == pytest.approx(2 / 4)
    assert m["overall_accuracy"] == pytest.approx(3 / 7)
    assert m["open_recall"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert m["closed_accuracy_llava_med"] == pytest.approx(2 / 3)
    assert m["by_content_type"]["Abnormality"]["count"] == 3
    assert m["by_content_type"]["Abnormality"]["accuracy"] == pytest.approx(1 / 3)
    assert m["by_modality"]["MRI"] == {"count": 3, "accuracy": 0.0, "closed_count": 2, "closed_accuracy": 0.0,
                                       "open_accuracy": 0.0}
    assert llava_med_closed_hit("not sure", "no") and not exact_match("not sure", "no")
    assert token_recall("", "liver") == 0.0


def test_baselines():
    train = [dict(question="Is this normal?", answer="No", answer_type="CLOSED"),
             dict(question="Is this normal?", answer="No", answer_type="CLOSED"),
             dict(question="Is there a tumor?", answer="Yes", answer_type="CLOSED"),
             dict(question="Is there a mass?", answer="Yes", answer_type="CLOSED"),
             dict(question="Is there a mass?", answer="Yes", answer_type="CLOSED"),
             dict(question="Which organ?", answer="Liver", answer_type="OPEN"),
             dict(question="What modality?", answer="CT", answer_type="OPEN"),
             dict(question="What modality?", answer="CT", answer_type="OPEN")]
    test = [item("No", "", "CLOSED", question="Is this normal?"), item("Yes", "", "CLOSED", question="Is there a tumor?"),
            item("Yes", "", "CLOSED", question="Never seen?"), item("Liver", "", "OPEN", question="Which organ?"),
            item("MRI", "", "OPEN", question="What modality?")]
    b = baselines(train, test)
    maj = b["majority_per_answer_type"]  # CLOSED -> yes (3 of 5), OPEN -> ct
    assert maj["closed_accuracy"] == pytest.approx(2 / 3) and maj["open_accuracy"] == 0.0
    per_q = b["majority_per_question"]  # normal->no, tumor->yes, unseen->yes; organ->liver, modality->ct
    assert per_q["closed_accuracy"] == 1.0 and per_q["open_accuracy"] == pytest.approx(0.5)


def test_dicom_ct_and_mr():
    ct = read_dicom(DICOM_DIR / "CT_small.dcm")
    assert ct.mode == "L" and ct.size == (128, 128)
    arr = np.asarray(ct)
    assert arr.min() == 0 and arr.max() == 255  # percentile window spans the range
    mr = read_dicom(DICOM_DIR / "MR_small.dcm")  # stored window 600 +/- width/2
    ds = pydicom.dcmread(DICOM_DIR / "MR_small.dcm")
    raw = ds.pixel_array.astype(float)
    lo = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    assert mr.size == (64, 64)
    assert (np.asarray(mr)[raw <= lo] == 0).all()
    assert load_image(DICOM_DIR / "CT_small.dcm").size == (128, 128)


def test_dicom_multiframe_monochrome1_and_no_pixels(tmp_path):
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    frames = np.stack([np.full((8, 8), v, dtype=np.int16) for v in (0, 500, 1000)])
    ds.NumberOfFrames = 3
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = frames.tobytes()
    ds.WindowCenter, ds.WindowWidth = 500, 1000
    ds.RescaleSlope, ds.RescaleIntercept = 2, -500  # stored 0/500/1000 -> -500/500/1500 in modality units
    path = tmp_path / "multi.dcm"
    ds.save_as(path)
    mid = np.asarray(read_dicom(path))
    assert mid.shape == (8, 8) and 100 < mid.mean() < 160  # middle frame, mid-window grey
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = np.stack([np.full((8, 8), v, dtype=np.int16) for v in (0, 700, 0)]).tobytes()
    ds.save_as(path)
    assert np.asarray(read_dicom(path)).mean() < 40  # 900 units: near the window top, inverted to dark
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_dicom(DICOM_DIR / "rtplan.dcm")
    junk = tmp_path / "x.dcm"
    junk.write_bytes(b"nothing")
    with pytest.raises(ImageReadError, match="not a readable DICOM"):
        read_dicom(junk)
    txt = tmp_path / "notes.png"
    txt.write_text("hello")
    with pytest.raises(ImageReadError, match="not a readable image"):
        load_image(txt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    train_tiny_on_demo(root, seed=2, n_train=30, n_val=4, n_test=6, cache_dir=str(root / "cache"), epochs=4)
    return root


def eval_args(root: Path, *extra) -> list[str]:
    d = root / "data"
    return ["--model_path", str(root / "out" / "medical_vlm_48.pth"), "--data_path", str(d / "medical_vqa_test.jsonl"),
            "--train_path", str(d / "medical_vqa_train.jsonl"), "--images_path", str(d / "medical_images"),
            "--out_dir", str(root / "out"), "--cache_dir", str(root / "cache"), "--device", "cpu", *extra]


def test_end_to_end_evaluation_outputs(trained, capsys):
    assert eval_vlm.main(eval_args(trained, "--batch_size", "16")) == 0
    out = capsys.readouterr().out
    assert "majority per question" in out and "closed" in out
    folder = trained / "out" / "eval" / "medical_vlm_48"
    m = json.loads((folder / "metrics.json").read_text())
    preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    n_test = len((trained / "data" / "medical_vqa_test.jsonl").read_text().splitlines())
    assert m["count"]["all"] == len(preds) == n_test
    for key in ("closed_accuracy", "open_accuracy", "open_recall", "overall_accuracy", "closed_accuracy_llava_med",
                "by_content_type", "by_modality", "baselines", "checkpoint", "data"):
        assert key in m
    assert set(m["baselines"]) == {"majority_per_answer_type", "majority_per_question"}
    assert {"qid", "question", "answer", "prediction", "correct"} <= set(preds[0])
    assert sum(p["correct"] for p in preds) / len(preds) == pytest.approx(m["overall_accuracy"])
    assert all(p["prediction"] for p in preds)  # the trained model answers something
    # batched results do not depend on the batch size
    assert eval_vlm.main(eval_args(trained, "--batch_size", "3")) == 0
    again = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in again] == [p["prediction"] for p in preds]


def test_single_question_and_dicom(trained, capsys, monkeypatch):
    img = trained / "data" / "medical_images" / "xmlab31" / "source.jpg"
    assert eval_vlm.main(eval_args(trained, "--image", str(img), "--question", "What modality is used to take this image?")) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and "\n" not in answer
    assert eval_vlm.main(eval_args(trained, "--image", str(DICOM_DIR / "CT_small.dcm"), "--question", "Is this normal?")) == 0
    assert capsys.readouterr().out.strip() != ""
    answers = iter(["What modality is used to take this image?", "How many lesions are in the image?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert eval_vlm.main(eval_args(trained, "--image", str(img))) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 2
    assert eval_vlm.main(eval_args(trained, "--image", str(DICOM_DIR / "rtplan.dcm"), "--question", "q")) == 2
    assert "no pixel data" in capsys.readouterr().err


def test_bad_inputs(trained, tmp_path, capsys):
    assert eval_vlm.main(["--model_mode", "1", "--out_dir", str(tmp_path), "--hidden_size", "512"]) == 2
    err = capsys.readouterr().err
    assert "medical_vlm_512.pth not found" in err and "python train_sft_vlm.py" in err
    assert eval_vlm.main(["--model_mode", "0", "--out_dir", str(tmp_path)]) == 2
    assert "python train_pretrain_vlm.py" in capsys.readouterr().err
    ckpt = torch.load(trained / "out" / "medical_vlm_48.pth", weights_only=True)
    ckpt["config"]["hidden_size"] = 64
    torch.save(ckpt, tmp_path / "other.pth")
    assert eval_vlm.main(eval_args(trained) + ["--model_path", str(tmp_path / "other.pth")]) == 2
    assert "do not fit the stored config" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert eval_vlm.main(eval_args(trained, "--data_path", str(empty))) == 2
    assert "has no records" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": "nope"}\n')
    assert eval_vlm.main(eval_args(trained, "--data_path", str(bad))) == 2
    assert "bad.jsonl:1: field 'conversations'" in capsys.readouterr().err


def test_unreadable_image_counts_as_failure(trained, tmp_path, capsys):
    d = trained / "data"
    images = tmp_path / "imgs"
    import shutil
    shutil.copytree(d / "medical_images", images)
    recs = [json.loads(line) for line in (d / "medical_vqa_test.jsonl").read_text().splitlines()]
    broken = recs[0]["image"]
    (images / broken).write_bytes(b"broken")
    assert eval_vlm.main(eval_args(trained, "--images_path", str(images), "--cache_dir", "")) == 0
    folder = trained / "out" / "eval" / "medical_vlm_48"
    preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    failed = [p for p in preds if "error" in p]
    assert len(failed) == sum(r["image"] == broken for r in recs) > 0
    assert all(not p["correct"] for p in failed)
    assert json.loads((folder / "metrics.json").read_text())["unreadable_images"] == 1
