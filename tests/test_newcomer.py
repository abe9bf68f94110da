"""A newcomer's path II (issue #19): help that explains every flag, answers at once, and
hints that name the command to run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import GROUPS, HELP, TrainConfig, parse_train_args
from dataclasses import fields

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_pretrain_vlm.py", "train_sft_vlm.py", "eval_vlm.py", "web_demo_vlm.py", "convert_slake_dataset.py"]


def test_every_training_flag_has_a_group_and_a_help_line():
    names = [f.name for f in fields(TrainConfig) if f.name != "stage" and f.metadata.get("flag", True)]
    grouped = [n for ns in GROUPS.values() for n in ns]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    missing = [n for n in names if not HELP.get(n)]
    assert not missing, f"flags without help: {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_needs_no_torch_and_shows_defaults(script):
    """--help parses before any heavy import (torch, transformers): it answers in a blink."""
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'gradio', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out, out[-300:]
    flags = [line for line in out.splitlines() if line.strip().startswith("--") and "help" not in line]
    assert flags and "default" in out and "--device" not in out or "cuda" in out


def test_missing_stage_two_checkpoint_points_at_stage_one_and_other_sizes(tmp_path, capfd):
    import eval_vlm
    (tmp_path / "medical_pretrain_vlm_768.pth").write_bytes(b"x")
    (tmp_path / "medical_vlm_512.pth").write_bytes(b"x")
    assert eval_vlm.main(["--model_mode", "1", "--out_dir", str(tmp_path)]) == 1
    err = capfd.readouterr().err
    assert "train_sft_vlm.py --hidden_size 768" in err
    assert "medical_vlm_512.pth" in err and "medical_pretrain_vlm_768.pth" in err


def test_typed_paths_count_from_the_working_directory(tmp_path, monkeypatch):
    """A path the user types is relative to where they stand; the defaults stay in the repository."""
    from model.config import resolve_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"x")
    cfg = parse_train_args("sft", ["--data_path", "my/train.jsonl", "--out_dir", "runs", "--from_weight", "w.pth",
                                   "--vision_model", "openai/clip-vit-base-patch16"])
    assert cfg.data_path == str(tmp_path / "my" / "train.jsonl") and cfg.out_dir == str(tmp_path / "runs")
    assert cfg.from_weight == str(tmp_path / "w.pth")
    assert cfg.vision_model == "openai/clip-vit-base-patch16"  # a hub id stays one
    assert resolve_path(cfg.images_path) == ROOT / "dataset" / "medical_images"  # a default: the repository's
    import eval_vlm
    args = eval_vlm.parse_args(["--image", "scan.png", "--question", "Is it?"])
    assert args.image == str(tmp_path / "scan.png") and args.out_dir == "out"
