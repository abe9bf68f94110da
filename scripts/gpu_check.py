"""The one prepared GPU check: speed, memory and the real pipeline on CUDA, in one command.

Run from the repository root on a machine with a GPU (no network needed):
    bash scripts/gpu_check.sh                 # about 6-8 minutes on one H100
    python -m scripts.gpu_check --smoke       # the same steps, tiny, on the CPU (tested in CI)
Prints a table and writes out/gpu_check.json (and $OUT/gpu_check.json when $OUT is set).

Parts, each in its own process with its own time limit, so one failure or hang never
loses the others' numbers:
  sync      one training step under torch.cuda.set_sync_debug_mode("warn"): syncs counted
  train     bench_train for 26M and 104M, batch 16 (the SFT default) and 64, eager
            (epoch seconds after the feature cache, tokens/s, MFU, peak memory)
  eval      bench_eval: 1,061 test questions, 104M
  pipeline  convert --demo -> 2 SFT epochs (26M, full-size random ViT-B/16 tower, bf16,
            feature cache) -> eval_vlm.py: save, load and evaluation on CUDA
  compile   bench_train --compile, batch 64, both sizes (last: compilation takes minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SIZES = {"26M": ["--hidden_size", "512", "--num_hidden_layers", "8"],
         "104M": ["--hidden_size", "768", "--num_hidden_layers", "16"]}
SMOKE_SIZE = ["--hidden_size", "64", "--num_hidden_layers", "2", "--vision_model", "random-tiny",
              "--samples", "64", "--images", "8"]


def train_runs(smoke: bool, compiled: bool) -> list[tuple[str, list[str], int]]:
    """(name, bench_train flags, time limit in s). Eager runs come first; the compiled ones
    (minutes of compilation) run last, so a time limit cuts only them."""
    if smoke:
        return [("smoke b16 " + ("compile" if compiled else "eager"),
                 SMOKE_SIZE + ["--batch_size", "16"] + (["--compile"] if compiled else []), 300)] if not compiled else []
    if compiled:
        return [(f"{size} b64 compile", SIZES[size] + ["--batch_size", "64", "--compile", "--epochs", "3"], 200)
                for size in ("26M", "104M")]
    return [(f"{size} b{b} eager", SIZES[size] + ["--batch_size", str(b)], 150)
            for size in ("26M", "104M") for b in (16, 64)]


def run_json(cmd: list[str], limit: int, log: Path) -> dict:
    """Runs a benchmark module; its last stdout line is JSON."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=limit,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"{cmd}\n{exc.stdout or ''}\n{exc.stderr or ''}")
        return {"error": f"timed out after {limit} s"}
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:300]}"}
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": "no JSON result", "wall_s": round(time.perf_counter() - t0, 1)}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def sync_check(device: str) -> dict:
    """One real training step with CUDA's sync debugging on: every host-device sync inside
    it is reported as a warning (none expected; see tests/test_gpu_path.py)."""
    import torch

    import trainer.trainer as tr
    from model.runtime import autocast
    from dataset.features import FeatureStore
    from dataset.vqa_dataset import Sample, collate
    from model.checkpoint import build_config
    from model.tokenization import ChatEncoder, load_tokenizer
    from model.vision import load_vision_tower
    from model.vlm import MedicalVLM
    from trainer.config import TrainConfig
    from PIL import Image
    import numpy as np

    dev = torch.device(device)
    tok = load_tokenizer()
    tower = load_vision_tower("random-tiny")
    model = MedicalVLM(build_config(tok, tower, hidden_size=256, num_hidden_layers=2), tower).to(dev).train()
    enc = ChatEncoder(tok, model.config.image_tokens)
    with tempfile.TemporaryDirectory() as d:
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(Path(d) / "a.png")
        feats = FeatureStore(tower, [Path(d) / "a.png"], dev, None, progress=False)
    samples = []
    for n in (2, 9, 4, 6):
        e = enc.encode([{"role": "user", "content": "<image>\n" + "why " * n}, {"role": "assistant", "content": "Liver"}])
        samples.append(Sample(e.input_ids, e.labels, [0], {}))
    cfg = TrainConfig(hidden_size=256, num_hidden_layers=2, accumulation_steps=2)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    params, opt, scaler = tr.make_optimizer(model, cfg, dev, dtype)
    amp = autocast(dev, dtype)

    def step():
        batches = [collate(samples[:2], tok.pad_token_id, enc.image_id, 8),
                   collate(samples[2:], tok.pad_token_id, enc.image_id, 8)]
        return tr.train_step(model, model, batches, feats, opt, scaler, params, cfg, tr.Dist(), dev, amp, 1e-3)

    step()  # warm-up: lazy initialisation (optimizer state, cuBLAS handles) may sync once
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = step()
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs_in_step": len(syncs), "examples": syncs[:5], "loss_finite": bool(torch.isfinite(loss).item())}


