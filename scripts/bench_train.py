"""Benchmark one SFT epoch on SLAKE-sized synthetic data and print JSON.

Run from any folder:
    python -m scripts.bench_train                                   # 104M model, CLIP-shaped random tower
    python -m scripts.bench_train --hidden_size 512 --num_hidden_layers 8
    python -m scripts.bench_train --hidden_size 128 --num_hidden_layers 2 --vision_model random-tiny --samples 512
    # the CPU default path against the batch-feed thread (#29), one job at a time, alternating:
    python -m scripts.bench_train --hidden_size 128 --num_hidden_layers 4 --vision_model random-tiny --prefetch auto
    python -m scripts.bench_train --hidden_size 128 --num_hidden_layers 4 --vision_model random-tiny --prefetch on
Data: 4,919 questions over 450 images of 224 px with answers of about two words (as SLAKE's
English training split). The first epoch builds the frozen-feature cache and warms up;
the reported epoch is the next one. MFU uses 6 x trainable parameters + attention FLOPs
per token against the GPU's peak bf16 dense throughput (--peak_tflops; H100 SXM: 989).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infra import flags
from infra.runtime import setup_logging
from trainer.config import TrainConfig
from trainer.trainer import train

QUESTIONS = [("What modality is used to take this image?", ["CT", "MRI", "X-Ray"]),
             ("Which organ is abnormal?", ["Left Lung", "Liver", "Brain Tissue", "Right Kidney"]),
             ("Is this image normal?", ["Yes", "No"]), ("Where is the lesion located?", ["Left Lung", "Right"]),
             ("How many kidneys are there in this image?", ["2", "1"]),
             ("What scanning plane does this image belong to?", ["Transverse Plane", "Coronal Plane"])]


def make_data(root: Path, n_questions: int, n_images: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    img_dir = root / "medical_images"
    img_dir.mkdir(parents=True)
    for i in range(n_images):
        arr = np.random.default_rng(i).integers(0, 256, (224, 224), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / f"{i}.png")
    with (root / "train.jsonl").open("w") as f:
        for i in range(n_questions):
            q, answers = rng.choice(QUESTIONS)
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"<image>\n{q}"},
                                                  {"role": "assistant", "content": rng.choice(answers)}],
                                "image": f"{i % n_images}.png", "answer_type": "OPEN"}) + "\n")
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden_size", type=flags.positive_int, default=768)
    ap.add_argument("--num_hidden_layers", type=flags.positive_int, default=16)
    ap.add_argument("--vision_model", default="random", help="random has CLIP ViT-B/16's shape and cost")
    ap.add_argument("--batch_size", type=flags.positive_int, default=32)
    ap.add_argument("--learning_rate", type=flags.positive_float, default=1e-4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--samples", type=flags.positive_int, default=4919, help="questions (SLAKE train: 4,919)")
    ap.add_argument("--images", type=flags.positive_int, default=450)
    ap.add_argument("--compile", nargs="?", const="on", default="off", choices=["auto", "on", "graphs", "off"],
                    help="as train_sft_vlm.py's --compile (default here: off, the eager baseline)")
    ap.add_argument("--epochs", type=flags.int_range(2), default=2, help="the last one is reported")
    ap.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                    help="the batch-feed thread, as train_sft_vlm.py's --prefetch (auto: on with CUDA only)")
    ap.add_argument("--pack_questions", type=flags.positive_int, default=1, help="shared-prefix packing (see README)")
    ap.add_argument("--cudnn_attention", action="store_true",
                    help="allow the cuDNN attention kernel, which the toolkit turns off (A/B in scripts/gpu_check.py)")
    ap.add_argument("--peak_tflops", type=flags.positive_float, default=989.0)
    args = ap.parse_args(argv)
    setup_logging()
    if args.cudnn_attention:
        os.environ["MEDVLM_CUDNN_ATTENTION"] = "1"  # read by infra.runtime.configure_cuda
    with tempfile.TemporaryDirectory() as d:
        root = make_data(Path(d), args.samples, min(args.images, args.samples))
        cfg = TrainConfig(stage="sft", data_path=str(root / "train.jsonl"), val_path="",
                          images_path=str(root / "medical_images"), cache_dir=str(root / "cache"),
                          out_dir=str(root / "out"), hidden_size=args.hidden_size,
                          num_hidden_layers=args.num_hidden_layers, vision_model=args.vision_model, epochs=args.epochs,
                          batch_size=args.batch_size, learning_rate=args.learning_rate, dtype=args.dtype,
                          device=args.device, from_weight="none", log_interval=50, compile=args.compile,
                          num_workers=0, pack_questions=args.pack_questions,
                          prefetch={"auto": None, "on": True, "off": False}[args.prefetch])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out = train(cfg)
    seconds = out["epoch_seconds"][-1]
    steps_per_epoch = out["samples"] // args.batch_size
    used_seq = steps_per_epoch * args.batch_size  # sequences (packed groups when packing)
    used = out["questions"] * used_seq / out["samples"]  # questions answered per epoch
    tokens = out["tokens"] * used_seq / out["samples"]
    seq = out["tokens"] / out["samples"]
    # attention FLOPs counted over the whole (packed) sequence: an upper bound when packing
    flops_per_token = 6 * out["trainable_params"] + 12 * args.num_hidden_layers * args.hidden_size * seq
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
        "vision_model": args.vision_model, "batch_size": args.batch_size, "pack_questions": args.pack_questions,
        "prefetch": args.prefetch,
        "samples": round(used), "compile": out["compile"], "step_shapes": out["step_shapes"],
        "compile_seconds": round(sum(out["compile_seconds"]), 3),
        "epoch_seconds": round(seconds, 3), "first_epoch_seconds": round(out["epoch_seconds"][0], 3),
        "samples_per_s": round(used / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "mean_seq_len": round(seq, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "mfu": round(flops_per_token * tokens / seconds / (args.peak_tflops * 1e12), 4) if cuda else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
