"""Hardening II (issue #18), one parametrised test per mechanism: destinations the toolkit
does not own are never replaced, sources follow one rule (inside the folder, regular file,
size limit), images are gated on their header before any decode, one strict weight loader,
configs bounded before allocation, one local-or-hub rule, API inputs normalised like files."""
from __future__ import annotations

import hashlib
import io
import json
import time
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convert_slake_dataset
from dataset.images import ImageReadError, as_image, load_image
from model.checkpoint import CheckpointError, load_model, locate_checkpoint, read_checkpoint, save_checkpoint
from scripts import export_hf
from tests.helpers import converted_demo, make_tiny_model, random_image
from trainer.cli import main as train_main

TINY = ["--vision_model", "random-tiny", "--hidden_size", "32", "--num_hidden_layers", "1",
        "--num_attention_heads", "2", "--num_key_value_heads", "1", "--device", "cpu", "--num_workers", "0"]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) -> its content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory, tokenizer, tiny_tower):
    path = tmp_path_factory.mktemp("ck") / "medical_vlm_64.pth"
    return save_checkpoint(path, make_tiny_model(tokenizer, tiny_tower, spread=0.1), tokenizer, "sft", 3)


# ----------------------------------------------------------------------------- destinations

def _target(kind: str, tmp_path: Path, ckpt: Path) -> Path:
    if kind == "repo":  # a folder with .git and code
        (tmp_path / "repo" / ".git").mkdir(parents=True)
        (tmp_path / "repo" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (tmp_path / "repo" / "train.py").write_text("print(1)\n")
        return tmp_path / "repo"
    if kind == "out_with_checkpoints":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / ckpt.name).write_bytes(ckpt.read_bytes())
        (tmp_path / "out" / "medical_vlm_64_metrics.jsonl").write_text("{}\n")
        return tmp_path / "out"
    if kind == "foreign_files":
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "notes.txt").write_text("mine")
        return tmp_path / "f"
    if kind == "model_folder_plus_foreign":  # our own export with a file the user added
        t = tmp_path / "m"
        assert export_hf.main([str(ckpt), str(t)]) == 0
        (t / "my_results.csv").write_text("1,2\n")
        return t
    if kind == "fake_config":  # looks like a model folder but is not ours
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "config.json").write_text('{"model_type": "bert"}')
        (tmp_path / "c" / "model.safetensors").write_bytes(b"x")
        return tmp_path / "c"
    if kind == "a_file":
        (tmp_path / "file.bin").write_bytes(b"precious")
        return tmp_path / "file.bin"
    if kind == "a_link":
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        return tmp_path / "link"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["repo", "out_with_checkpoints", "foreign_files", "model_folder_plus_foreign",
                                  "fake_config", "a_file", "a_link"])
def test_export_never_replaces_what_it_does_not_own(kind, ckpt_path, tmp_path, capfd):
    target = _target(kind, tmp_path, ckpt_path)
    before = tree(tmp_path)
    assert export_hf.main([str(ckpt_path), str(target)]) == 2
    assert tree(tmp_path) == before  # every byte in place, nothing added beside it
    err = capfd.readouterr().err
    assert "nothing was written" in err or "not a folder" in err


@pytest.mark.parametrize("kind", ["new", "empty", "own_export"])
def test_export_writes_new_empty_or_its_own_folders(kind, ckpt_path, tmp_path):
    target = tmp_path / "hf" / "m"
    if kind == "empty":
        target.mkdir(parents=True)
    if kind == "own_export":
        assert export_hf.main([str(ckpt_path), str(target)]) == 0
    assert export_hf.main([str(ckpt_path), str(target)]) == 0
    assert (target / "model.safetensors").is_file() and read_checkpoint(target)["step"] == 3
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no staging or .old leftovers


@pytest.mark.parametrize("metrics", [{"count": 5}, [], {"count": {"all": 3}, "closed_accuracy": "x",
                                                        "open_accuracy": 1, "overall_accuracy": 1}])
def test_export_refuses_foreign_metrics(metrics, ckpt_path, tmp_path, capfd):
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    assert export_hf.main([str(ckpt_path), str(tmp_path / "hf"), "--metrics", str(tmp_path / "m.json")]) == 2
    assert "not a metrics.json" in capfd.readouterr().err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("damage", ["all_empty", "train_empty", "test_empty", "images_missing"])
