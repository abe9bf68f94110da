"""Ctrl-C and SIGTERM never lose a run: a resume state at the step it stopped, --resume to the
same weights as an uninterrupted run, advice that names only this run's resume state, and a
test suite that Ctrl-C stops."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.cli import main
from tests.test_train import demo_data, stage_args  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("sig, at_step", [(signal.SIGINT, 3), (signal.SIGTERM, 5), (signal.SIGINT, 1)])
def test_signal_saves_resume_state_and_resume_matches(demo_data, tmp_path, monkeypatch, capsys, sig, at_step):  # noqa: F811
    import trainer.trainer as tr
    ref = tmp_path / "ref"
    args = lambda out: stage_args(demo_data, out, epochs=2, batch_size=4, save_interval=0)  # noqa: E731 (default saving)
    assert main("sft", args(ref)) == 0
    out = tmp_path / "run"
    real_step, calls = tr.train_step, []

    def step_then_signal(*a, **k):
        loss = real_step(*a, **k)
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), sig)  # as a user's Ctrl-C (or a scheduler's SIGTERM) mid-run
        return loss
    monkeypatch.setattr(tr, "train_step", step_then_signal)
    capsys.readouterr()
    if sig == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):
            main("sft", args(out))
    else:
        assert main("sft", args(out)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    resume = out / "medical_vlm_32_resume.pth"
    assert resume.is_file() and torch.load(resume, map_location="cpu", weights_only=False)["step"] == at_step
    assert f"stopped at step {at_step}/" in err and "continue with --resume" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back
    monkeypatch.setattr(tr, "train_step", real_step)
    assert main("sft", args(out) + ["--resume"]) == 0
    a, b = _weights(ref / "medical_vlm_32.pth"), _weights(out / "medical_vlm_32.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_advice_never_names_an_older_resume_state(demo_data, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A resume state left by an earlier run with other settings is not offered when this run is
    interrupted before it saved its own."""
    import trainer.trainer as tr
    out = tmp_path / "run"
    assert main("sft", stage_args(demo_data, out, epochs=1, batch_size=4)) == 0  # leaves a resume state (epochs 1)
    assert (out / "medical_vlm_32_resume.pth").is_file()

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(tr, "train_step", interrupt)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        main("sft", stage_args(demo_data, out, epochs=3, batch_size=4))
    err = capsys.readouterr().err
    assert "interrupted at step 0" in err and "--resume" not in err


