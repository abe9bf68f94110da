"""The one prepared GPU check: speed, memory and the real pipeline on CUDA, in one command.

Run from the repository root on a machine with a GPU (no network needed):
    bash scripts/gpu_check.sh                 # at most --budget_s 420 s
    python -m scripts.gpu_check --smoke       # the same steps, tiny, on the CPU (tested in CI)
Prints a table and writes out/gpu_check.json (and $OUT/gpu_check.json when $OUT is set).

Parts, in this order, each with its own time limit (the benchmarks in their own process), so one
failure or hang never loses the others' numbers:
  sync      one training step under torch.cuda.set_sync_debug_mode("warn"): syncs counted
  attention which SDPA kernel the 104M layer shape runs, causal (training) and masked (packing, eval)
  profile   10 training steps of the 26M model at batch 16 under torch.profiler, eager and captured
            (--compile graphs): kernels per step, GPU busy time and its share of the wall time
  train     bench_train at the guide's default flags (batch 16), eager, 26M and 104M
            (epoch seconds after the feature cache, tokens/s, MFU, peak memory)
  compile   bench_train at batch 16 with --compile graphs and on (26M, 104M), then 104M batch 64
            graphs (the best flags); each run compiles for tens of seconds
  eval      bench_eval: 1,061 test questions, 104M
  backends  (only with --only backends) bench_eval and the 26M batch-16 epoch, each also with the
            cuDNN attention kernel allowed
  memory    peak memory of the 104M step at batch 8/16/32 (and 16 captured); the largest batch
            that fits an 8 GB card
  pipeline  the guide for 104M with every default: convert --demo, pretrain 4 epochs, SFT 4
            epochs, eval_vlm.py --model_mode 1 (wall time per stage, cache and compile included)
--only / --skip pick parts by these names.
--budget_s (default 420) caps the whole run: each part's limit is cut to the time left and parts
that no longer fit are skipped and marked so, so a lent GPU's minutes leave room for a rerun.
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
    """(name, bench_train flags, time limit in s). The guide's default flags (batch 16) first:
    eager in the ``train`` part; captured (``--compile graphs``) and compiled (``on``) in the
    ``compile`` part, which runs last (compilation takes tens of seconds per run), then the
    best flags (104M at batch 64)."""
    if smoke:
        return [] if compiled else [("smoke b16 eager", SMOKE_SIZE + ["--batch_size", "16"], 300)]
    if compiled:
        return [(f"{size} b{b} {mode}", SIZES[size] + ["--batch_size", str(b), "--compile", mode, "--epochs", "2"], 150)
                for size, b, mode in (("26M", 16, "graphs"), ("104M", 16, "graphs"), ("26M", 16, "on"),
                                      ("104M", 16, "on"), ("104M", 64, "graphs"))]
    return [(f"{size} b16 eager", SIZES[size] + ["--batch_size", "16"], 150) for size in ("26M", "104M")]


# Issue #20's targets on one H100/H200 (after the feature cache): SLAKE-sized SFT epoch at the
# default flags (batch 16) and at the best flags; evaluation; the guide end to end for 104M.
TARGET_EPOCH_S = {"26M": 1.5, "104M": 3.0}
TARGET_BEST_EPOCH_S = {"26M": 1.0, "104M": 2.0}
TARGET_EVAL_S = 1.0
TARGET_GUIDE_S = 90.0
CONSUMER_GB = 8.0  # the guide's user: one 8 GB card


class Budget:
    """Wall-clock budget for the whole check: a part gets min(its limit, time left - reserve)."""

    def __init__(self, seconds: float, reserve: float = 10.0):
        self.deadline = time.perf_counter() + seconds
        self.reserve = reserve

    def limit(self, wanted: float) -> int:
        return int(max(0.0, min(wanted, self.deadline - time.perf_counter() - self.reserve)))


SKIPPED = {"error": "skipped: the time budget (--budget_s) was spent"}
MIN_PART_S = 15  # a part with less time than this left is skipped rather than started


def run_json(cmd: list[str], limit: int, log: Path) -> dict:
    """Runs a benchmark module; its last stdout line is JSON."""
    if limit < MIN_PART_S:
        return dict(SKIPPED)
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


def training_step(device: str, size: dict, tower: str, questions: list[str], micro_batches: int = 1,
                  compiled: str = "off"):
    """One image's questions as a real training step, built the way the trainer builds it: the
    product's device settings and compute dtype, its optimizer, collate and ``train_step``.
    Returns (device, a function that runs one optimizer step, the host batches)."""
    import numpy as np
    from PIL import Image

    import trainer.step as tr
    from trainer.distributed import Dist
    from dataset.features import FeatureStore
    from dataset.vqa_dataset import Sample, collate, plan_shapes
    from model.checkpoint import build_config
    from infra.runtime import autocast, compute_dtype, pick_device
    from model.tokenization import ChatEncoder, load_tokenizer
    from model.vision import load_vision_tower
    from model.vlm import MedicalVLM
    from trainer.config import TrainConfig

    dev = pick_device(device)  # the product's CUDA settings (infra.runtime.configure_cuda)
    tok = load_tokenizer()
    vision = load_vision_tower(tower)
    model = MedicalVLM(build_config(tok, vision, **size), vision).to(dev).train()
    enc = ChatEncoder(tok, model.config.image_tokens)
    with tempfile.TemporaryDirectory() as d:
        Image.fromarray(np.zeros((224, 224), np.uint8)).save(Path(d) / "a.png")
        feats = FeatureStore(vision, [Path(d) / "a.png"], dev, None, progress=False)
    samples = []
    for q in questions:
        e = enc.encode([{"role": "user", "content": "<image>\n" + q}, {"role": "assistant", "content": "Left Lung"}])
        samples.append(Sample(e.input_ids, e.labels, [0], {}))
    cfg = TrainConfig(**size, accumulation_steps=micro_batches)
    dtype = compute_dtype("auto", dev)
    params, opt, scaler = tr.make_optimizer(model, cfg, dev, dtype)
    amp = autocast(dev, dtype)
    per = len(samples) // micro_batches
    shapes, runner = None, model
    if compiled != "off":  # as the trainer does: fixed shapes, the forward compiled
        shapes = plan_shapes(samples, per)
        runner = tr.compile_model(model, compiled if dev.type == "cuda" else "on", None)
    batches = [collate(samples[i * per:(i + 1) * per], tok.pad_token_id, enc.image_id, tr.PAD_MULTIPLE, shapes)
               for i in range(micro_batches)]

    def step():
        return tr.train_step(runner, model, batches, feats, opt, scaler, params, cfg, Dist(), dev, amp, 1e-4,
                             graphs=compiled == "graphs" and dev.type == "cuda")
    return dev, step, batches


def sync_check(device: str) -> dict:
    """One real training step with CUDA's sync debugging on: every host-device sync inside
    it is reported as a warning (none expected; see tests/test_gpu_path.py)."""
    import torch

    dev, step, _ = training_step(device, dict(hidden_size=256, num_hidden_layers=2), "random-tiny",
                                 ["why " * n for n in (2, 9, 4, 6)], micro_batches=2)
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
    # torch also warns once that the sync debug mode is a prototype: that notice is no sync
    syncs = [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message).lower()
             and "debug mode is a prototype" not in str(w.message)]
    return {"syncs_in_step": len(syncs), "examples": syncs[:5], "loss_finite": bool(torch.isfinite(loss).item())}


def attention_check(device: str, smoke: bool) -> dict:
    """Which scaled-dot-product-attention kernel one decoder layer of the 104M shape runs
    (forward and backward, bf16 on CUDA), without a mask (training, causal) and with the
    boolean mask of packed questions and batched evaluation. Read from the aten op names
    the profiler records: flash, efficient (memory-efficient), cudnn or math."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from model.checkpoint import build_config
    from model.language_model import MiniMindLM
    from infra.runtime import autocast, compute_dtype, pick_device
    from model.tokenization import load_tokenizer

    dev = pick_device(device)  # the product's CUDA settings (infra.runtime.configure_cuda)
    size = dict(hidden_size=64, num_hidden_layers=1) if smoke else dict(hidden_size=768, num_hidden_layers=1)
    cfg = build_config(load_tokenizer(), None, **size)
    lm = MiniMindLM(cfg).to(dev).train()
    dtype = compute_dtype("auto", dev)
    b, t = (2, 32) if smoke else (16, 320)
    x = torch.randn(b, t, cfg.hidden_size, device=dev, requires_grad=True)
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    result = {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
              "batch": b, "length": t}
    for name, mask in (("causal", None), ("masked", causal.expand(b, 1, t, t))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with autocast(dev, dtype):
                out = lm(x, attn_mask=mask)
            out.float().square().mean().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key
                      and e.key != "aten::scaled_dot_product_attention"})
        kinds = sorted({k for k in ("flash", "efficient", "cudnn", "math") if any(k in op for op in ops)})
        result[name] = {"kernels": kinds, "ops": ops}
    return result


