"""Helpers shared by the tests: tiny models on CPU with fixed seeds."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model.checkpoint import build_config
from model.vlm import MedicalVLM


def make_tiny_model(tokenizer, tower, seed=0, spread=0.0, **overrides) -> MedicalVLM:
    """A small VLM; ``spread`` > 0 re-draws weights wider so greedy decoding is not stuck
    on one token (generation tests need varied outputs to be able to fail)."""
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=2048)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = MedicalVLM(build_config(tokenizer, tower, **cfg), tower)
    if spread:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and p.ndim > 1:
                    p.normal_(0, spread)
    return model.eval()


def random_image(seed: int, size=(256, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random(size) * 255).astype("uint8"))


def converted_demo(root, seed: int, n_train: int, n_val: int, n_test: int):
    """The easy demo set written under ``root`` and converted; returns the data folder."""
    from dataset.demo import write_demo_release
    from dataset.slake import convert, read_release
    write_demo_release(root / "raw", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    convert(read_release(root / "raw"), root / "data")
    return root / "data"


def train_tiny_on_demo(root, seed: int, n_train: int, n_val: int, n_test: int, cache_dir: str, epochs: int,
                       val: bool = True):
    """Builds a demo set under ``root`` and trains a 48-wide SFT model on it; returns the data folder."""
    from dataset.demo import write_demo_release
    from dataset.slake import convert, read_release
    from trainer.cli import main as train_main
    write_demo_release(root / "raw", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    convert(read_release(root / "raw"), root / "data")
    d = root / "data"
    args = ["--vision_model", "random-tiny", "--hidden_size", "48", "--num_hidden_layers", "2",
            "--num_attention_heads", "4", "--num_key_value_heads", "2", "--device", "cpu", "--num_workers", "0",
            "--images_path", str(d / "medical_images"), "--out_dir", str(root / "out"), "--cache_dir", cache_dir,
            "--epochs", str(epochs), "--batch_size", "8", "--learning_rate", "3e-3", "--log_interval", "50",
            "--data_path", str(d / "medical_vqa_train.jsonl"),
            "--val_path", str(d / "medical_vqa_validation.jsonl") if val else ""]
    assert train_main("sft", args) == 0
    return d