def test_ctrl_c_stops_the_test_suite(tmp_path):
    """SIGINT to a pytest process in the middle of a training test stops the whole run at once
    (pytest's 'KeyboardInterrupt', exit code 2), instead of failing that test and going on."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import time\n"
        "from tests.test_train import demo_data, stage_args  # noqa\n"
        "import trainer.trainer as tr\n"
        "from trainer.cli import main\n"
        "def test_a_training_run(demo_data, tmp_path, monkeypatch):\n"
        "    real = tr.train_step\n"
        "    def slow(*a, **k):\n"
        "        open(r'%s', 'w').write('training'); time.sleep(0.5); return real(*a, **k)\n"
        "    monkeypatch.setattr(tr, 'train_step', slow)\n"
        "    main('sft', stage_args(demo_data, tmp_path, epochs=50, batch_size=4))\n"
        "def test_after():\n"
        "    open(r'%s', 'w').write('went on')\n" % (tmp_path / "started", tmp_path / "went_on"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                             "-c", str(REPO / "pytest.ini"), str(probe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "KeyboardInterrupt" in out and not (tmp_path / "went_on").exists(), out


@pytest.mark.parametrize("flag, value", [("debias", 1.0), ("pair_closed", True), ("balance_closed", True),
                                         ("prior_weight", 0.5), ("projector_lr_scale", 10.0), ("patch_loss", 1.0)])
def test_resume_state_of_a_removed_lever_is_a_clear_message(demo_data, tmp_path, capsys, flag, value):  # noqa: F811
    """A resume state written with a flag that has since been removed (it lost its measurement) is
    refused with the flag named; one that recorded the flag at its off value resumes."""
    out = tmp_path / "run"
    args = stage_args(demo_data, out, epochs=2, batch_size=4, stop_at_step=2)
    assert main("sft", args) == 0
    resume = out / "medical_vlm_32_resume.pth"
    state = torch.load(resume, map_location="cpu", weights_only=False)
    from trainer.checkpointing import REMOVED_FLAGS
    state["train_config"][flag] = REMOVED_FLAGS[flag][0]  # an older run with the lever off: fine
    torch.save(state, resume)
    assert main("sft", stage_args(demo_data, out, epochs=2, batch_size=4, stop_at_step=3) + ["--resume"]) == 0
    state = torch.load(resume, map_location="cpu", weights_only=False)
    state["train_config"][flag] = value
    torch.save(state, resume)
    capsys.readouterr()
    assert main("sft", stage_args(demo_data, out, epochs=2, batch_size=4) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--{flag} {value}" in err and "no longer has" in err and "Traceback" not in err


def _edit_rows(path: Path, how: str):
    import json
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if how == "answer":  # one answer re-labelled
        rows[3]["conversations"][-1]["content"] += " changed"
    elif how == "added":
        rows.append(rows[0])
    elif how == "removed":
        rows.pop(5)
    elif how == "reordered":
        rows[0], rows[-1] = rows[-1], rows[0]
    elif how == "image":  # a question moved to another image
        rows[2]["image"] = next(r["image"] for r in rows if r["image"] != rows[2]["image"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("how", ["answer", "added", "removed", "reordered", "image"])
def test_resume_refuses_changed_training_data(demo_data, tmp_path, capsys, how):  # noqa: F811
    """--resume continues only on the data the run trained on: an edited, re-converted or re-ordered
    data file under the same path is refused with both sample counts and what to do; the data
    moved to another folder (same contents) resumes."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    out = tmp_path / "run"
    assert main("sft", stage_args(data, out, epochs=2, batch_size=4, stop_at_step=2)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert main("sft", stage_args(moved, out, epochs=2, batch_size=4, stop_at_step=3) + ["--resume"]) == 0
    _edit_rows(moved / "medical_vqa_train.jsonl", how)
    before = (out / "medical_vlm_32_resume.pth").read_bytes()
    capsys.readouterr()
    assert main("sft", stage_args(moved, out, epochs=2, batch_size=4) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "the training data changed" in err and "start fresh without --resume" in err and "Traceback" not in err
    assert "medical_vqa_train.jsonl" in err
    assert (out / "medical_vlm_32_resume.pth").read_bytes() == before  # nothing overwritten


def test_resume_state_from_before_the_data_fingerprint_resumes_with_a_warning(demo_data, tmp_path, capsys):  # noqa: F811
    """A resume state written before the fingerprint (no "data", no look_contrast in its config)
    still resumes, saying it cannot check the data; with a different --look_contrast it is refused."""
    out = tmp_path / "run"
    assert main("sft", stage_args(demo_data, out, epochs=2, batch_size=4, stop_at_step=2,
                                  look_contrast="none")) == 0
    resume = out / "medical_vlm_32_resume.pth"
    state = torch.load(resume, map_location="cpu", weights_only=False)
    assert state["data"]["samples"] > 0 and len(state["data"]["sha"]) == 16
    del state["data"], state["train_config"]["look_contrast"]
    torch.save(state, resume)
    assert main("sft", stage_args(demo_data, out, epochs=2, batch_size=4) + ["--resume"]) == 2  # look_contrast differs
    capsys.readouterr()
    assert main("sft", stage_args(demo_data, out, epochs=2, batch_size=4, stop_at_step=3,
                                  look_contrast="none") + ["--resume"]) == 0
    said = "".join(capsys.readouterr())
    assert "does not record which training data" in said and "resumed from" in said
    # a state of a removed value (closed questions only; the mean comparison) names the commit that had it
    for value, commit in (("contrast", "a0d7012"), ("all", "a9e8ae9"), ("nearest", "88f56f9")):
        state = torch.load(resume, map_location="cpu", weights_only=False)
        state["train_config"]["look_contrast"] = value
        torch.save(state, resume)
        capsys.readouterr()
        assert main("sft", stage_args(demo_data, out, epochs=2, batch_size=4) + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert f"--look_contrast {value}" in err and commit in err and "no longer has" in err
