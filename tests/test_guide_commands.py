"""The guide's commands, run as written in a copy of the repository: only the data source
(--demo, since the hub is unreachable here) and size flags are added, and a tiny tower in
CLIP's hub layout stands at model/vision_model/clip-vit-base-patch16."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from model.vision import CLIP_MEAN, CLIP_STD, _ImageProcessor

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--hidden_size", "48", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--batch_size", "8"]


def copy_repo(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    return dst


def save_tiny_clip(folder: Path):
    """A full CLIPModel (text + vision), as `git clone` of openai/clip-vit-base-patch16 gives."""
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=100, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=224, patch_size=16), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    _ImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                    image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)


def run(cwd: Path, *args: str, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_guide_commands_as_written(tmp_path):
    root = copy_repo(tmp_path / "repo")
    # without CLIP weights: the exact clone command
    res = run(root, "train_pretrain_vlm.py", "--epochs", "4")
    assert res.returncode == 2
    assert "git clone https://huggingface.co/openai/clip-vit-base-patch16 model/vision_model/clip-vit-base-patch16" \
        in res.stderr
    # offline, the default hub source stops with the alternatives and writes nothing
    res = run(root, "convert_slake_dataset.py")
    assert res.returncode == 2 and "--demo" in res.stderr and not (root / "dataset" / "manifest.json").exists()

    res = run(root, "convert_slake_dataset.py", "--demo", "--demo_images", "24", "4", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    save_tiny_clip(root / "model" / "vision_model" / "clip-vit-base-patch16")

    res = run(root, "train_pretrain_vlm.py", "--epochs", "4", *SIZE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (root / "out" / "medical_pretrain_vlm_48.pth").is_file()
    assert "RANDOM" not in res.stderr  # a real (CLIP-format) tower, not a random stand-in
    res = run(root, "train_sft_vlm.py", "--epochs", "4", *SIZE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "starting from" in res.stderr and "medical_pretrain_vlm_48.pth" in res.stderr
    assert (root / "out" / "medical_vlm_48.pth").is_file()
    assert (root / "out" / "medical_vlm_48_loss.png").is_file()

    res = run(root, "eval_vlm.py", "--model_mode", "1", "--hidden_size", "48")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((root / "out" / "eval" / "medical_vlm_48" / "metrics.json").read_text())
    assert metrics["count"]["all"] == len((root / "dataset" / "medical_vqa_test.jsonl").read_text().splitlines())
    assert "majority per question" in res.stdout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "web_demo_vlm.py", "--model_path", "out/medical_vlm_48.pth",
                               "--port", str(port)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "web demo did not start"
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def readme_demo_block() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- demo-guide -->", 1)[1].split("<!-- /demo-guide -->", 1)[0]
    return [line.split()[1:] for line in block.splitlines() if line.startswith("python ")]


@pytest.mark.slow
def test_readme_demo_block_runs(tmp_path):
    """The README's 'guide's commands on the built-in demo data' block, run in a copy of the
    repository; only the scale is cut for the suite (40 training images, 1 epoch per stage)."""
    commands = readme_demo_block()
    assert [c[0] for c in commands] == ["convert_slake_dataset.py", "train_pretrain_vlm.py", "train_sft_vlm.py",
                                       "eval_vlm.py", "web_demo_vlm.py"]
    root = copy_repo(tmp_path / "repo")
    for args in commands[:4]:
        args = ["1" if a == "4" and prev == "--epochs" else a for prev, a in zip([""] + args, args)]
        if args[0] == "convert_slake_dataset.py":
            args += ["--demo_images", "40", "4", "4"]
        res = run(root, *args)
        assert res.returncode == 0, (args, res.stdout[-2000:], res.stderr[-2000:])
    assert (root / "out" / "medical_vlm_128.pth").is_file()
    metrics = json.loads((root / "out" / "eval" / "medical_vlm_128" / "metrics.json").read_text())
    assert metrics["count"]["all"] > 0 and (root / "out" / "eval" / "medical_vlm_128" / "baselines.png").is_file()
    # the easy demo has organ and lesion boxes: its evaluation plays the pointing game
    assert metrics["pointing"]["count"] > 0 and 0 <= metrics["pointing"]["hit_rate"] <= 1
    import web_demo_vlm
    demo = web_demo_vlm.parse_args(commands[4][1:])
    assert (root / demo.model_path).is_file()