def pipeline(smoke: bool, device: str, log: Path) -> dict:
    """The guide's stages on the demo set, on this device, in a scratch folder."""
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        data, out = Path(d) / "data", Path(d) / "out"
        model = ["--hidden_size", "64" if smoke else "512", "--num_hidden_layers", "2" if smoke else "8",
                 "--vision_model", "random-tiny" if smoke else "random", "--device", device]
        steps = [
            [py, "convert_slake_dataset.py", "--demo", "--out_dir", str(data)]
            + (["--demo_images", "12", "3", "3"] if smoke else []),
            [py, "train_sft_vlm.py", *model, "--data_path", str(data / "medical_vqa_train.jsonl"),
             "--val_path", str(data / "medical_vqa_validation.jsonl"), "--images_path", str(data / "medical_images"),
             "--cache_dir", str(data / "cache"), "--out_dir", str(out), "--epochs", "2", "--batch_size", "16",
             "--learning_rate", "1e-3", "--log_interval", "20", "--from_weight", "none"],
            [py, "eval_vlm.py", "--model_path", str(out / f"medical_vlm_{model[1]}.pth"), "--data_path",
             str(data / "medical_vqa_test.jsonl"), "--train_path", str(data / "medical_vqa_train.jsonl"),
             "--images_path", str(data / "medical_images"), "--out_dir", str(out), "--cache_dir",
             str(data / "cache"), "--device", device],
        ]
        times = []
        for cmd in steps:
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
            times.append(round(time.perf_counter() - t0, 1))
            with log.open("a") as f:
                f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
            if p.returncode != 0:
                return {"error": f"{Path(cmd[1]).name} exit {p.returncode}: "
                                 f"{(p.stderr.strip().splitlines() or [''])[-1][:300]}", "seconds": times}
        metrics = json.loads((out / "eval" / f"medical_vlm_{model[1]}" / "metrics.json").read_text())
        rows = [json.loads(line) for line in (out / f"medical_vlm_{model[1]}_metrics.jsonl").read_text().splitlines()]
    return {"seconds": dict(zip(("convert", "sft_2_epochs", "eval"), times)),
            "epoch_seconds": [r["epoch_seconds"] for r in rows if "epoch_seconds" in r],
            "final_loss": [r["loss"] for r in rows if "loss" in r][-1],
            "overall_accuracy": metrics["overall_accuracy"], "questions": metrics["count"]["all"]}


def table(result: dict) -> str:
    lines = [f"device: {result['device']} | torch {result['torch']}",
             f"{'train run':20s} {'epoch s':>8s} {'tok/s':>10s} {'q/s':>8s} {'MFU':>6s} {'peak GB':>8s} {'wall s':>7s}"]
    for name, r in result["train"].items():
        if "error" in r:
            lines.append(f"{name:20s} ERROR {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"{name:20s} {r['epoch_seconds']:8.2f} {r['tokens_per_s']:10,.0f} {r['samples_per_s']:8,.0f} "
                     f"{mfu:>6s} {str(r.get('peak_memory_gb') or '-'):>8s} {r['wall_s']:7.1f}")
    e = result["eval"]
    lines.append("eval: " + (f"{e['questions']} questions in {e['generation_seconds']:.2f} s "
                             f"({e['questions_per_s']:,.0f}/s)" if "error" not in e else f"ERROR {e['error']}"))
    s = result["sync"]
    lines.append("sync: " + (f"{s['syncs_in_step']} host-device syncs in one training step" if "error" not in s
                             else f"ERROR {s['error']}"))
    p = result["pipeline"]
    lines.append("pipeline: " + (json.dumps(p) if p else "-"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    ap.add_argument("--out", default="out/gpu_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sync", "train", "eval", "pipeline"])
    args = ap.parse_args(argv)
    import torch
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA device here; use --smoke to check the script on the CPU", file=sys.stderr)
        return 1
    device = "cuda" if cuda else "cpu"
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
              "train": {}, "eval": {}, "sync": {}, "pipeline": {}}

    def save():
        from model.atomic import atomic_write_text
        text = json.dumps(result, indent=2) + "\n"
        atomic_write_text(out, text)
        if os.environ.get("OUT"):
            atomic_write_text(Path(os.environ["OUT"]) / "gpu_check.json", text)

    if "sync" not in args.skip:
        try:
            result["sync"] = sync_check(device)
        except Exception as exc:  # report and go on: the other parts still count
            result["sync"] = {"error": f"{exc.__class__.__name__}: {exc}"}
        save()
    def train(compiled: bool):
        for name, flags_, limit in train_runs(args.smoke, compiled):
            result["train"][name] = run_json(["-m", "scripts.bench_train", *flags_, "--device", device], limit, log)
            print(name, json.dumps(result["train"][name]), flush=True)
            save()

    if "train" not in args.skip:
        train(compiled=False)
    if "eval" not in args.skip:
        eval_flags = (["--hidden_size", "64", "--num_hidden_layers", "2", "--vision_model", "random-tiny",
                       "--questions", "64"] if args.smoke else [])
        result["eval"] = run_json(["-m", "scripts.bench_eval", *eval_flags, "--device", device], 240, log)
        save()
    if "pipeline" not in args.skip:
        try:
            result["pipeline"] = pipeline(args.smoke, device, log)
        except (subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
            result["pipeline"] = {"error": f"{exc.__class__.__name__}: {exc}"}
        save()
    if "train" not in args.skip:
        train(compiled=True)
    print(table(result))
    print(f"wrote {out} (log {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