def test_empty_or_partial_conversion_keeps_the_previous_dataset(damage, tmp_path, capsys):
    from dataset.demo import write_demo_release
    good = converted_demo(tmp_path, 1, 6, 2, 2)
    before = tree(good)
    raw = write_demo_release(tmp_path / "bad", seed=2, n_train=4, n_val=2, n_test=2)
    files = {"all_empty": ["train.json", "validate.json", "test.json"], "train_empty": ["train.json"],
             "test_empty": ["test.json"], "images_missing": []}[damage]
    for f in files:
        (raw / f).write_text("[]")
    if damage == "images_missing":
        for p in (raw / "imgs").rglob("*.jpg"):
            p.unlink()
    assert convert_slake_dataset.main(["--slake_dir", str(raw), "--out_dir", str(good)]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace" in err and "previous dataset there is intact" in err
    assert tree(good) == before


def test_failed_conversion_into_a_new_folder_does_not_claim_a_previous_one(tmp_path, capsys):
    from dataset.demo import write_demo_release
    raw = write_demo_release(tmp_path / "bad", seed=2, n_train=4, n_val=2, n_test=2)
    (raw / "train.json").write_text("[]")
    assert convert_slake_dataset.main(["--slake_dir", str(raw), "--out_dir", str(tmp_path / "new")]) == 2
    assert "No dataset was written" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sources

def _deflated_dicom(path: Path, rows: int, cols: int, frames: int = 1):
    """A DICOM whose header claims rows x cols x frames 16-bit pixels (the pixel data is tiny:
    the header is what a bomb lies with, and what must be checked before decoding)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CT", 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = rows, cols, 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = b"\0\0" * 64
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.mark.parametrize("rows, cols, frames", [(16000, 16000, 1), (40000, 40000, 1), (8000, 8000, 4),
                                                (512, 512, 2000)])
def test_dicom_bombs_are_refused_from_the_header(rows, cols, frames, tmp_path, monkeypatch):
    import pydicom.dataset
    path = _deflated_dicom(tmp_path / "bomb.dcm", rows, cols, frames)
    assert path.stat().st_size < 10_000

    def no_decode(self):
        raise AssertionError("pixel data decoded before the size check")
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decode))
    for read in (lambda: load_image(path), lambda: load_image("upload.dcm", path.read_bytes()),
                 lambda: as_image(str(path))):
        with pytest.raises(ImageReadError, match="too large"):
            read()


def test_png_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (16000, 16000)).save(path)
    assert path.stat().st_size < 200_000

    def no_decode(self, *a, **k):
        raise AssertionError("decoded before the size check")
    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    for read in (lambda: load_image(path), lambda: load_image("x.png", path.read_bytes())):
        with pytest.raises(ImageReadError, match="too large|not a readable image"):
            read()


@pytest.mark.parametrize("special", ["dev_zero", "fifo", "folder", "link_out"])
def test_release_entries_that_are_not_regular_files_inside_are_refused(special, tmp_path):
    from dataset.demo import write_demo_release
    from dataset.slake import convert, read_release
    raw = write_demo_release(tmp_path / "raw", seed=0, n_train=4, n_val=2, n_test=2)
    victim = raw / "imgs" / "xmlab1" / "source.jpg"
    victim.unlink()
    if special == "dev_zero":
        victim.symlink_to("/dev/zero")
    elif special == "fifo":
        os.mkfifo(victim)
    elif special == "folder":
        victim.mkdir()
    else:
        (tmp_path / "secret.jpg").write_bytes((raw / "imgs" / "xmlab2" / "source.jpg").read_bytes())
        victim.symlink_to(tmp_path / "secret.jpg")
    m = convert(read_release(raw), tmp_path / "out")  # returns at once: nothing read from the entry
    reasons = [s["reason"] for s in m["skipped"] if "xmlab1/" in s["reason"]]
    assert reasons and all("refused" in r or "not found" in r for r in reasons)
    assert not (tmp_path / "out" / "medical_images" / "xmlab1" / "source.jpg").exists()


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "config.json", "model.safetensors"])
def test_model_folder_links_out_are_refused(name, ckpt_path, tmp_path, capfd):
    folder = tmp_path / "hf"
    assert export_hf.main([str(ckpt_path), str(folder)]) == 0
    secret = tmp_path / "secret.txt"
    secret.write_bytes((folder / name).read_bytes() if (folder / name).exists() else b"SECRET")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside"):
        read_checkpoint(folder)
    assert export_hf.main([str(folder), str(tmp_path / "copy")]) == 2
    assert not (tmp_path / "copy").exists()


# ----------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("llm.layers.0.self_attn.q_proj.weight"), "missing"),
    (lambda sd: sd.__setitem__("llm.extra.weight", torch.zeros(2)), "unexpected"),
    (lambda sd: sd.__setitem__("projector.net.0.weight", torch.zeros(3, 3)), "wrong shape"),
    (lambda sd: sd.__setitem__("llm.norm.weight", sd["llm.norm.weight"].to(torch.int32)), "wrong dtype"),
])
def test_from_weight_loads_exactly_the_model_or_nothing(change, message, tmp_path, capfd):
    demo = converted_demo(tmp_path, 3, 8, 2, 2)
    common = TINY + ["--images_path", str(demo / "medical_images"), "--cache_dir", "", "--val_path", "",
                     "--data_path", str(demo / "medical_vqa_train.jsonl"), "--epochs", "1", "--batch_size", "4"]
    assert train_main("sft", common + ["--out_dir", str(tmp_path / "a"), "--from_weight", "none"]) == 0
    ck = torch.load(tmp_path / "a" / "medical_vlm_32.pth", weights_only=True)
    change(ck["model"])
    torch.save(ck, tmp_path / "bad.pth")
    assert train_main("sft", common + ["--out_dir", str(tmp_path / "b"), "--from_weight",
                                       str(tmp_path / "bad.pth")]) == 2
    assert message in capfd.readouterr().err and not (tmp_path / "b" / "medical_vlm_32.pth").exists()


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 10**7, "hidden_size"), ("num_hidden_layers", 10**6, "num_hidden_layers"),
    ("max_position_embeddings", 10**9, "max_position_embeddings"), ("hidden_size", "64", "hidden_size"),
    ("vocab_size", 10**8, "vocab_size"), ("intermediate_size", 10**6, "intermediate_size"),
    ("image_tokens", 197, "tokens"), ("use_moe", "yes", "use_moe"), ("dropout", float("nan"), "dropout"),
    ("num_hidden_layers", True, "num_hidden_layers"), ("projector", "film", "was removed"),
])
def test_configs_are_validated_before_anything_is_allocated(field, value, message, ckpt_path, tmp_path):
    ck = torch.load(ckpt_path, weights_only=True)
    ck["config"][field] = value
    torch.save(ck, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "c.pth")


@pytest.mark.parametrize("vision", ["x", 5, None, {"fingerprint": "a"}])
def test_a_malformed_vision_entry_is_a_message(vision, ckpt_path, tmp_path):
    ck = torch.load(ckpt_path, weights_only=True)
    ck["vision"] = vision
    torch.save(ck, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="vision"):
        load_model(tmp_path / "c.pth")


@pytest.mark.parametrize("spec", ["out/nope.pth", "out/medical_vlm_768.pth", "hf/model", "./x/y", "out/sub",
                                  "dataset/x", "runs/model.pth", "a/b/c", "model.safetensors"])
def test_a_missing_local_path_is_never_sent_to_the_hub(spec, monkeypatch):
    import model.checkpoint as ck
    monkeypatch.setattr(ck, "download", lambda s: pytest.fail(f"{spec} sent to the hub"))
    with pytest.raises(FileNotFoundError, match="not found"):
        locate_checkpoint(spec)


@pytest.mark.parametrize("spec", ["BoKelvin/medvqa", "someone/model-7b", "org.name/repo_1"])
def test_hub_ids_still_go_to_the_hub(spec, monkeypatch):
    import model.checkpoint as ck
    monkeypatch.setattr(ck, "download", lambda s: Path("/hub") / s)
    assert locate_checkpoint(spec) == Path("/hub") / spec


def test_missing_checkpoint_names_the_step_and_other_sizes(tmp_path, ckpt_path):
    (tmp_path / "medical_vlm_512.pth").write_bytes(ckpt_path.read_bytes())
    with pytest.raises(FileNotFoundError) as exc:
        locate_checkpoint(tmp_path / "medical_vlm_768.pth")
    assert "train_sft_vlm.py --hidden_size 768" in str(exc.value) and "medical_vlm_512.pth" in str(exc.value)


def test_resume_from_a_weights_file_is_a_message(tmp_path, capfd):
    demo = converted_demo(tmp_path, 3, 8, 2, 2)
    common = TINY + ["--images_path", str(demo / "medical_images"), "--cache_dir", "", "--val_path", "",
                     "--data_path", str(demo / "medical_vqa_train.jsonl"), "--epochs", "1", "--batch_size", "4",
                     "--out_dir", str(tmp_path / "a"), "--from_weight", "none"]
    assert train_main("sft", common) == 0
    (tmp_path / "a" / "medical_vlm_32_resume.pth").write_bytes((tmp_path / "a" / "medical_vlm_32.pth").read_bytes())
    assert train_main("sft", common + ["--resume"]) == 2
    assert "is not a resume state" in capfd.readouterr().err


# ----------------------------------------------------------------------------- API inputs

def test_api_normalises_pil_and_numpy_like_files(tmp_path):
    rng = np.random.default_rng(0)
    arr16 = (rng.random((40, 50)) * 4000 + 1000).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "x16.png")
    from_file = np.asarray(load_image(tmp_path / "x16.png"))
    assert np.array_equal(np.asarray(as_image(Image.open(tmp_path / "x16.png"))), from_file)
    assert np.array_equal(np.asarray(as_image(arr16)), from_file)
    assert as_image(Image.new("P", (8, 8))).mode in ("L", "RGB")
    assert as_image(Image.new("RGBA", (8, 8))).mode == "RGB"
    assert as_image(np.zeros((8, 8, 3), np.uint8)).mode == "RGB"


@pytest.mark.parametrize("image, error", [(None, TypeError), (b"\x89PNG", TypeError), (3, TypeError),
                                          (Image.new("L", (0, 0)), ImageReadError),
                                          (np.zeros((0, 4)), ImageReadError), (np.zeros((4, 4, 7)), ImageReadError)])
def test_api_refuses_other_image_types_by_name(image, error):
    with pytest.raises(error):
        as_image(image)


def test_api_question_and_constrain_mode_are_checked(ckpt_path, tiny_tower, monkeypatch):
    from evaluation.api import MedicalVQA
    vqa = MedicalVQA(load_model(ckpt_path))
    with pytest.raises(TypeError, match="question"):
        vqa.answer(random_image(0), None)
    with pytest.raises(ValueError, match="mode"):
        vqa.constrain(mode="bogus")


# ----------------------------------------------------------------------------- runs and entry points

def _sft(demo: Path, out: Path, *extra: str) -> list[str]:
    return TINY + ["--images_path", str(demo / "medical_images"), "--cache_dir", "", "--val_path", "",
                   "--data_path", str(demo / "medical_vqa_train.jsonl"), "--epochs", "2", "--batch_size", "4",
                   "--out_dir", str(out), "--from_weight", "none", "--log_interval", "1", *extra]


@pytest.mark.parametrize("fail_at", ["first_save", "second_save"])
def test_a_failed_run_leaves_the_kept_checkpoint_and_its_metrics(fail_at, tmp_path, monkeypatch, capfd):
    import trainer.checkpointing as tr
    demo = converted_demo(tmp_path, 3, 8, 2, 2)
    out = tmp_path / "out"
    assert train_main("sft", _sft(demo, out)) == 0
    before = tree(out)
    real, calls = tr.save_checkpoint, []

    def disk_full(*a, **k):
        calls.append(1)
        if fail_at == "first_save" or len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(tr, "save_checkpoint", disk_full)
    assert train_main("sft", _sft(demo, out, "--seed", "7")) == 2
    assert "No space left" in capfd.readouterr().err
    after = tree(out)
    if fail_at == "first_save":
        assert after == before  # checkpoint, metrics, curve: exactly as they were
    else:  # the first epoch's save happened: checkpoint and metrics moved on together
        rows = [json.loads(x) for x in (out / "medical_vlm_32_metrics.jsonl").read_text().splitlines()]
        saved = torch.load(out / "medical_vlm_32.pth", weights_only=True)["step"]
        assert max(r["step"] for r in rows) == saved
    assert not [p for p in out.iterdir() if p.name.endswith(".run")]


@pytest.mark.parametrize("flag", ["--out_dir", "--cache_dir"])
def test_output_folders_that_are_files_are_refused_before_training(flag, tmp_path, capfd):
    demo = converted_demo(tmp_path, 3, 8, 2, 2)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    args = _sft(demo, tmp_path / "out") + [flag, str(blocker)]
    capfd.readouterr()
    assert train_main("sft", args) == 2
    err = capfd.readouterr().err
    assert f"{flag} {blocker} is a file" in err and "Traceback" not in err and blocker.read_text() == "x"


@pytest.mark.parametrize("spec, name", [("hf/m/sub/..", "m"), ("out/medical_vlm_64.pth", "medical_vlm_64"),
                                        ("someone/model", "model"), ("/", "model"), ("out/../..", None)])
def test_eval_results_stay_under_out_eval(spec, name):
    import eval_vlm
    got = eval_vlm.eval_name(spec)
    assert got not in ("", ".", "..") and "/" not in got and (name is None or got == name)


def test_bad_host_is_not_reported_as_a_busy_port(capfd):
    import web_demo_vlm
    assert web_demo_vlm.main(["--model_path", "x.pth", "--host", "not a host"]) == 2
    err = capfd.readouterr().err
    assert "not an address" in err and "in use" not in err


def test_a_damaged_feature_cache_is_named(tmp_path, tiny_tower):
    from dataset.contract import DataError
    from dataset.features import FeatureStore
    for i in range(2):
        random_image(i).save(tmp_path / f"{i}.png")
    paths = [tmp_path / "0.png", tmp_path / "1.png"]
    store = FeatureStore(tiny_tower, paths, torch.device("cpu"), tmp_path / "cache", progress=False)
    obj = torch.load(store.cache_file, weights_only=True)
    obj["features"][0, 0, 0] = float("nan")
    torch.save(obj, store.cache_file)
    with pytest.raises(DataError, match="NaN"):
        FeatureStore(tiny_tower, paths, torch.device("cpu"), tmp_path / "cache", progress=False)


@pytest.mark.parametrize("holder", ["alive", "dead", "garbage"])
def test_one_run_per_output(holder, tmp_path, capfd):
    import subprocess
    demo = converted_demo(tmp_path, 3, 8, 2, 2)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".medical_vlm_32.lock"
    proc = None
    if holder == "alive":
        proc = subprocess.Popen(["sleep", "30"])
        lock.write_text(json.dumps({"pid": proc.pid, "host": __import__("socket").gethostname(), "command": "x"}))
    elif holder == "dead":
        done = subprocess.run(["true"])
        lock.write_text(json.dumps({"pid": 999999, "host": __import__("socket").gethostname()}))
    else:
        lock.write_text("{not json")
        os.utime(lock, (time.time() - 60, time.time() - 60))  # unreadable and old: left by a crash
    capfd.readouterr()
    try:
        rc = train_main("sft", _sft(demo, out, "--epochs", "1"))
    finally:
        if proc:
            proc.kill()
    err = capfd.readouterr().err
    if holder == "alive":
        assert rc == 2 and f"PID {proc.pid}" in err and not (out / "medical_vlm_32.pth").exists()
        assert lock.exists()  # the other run's lock is left alone
    else:
        assert rc == 0 and "taking over" in err and not lock.exists()


def test_one_conversion_per_folder(tmp_path, capfd):
    import subprocess
    proc = subprocess.Popen(["sleep", "30"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".convert.lock").write_text(json.dumps({"pid": proc.pid,
                                                               "host": __import__("socket").gethostname()}))
    try:
        rc = convert_slake_dataset.main(["--demo", "--out_dir", str(tmp_path / "d"), "--demo_images", "4", "2", "2"])
    finally:
        proc.kill()
    assert rc == 2 and "in use by another run" in capfd.readouterr().err


@pytest.mark.parametrize("field, value", [("modality", 5), ("location", 7), ("content_type", ["x"]),
                                          ("answer_type", {"a": 1}), ("q_lang", 3), ("modality", True)])
def test_odd_metadata_types_convert(field, value, tmp_path):
    from dataset.demo import write_demo_release
    from dataset.slake import convert, read_release
    raw = write_demo_release(tmp_path / "raw", seed=0, n_train=4, n_val=2, n_test=2)
    for f in ("train.json", "validate.json", "test.json"):
        rows = json.loads((raw / f).read_text())
        rows[0][field] = value
        (raw / f).write_text(json.dumps(rows))
    m = convert(read_release(raw), tmp_path / "out")
    assert m["counts"]["train"] > 0 and (tmp_path / "out" / "medical_pretrain.jsonl").is_file()


def test_constrain_without_closed_answers_stops_before_generating(tmp_path, ckpt_path, monkeypatch, capfd):
    import eval_vlm
    import evaluation.runner as runner
    demo = converted_demo(tmp_path, 3, 6, 2, 2)
    train = tmp_path / "open_only.jsonl"
    train.write_text("".join(line + "\n" for line in (demo / "medical_vqa_train.jsonl").read_text().splitlines()
                             if '"OPEN"' in line))
    calls = []
    monkeypatch.setattr(runner, "_generate_all", lambda *a, **k: calls.append(1) or {})
    rc = eval_vlm.main(["--model_path", str(ckpt_path), "--data_path", str(demo / "medical_vqa_test.jsonl"),
                        "--train_path", str(train), "--images_path", str(demo / "medical_images"), "--cache_dir", "",
                        "--out_dir", str(tmp_path / "o"), "--constrain", "closed", "--vision_model", "random-tiny"])
    assert rc == 2 and not calls and "--constrain closed" in capfd.readouterr().err