def step_profile(device: str, smoke: bool, steps: int = 10) -> dict:
    """Training steps of the 26M model at the SFT default batch (16 questions of about 220
    tokens, 196 image tokens each) under torch.profiler, eager and (on CUDA) captured as CUDA
    graphs (--compile graphs). Kernels per step and GPU busy time per step against wall time
    per step: when the wall time is much longer than the busy time, the step is bound by
    kernel launches (Python and dispatcher), not by the GPU (target: busy >= 70 %)."""
    import torch
    modes = ["off"] if smoke or not torch.cuda.is_available() else ["off", "graphs"]
    return {("eager" if m == "off" else m): _profile_mode(device, smoke, steps, m) for m in modes}


def _profile_mode(device: str, smoke: bool, steps: int, compiled: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    size = dict(hidden_size=64, num_hidden_layers=2) if smoke else dict(hidden_size=512, num_hidden_layers=8)
    dev, step, (batch,) = training_step(device, size, "random-tiny" if smoke else "random",
                                        ["Which organ is abnormal in this scan" + " now" * (n % 5) for n in range(16)],
                                        compiled=compiled)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: kernels chosen, allocator and optimizer state settled
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    result = {"batch": 16, "width": int(batch["input_ids"].shape[1]), "wall_ms_per_step": round(wall_ms, 2),
              "aten_ops_per_step": round(ops / steps)}
    if dev.type == "cuda":
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        busy_us = sum(getattr(e, "self_device_time_total", 0) for e in kernels)
        result.update({"kernels_per_step": round(sum(e.count for e in kernels) / steps),
                       "gpu_busy_ms_per_step": round(busy_us / steps / 1e3, 2),
                       "gpu_busy_share": round(busy_us / steps / 1e3 / wall_ms, 3),
                       "top_kernels_ms": {e.key[:80]: round(getattr(e, "self_device_time_total", 0) / steps / 1e3, 3)
                                          for e in sorted(kernels, key=lambda e: -getattr(e, "self_device_time_total", 0))[:8]}})
    return result


def memory_check(device: str, smoke: bool) -> dict:
    """Peak GPU memory of a 104M training step at the default flags (eager, and captured at
    batch 16), per batch size, and the largest batch that fits the guide's 8 GB card by a
    linear fit of peak memory over the batch (weights, gradients and AdamW state are the
    intercept). The run's feature cache adds ~0.15 GB for SLAKE's 642 images (bf16)."""
    import gc

    import torch
    size = dict(hidden_size=64, num_hidden_layers=2) if smoke else dict(hidden_size=768, num_hidden_layers=16)
    tower = "random-tiny" if smoke else "random"
    cuda = torch.cuda.is_available() and device == "cuda"
    rows = {}
    for batch, mode in ((8, "off"), (16, "off"), (32, "off"), (16, "graphs")):
        if mode != "off" and not cuda:
            continue
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _, step, _ = training_step(device, size, tower, ["Which organ is abnormal in this scan now"] * batch,
                                   compiled=mode)
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
        rows[f"b{batch} {'eager' if mode == 'off' else mode}"] = \
            round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None
        del step
    result = {"peak_gb": rows}
    if cuda:
        slope = (rows["b32 eager"] - rows["b8 eager"]) / 24
        base = rows["b8 eager"] - 8 * slope
        usable = CONSUMER_GB * 0.9  # the driver, the CUDA context and fragmentation take the rest
        result.update({"gb_per_sample": round(slope, 4), "fixed_gb": round(base, 3),
                       "largest_batch_8gb": int((usable - base) // slope) if slope > 0 else None,
                       "headroom_gb_at_b16": round(CONSUMER_GB - rows["b16 eager"], 2)})
    return result


def pipeline(smoke: bool, device: str, log: Path, budget: Budget) -> dict:
    """The guide end to end in a scratch folder, with its own flags (104M, every default; the
    random ViT-B/16-shaped tower stands in for CLIP): convert --demo, stage 1 for 4 epochs,
    stage 2 for 4 epochs, evaluation of the SFT model. Wall time per stage, all included
    (the feature cache, compilation when --compile auto chooses it)."""
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        data, out = Path(d) / "data", Path(d) / "out"
        model = (["--hidden_size", "64", "--num_hidden_layers", "2", "--vision_model", "random-tiny"] if smoke
                 else ["--vision_model", "random"])
        size = "64" if smoke else "768"
        common = [*model, "--images_path", str(data / "medical_images"), "--cache_dir", str(data / "cache"),
                  "--out_dir", str(out), "--device", device] + (["--epochs", "1", "--batch_size", "4"] if smoke else [])
        steps = [
            [py, "convert_slake_dataset.py", "--demo", "--out_dir", str(data)]
            + (["--demo_images", "12", "3", "3"] if smoke else []),
            [py, "train_pretrain_vlm.py", *common, "--data_path", str(data / "medical_pretrain.jsonl")],
            [py, "train_sft_vlm.py", *common, "--data_path", str(data / "medical_vqa_train.jsonl"),
             "--val_path", str(data / "medical_vqa_validation.jsonl")],
            [py, "eval_vlm.py", "--model_mode", "1", "--hidden_size", size, "--out_dir", str(out),
             "--data_path", str(data / "medical_vqa_test.jsonl"), "--train_path", str(data / "medical_vqa_train.jsonl"),
             "--images_path", str(data / "medical_images"), "--cache_dir", str(data / "cache"), "--device", device],
        ]
        times = []
        t_all = time.perf_counter()
        for cmd in steps:
            t0 = time.perf_counter()
            limit = budget.limit(400)
            if limit < MIN_PART_S:
                return {**SKIPPED, "seconds": times}
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
            times.append(round(time.perf_counter() - t0, 1))
            with log.open("a") as f:
                f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
            if p.returncode != 0:
                return {"error": f"{Path(cmd[1]).name} exit {p.returncode}: "
                                 f"{(p.stderr.strip().splitlines() or [''])[-1][:300]}", "seconds": times}
        total = round(time.perf_counter() - t_all, 1)
        metrics = json.loads((out / "eval" / f"medical_vlm_{size}" / "metrics.json").read_text())
        rows = [json.loads(line) for line in (out / f"medical_vlm_{size}_metrics.jsonl").read_text().splitlines()]
    return {"seconds": dict(zip(("convert", "pretrain", "sft", "eval"), times)), "total_seconds": total,
            "guide_seconds": round(sum(times[1:]), 1), "target_guide_seconds": TARGET_GUIDE_S,
            "sft_epoch_seconds": [r["epoch_seconds"] for r in rows if "epoch_seconds" in r],
            "sft_compile_seconds": [r["compile_seconds"] for r in rows if "compile_seconds" in r],
            "final_loss": [r["loss"] for r in rows if "loss" in r][-1],
            "overall_accuracy": metrics["overall_accuracy"], "questions": metrics["count"]["all"]}


def table(result: dict) -> str:
    lines = [f"device: {result['device']} | torch {result['torch']}",
             f"{'train run':20s} {'epoch s':>8s} {'target':>7s} {'tok/s':>10s} {'q/s':>8s} {'MFU':>6s} "
             f"{'peak GB':>8s} {'wall s':>7s}"]
    for name, r in result["train"].items():
        if "error" in r:
            lines.append(f"{name:20s} ERROR {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        target = (TARGET_EPOCH_S if " b16 " in name else TARGET_BEST_EPOCH_S).get(name.split()[0])
        target = f"<={target:g}" if target else "-"
        lines.append(f"{name:20s} {r['epoch_seconds']:8.2f} {target:>7s} {r['tokens_per_s']:10,.0f} "
                     f"{r['samples_per_s']:8,.0f} {mfu:>6s} {str(r.get('peak_memory_gb') or '-'):>8s} "
                     f"{r['wall_s']:7.1f}")
    e = result["eval"]
    lines.append("eval: " + (f"{e['questions']} questions in {e['generation_seconds']:.2f} s "
                             f"({e['questions_per_s']:,.0f}/s; target <= {TARGET_EVAL_S:g} s)"
                             if e and "error" not in e else f"ERROR {e['error']}" if e else "-"))
    a = result.get("attention") or {}
    lines.append("attention: " + (("; ".join(f"{k} -> {'+'.join(a[k]['kernels']) or '?'}"
                                             for k in ("causal", "masked") if k in a)
                                   if "error" not in a else f"ERROR {a['error']}") or "-"))
    s = result["sync"]
    lines.append("sync: " + (f"{s['syncs_in_step']} host-device syncs in one training step" if s and "error" not in s
                             else f"ERROR {s['error']}" if s else "-"))
    pr = result.get("profile") or {}
    if "error" in pr:
        lines.append(f"profile: ERROR {pr['error']}")
    for mode, r in ({} if "error" in pr else pr).items():
        share = r.get("gpu_busy_share")
        lines.append(f"profile: 26M batch-16 {mode} step {r['wall_ms_per_step']} ms wall, "
                     f"{r.get('gpu_busy_ms_per_step', '-')} ms GPU busy"
                     + (f" ({100 * share:.0f} %, target >= 70 %)" if share is not None else "")
                     + f", {r.get('kernels_per_step', '-')} kernels, {r['aten_ops_per_step']} aten ops")
    m = result.get("memory") or {}
    if m:
        lines.append("memory: " + (f"104M peak GB {m['peak_gb']}; largest batch on an 8 GB card "
                                   f"{m.get('largest_batch_8gb', '-')}, headroom at batch 16 "
                                   f"{m.get('headroom_gb_at_b16', '-')} GB" if "error" not in m else f"ERROR {m['error']}"))
    for name, r in (result.get("backends") or {}).items():
        value = r.get("generation_seconds", r.get("epoch_seconds"))
        lines.append(f"backends: {name:28s} " + (f"{value:.2f} s" if value is not None else f"ERROR {r.get('error')}"))
    p = result["pipeline"]
    lines.append("guide (104M, defaults): " + (f"{p['guide_seconds']} s for pretrain 4 + SFT 4 + eval (target <= "
                                               f"{TARGET_GUIDE_S:g} s); {json.dumps(p)}" if p and "error" not in p
                                               else json.dumps(p) if p else "-"))
    return "\n".join(lines)


PARTS = ("sync", "attention", "profile", "memory", "train", "eval", "backends", "pipeline", "compile")
OPT_IN = ("backends",)  # runs only when named in --only: it repeats eval and one training run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    ap.add_argument("--out", default="out/gpu_check.json")
    ap.add_argument("--only", nargs="*", default=[], choices=PARTS, help="run only these parts")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    ap.add_argument("--budget_s", type=float, default=420.0,
                    help="wall-clock cap for the whole check; parts that no longer fit are skipped")
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
    budget = Budget(args.budget_s)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
              "train": {}, "eval": {}, "sync": {}, "attention": {}, "profile": {}, "memory": {}, "backends": {},
              "pipeline": {}}

    def want(part: str) -> bool:
        if part in OPT_IN and part not in args.only:
            return False
        return (not args.only or part in args.only) and part not in args.skip

    def save():
        from infra.atomic import atomic_write_text
        text = json.dumps(result, indent=2) + "\n"
        atomic_write_text(out, text)
        if os.environ.get("OUT"):
            atomic_write_text(Path(os.environ["OUT"]) / "gpu_check.json", text)
            atomic_write_text(Path(os.environ["OUT"]) / "gpu_check.log", log.read_text(errors="replace"))

    def in_process(part: str, fn):
        if not want(part):
            return
        if budget.limit(60) < MIN_PART_S:
            result[part] = dict(SKIPPED)
        else:
            try:
                result[part] = fn()
            except Exception as exc:  # report and go on: the other parts still count
                result[part] = {"error": f"{exc.__class__.__name__}: {exc}"}
        print(part, json.dumps(result[part]), flush=True)
        save()

    def train(compiled: bool):
        for name, flags_, limit in train_runs(args.smoke, compiled):
            result["train"][name] = run_json(["-m", "scripts.bench_train", *flags_, "--device", device],
                                             budget.limit(limit), log)
            print(name, json.dumps(result["train"][name]), flush=True)
            save()

    eval_flags = (["--hidden_size", "64", "--num_hidden_layers", "2", "--vision_model", "random-tiny",
                   "--questions", "64"] if args.smoke else [])
    in_process("sync", lambda: sync_check(device))
    in_process("attention", lambda: attention_check(device, args.smoke))
    in_process("profile", lambda: step_profile(device, args.smoke))
    # the default-flag rows first (eager, then captured and compiled): issue #20's main question
    if want("train"):
        train(compiled=False)
    if want("compile"):
        train(compiled=True)
    if want("eval"):
        result["eval"] = run_json(["-m", "scripts.bench_eval", *eval_flags, "--device", device],
                                  budget.limit(240), log)
        save()
    if want("backends"):
        # the same measurements with cuDNN attention allowed (the toolkit turns it off, see
        # infra.runtime.configure_cuda): does the kernel choice still cost time on this GPU?
        runs = {"eval": ["-m", "scripts.bench_eval", *eval_flags],
                "26M b16 eager": ["-m", "scripts.bench_train",
                                  *(SMOKE_SIZE if args.smoke else SIZES["26M"]), "--batch_size", "16"]}
        for name, cmd in runs.items():
            for label, extra in (("default", []), ("cudnn attention", ["--cudnn_attention"])):
                key = f"{name}, {label}"
                result["backends"][key] = run_json([*cmd, *extra, "--device", device], budget.limit(150), log)
                print(key, json.dumps(result["backends"][key]), flush=True)
                save()
    in_process("memory", lambda: memory_check(device, args.smoke))
    if want("pipeline"):
        try:
            result["pipeline"] = pipeline(args.smoke, device, log, budget)
        except (subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
            result["pipeline"] = {"error": f"{exc.__class__.__name__}: {exc}"}
        save()
    print(table(result))
    print(f"wrote {out} (log {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
