"""Benchmark test-split evaluation (batched generation with the KV cache and cached features).

Run from any folder:
    python -m scripts.bench_eval                              # 104M model, 1,061 questions
    python -m scripts.bench_eval --hidden_size 128 --num_hidden_layers 2 --vision_model random-tiny
A randomly initialised model of the requested size answers 1,061 questions over 96 images
(SLAKE's English test split); the end token is disabled so every answer has exactly
--answer_tokens tokens (SLAKE answers are 1-4 tokens plus the end token). The feature
cache is built first and not timed; prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dataset.features import FeatureStore
from evaluation.runner import evaluate_split
from model.checkpoint import build_config, load_model, save_checkpoint
from infra import flags
from infra.runtime import pick_device, setup_logging
from model.tokenization import load_tokenizer
from model.vision import load_vision_tower
from model.vlm import MedicalVLM
from scripts.bench_train import make_data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden_size", type=flags.positive_int, default=768)
    ap.add_argument("--num_hidden_layers", type=flags.positive_int, default=16)
    ap.add_argument("--vision_model", default="random")
    ap.add_argument("--batch_size", type=flags.positive_int, default=128)
    ap.add_argument("--answer_tokens", type=flags.positive_int, default=4)
    ap.add_argument("--questions", type=flags.positive_int, default=1061)
    ap.add_argument("--cudnn_attention", action="store_true",
                    help="allow the cuDNN attention kernel, which the toolkit turns off (A/B in scripts/gpu_check.py)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    setup_logging()
    if args.cudnn_attention:
        os.environ["MEDVLM_CUDNN_ATTENTION"] = "1"  # read by infra.runtime.configure_cuda
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as d:
        root = make_data(Path(d), args.questions, 96)
        (root / "train.jsonl").rename(root / "test.jsonl")
        text = (root / "test.jsonl").read_text().replace('"OPEN"', '"CLOSED"', args.questions // 3)
        (root / "test.jsonl").write_text(text)
        tok = load_tokenizer()
        tower = load_vision_tower(args.vision_model)
        model = MedicalVLM(build_config(tok, tower, hidden_size=args.hidden_size,
                                        num_hidden_layers=args.num_hidden_layers), tower)
        save_checkpoint(root / "m.pth", model, tok, "sft", 0)
        ckpt = load_model(root / "m.pth", device)
        ckpt.model.config.eos_token_id = -1  # fixed-length answers: comparable timings
        paths = sorted((root / "medical_images").iterdir())
        FeatureStore(ckpt.model.vision_tower, paths, device, root / "cache")  # build, untimed
        t0 = time.perf_counter()
        m = evaluate_split(ckpt, root / "test.jsonl", root / "medical_images", None, root / "eval", device,
                           args.batch_size, args.answer_tokens, root / "cache")
        total = time.perf_counter() - t0
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
              "questions": m["count"]["all"], "answer_tokens": args.answer_tokens, "batch_size": args.batch_size,
              "generation_seconds": m["generation_seconds"], "total_seconds": round(total, 3),
              "questions_per_s": round(m["count"]["all"] / m["generation_seconds"], 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
