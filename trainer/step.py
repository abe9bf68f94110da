"""One optimizer step, and how its batches are made and run.

* ``StepPlan``: which samples each step of an epoch trains on (a permutation per epoch from
  the seed and the epoch alone), collated into a few fixed shapes (``dataset.StepShapes``)
  when the step is compiled, and built for step s+1 on a worker thread while step s runs
  (``BatchFeed``, pinned memory and ``non_blocking`` copies on CUDA).
* ``compile_choice``: ``--compile auto|on|graphs|off``. The default eager step of a 26M model
  at batch 16 is bound by kernel launches on a GPU (27.9 ms of wall time for 6.8 ms of GPU work
  on an H200, 1,316 kernels); compiling fuses most of them and ``graphs`` also replays the
  step as CUDA graphs, one per shape.
* ``train_step``: forward, losses, backward and the optimizer step, with no host-device sync.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dataset.features import FeatureStore
from dataset.vqa_dataset import MODEL_INPUTS, Batch, StepShapes, collate, plan_shapes
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.losses import look_loss

log = logging.getLogger("train")

# --compile auto compiles on CUDA from this many optimizer steps: a cold compile of the step costs
# about 20-30 s (first epochs of the H200 runs in docs/benchmarks.md), and a compiled 26M batch-16
# step saved ~10 ms there (4.8 s instead of 7.6 s per 307-step epoch), so ~2,000 steps pay a cold
# compile back; the inductor cache under out/ makes every later run start warm (a few seconds),
# which is why far fewer steps already pay: the guide's 4 SFT epochs are 1,228 steps.
AUTO_COMPILE_MIN_STEPS = 500
COMPILE_MODES = {"on": None, "graphs": "reduce-overhead"}  # torch.compile's mode per --compile choice


def compile_choice(cfg: TrainConfig, device: torch.device, total_steps: int) -> tuple[str, str]:
    """('off' | 'on' | 'graphs', why) for this run."""
    if cfg.compile == "off":
        return "off", "--compile off"
    if cfg.compile == "graphs" and device.type != "cuda":
        return "on", "--compile graphs needs CUDA; compiling without CUDA graphs on the " + device.type
    if cfg.compile in COMPILE_MODES:
        return cfg.compile, f"--compile {cfg.compile}"
    if device.type != "cuda":
        return "off", "--compile auto: not on the CPU (compiling takes minutes there and saves little)"
    if total_steps < AUTO_COMPILE_MIN_STEPS:
        return "off", (f"--compile auto: {total_steps} steps are too few to pay back the compilation "
                       f"(from {AUTO_COMPILE_MIN_STEPS}); --compile on forces it")
    return "on", (f"--compile auto: {total_steps} steps on CUDA pay back the compilation (about 20-30 s cold, "
                  "seconds from the cache); --compile off to skip it")


def compile_model(model: torch.nn.Module, choice: str, cache_dir: Path | None,
                  backend: str = "inductor") -> torch.nn.Module:
    """The model (or its DDP wrapper) compiled with static shapes: one graph per StepShapes
    width, nothing dynamic to guard on. The weights and the state dict stay the model's own.
    The inductor cache goes under ``cache_dir`` (unless TORCHINDUCTOR_CACHE_DIR is set), so
    stage 2 and reruns start warm. Tests trace with ``backend="aot_eager"``: the same graphs,
    forward and backward, without a C++ compiler."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    # torch writes its default into the variable when anything asks for the cache folder (importing
    # transformers does), so a user's own setting is one that differs from that default
    if cache_dir is not None and os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    import torch._dynamo
    # training shapes (<= 4 widths) plus validation's (its widths and a shorter last batch)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    return torch.compile(model, backend=backend, dynamic=False,
                         **({"mode": COMPILE_MODES[choice]} if backend == "inductor" else {}))


class StepRunner:
    """What runs the forward: the compiled model when --compile chose to compile, else the plain
    one (the model or its DDP wrapper). ``shapes`` / ``val_shapes``: the fixed batch shapes of
    training and validation when compiled. If the compiler fails, ``fall_back`` logs it and the
    run goes on with the plain model: same update, slower."""

    def __init__(self, plain: torch.nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int,
                 samples: list, val_samples: list | None, cache_dir: Path | None):
        self.plain = self.run = plain
        self.choice, why = compile_choice(cfg, device, total_steps)
        log.info("compile: %s (%s)", self.choice, why)
        self.shapes = self.val_shapes = None
        if self.choice != "off":
            self.shapes = plan_shapes(samples, cfg.batch_size)
            if val_samples:  # validation computes the language-model loss only: no look slots
                plan = plan_shapes(val_samples, cfg.batch_size)
                self.val_shapes = StepShapes(plan.widths, plan.targets, 0)
            self.run = compile_model(plain, self.choice, cache_dir)
            log.info("compiled step shapes: %s, batch %d (a longer batch keeps its own shape)",
                     self.shapes.describe(), cfg.batch_size)

    @property
    def compiled(self) -> bool:
        return self.run is not self.plain

    @property
    def graphs(self) -> bool:
        return self.compiled and self.choice == "graphs"

    def fall_back(self, what: str, exc: Exception):
        log.warning("compiling %s failed (%s: %s): training and validation continue without compiling (same "
                    "results, slower); --compile off skips the attempt", what, type(exc).__name__,
                    (str(exc).strip().splitlines() or [""])[0][:300])
        self.run, self.choice = self.plain, f"{self.choice} (failed: eager)"


def make_optimizer(model, cfg: TrainConfig, device, dtype):
    if cfg.learning_rate is None:  # build_model resolves it; a config made in code may not have
        cfg.resolve_learning_rate(cfg.lm_pretrained)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # norms and biases
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                            betas=(0.9, 0.95), fused=True)  # fused: no per-parameter host reads of the step count
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return params, opt, scaler


def micro_batches(perm: torch.Tensor, step: int, cfg: TrainConfig, dist: Dist) -> list[torch.Tensor]:
    g = cfg.batch_size * dist.world * cfg.accumulation_steps
    chunk = perm[step * g:(step + 1) * g]
    out = []
    for m in range(cfg.accumulation_steps):
        start = (m * dist.world + dist.rank) * cfg.batch_size
        out.append(chunk[start:start + cfg.batch_size])
    return out


def epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


# eager batch widths are rounded up to this (tensor cores like multiples of 8); a compiled step
# uses the run's StepShapes instead
PAD_MULTIPLE = 8


def to_device(batch: dict, device: torch.device) -> dict:
    """Host batch -> device. On CUDA the host tensors are pinned (BatchFeed pins them on its
    thread), so the copies are asynchronous and the step never waits for them."""
    if device.type == "cuda":
        batch = {k: v if v.is_pinned() else v.pin_memory() for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StepPlan:
    """The batches of every optimizer step: ``batches(step)`` -> (micro-batches, tokens), the
    same for any process layout, resume point or thread that asks (a function of the seed, the
    epoch and the step alone)."""

    def __init__(self, samples: list, packed, cfg: TrainConfig, dist: Dist, steps_per_epoch: int, pad_id: int,
                 image_id: int, shapes: StepShapes | None, pin: bool):
        self.samples, self.packed, self.cfg, self.dist = samples, packed, cfg, dist
        self.steps_per_epoch, self.pad_id, self.image_id = steps_per_epoch, pad_id, image_id
        self.shapes, self.pin = shapes, pin
        self._epoch: tuple[int, list, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def epoch(self, epoch: int) -> tuple[list, torch.Tensor]:
        with self._lock:
            if self._epoch is None or self._epoch[0] != epoch:
                samples = self.packed.epoch_samples(epoch) if self.packed is not None else self.samples
                perm = epoch_perm(len(samples), self.cfg.seed, epoch)
                self._epoch = (epoch, samples, perm)
            return self._epoch[1], self._epoch[2]

    def batches(self, step: int) -> tuple[list[Batch], int]:
        samples, perm = self.epoch(step // self.steps_per_epoch)
        micro = [[samples[i] for i in m.tolist()]
                 for m in micro_batches(perm, step % self.steps_per_epoch, self.cfg, self.dist)]
        batches = [collate(m, self.pad_id, self.image_id, PAD_MULTIPLE, self.shapes) for m in micro]
        if self.pin:
            for b in batches:
                for k, v in b.items():
                    b[k] = v.pin_memory()
        return batches, sum(len(s.input_ids) for m in micro for s in m)


def shape_key(batches: list[Batch]) -> tuple:
    """What a compiled step specialises on: every tensor's shape (and which are present)."""
    return tuple(tuple(sorted((k, tuple(v.shape)) for k, v in b.items())) for b in batches)


class BatchFeed:
    """Step s+1's batches are built on a worker thread while step s runs on the device (the
    host is otherwise idle then, waiting for kernels or for the next launch). Same batches,
    same order as building them in the loop; ``overlap=False`` does exactly that."""

    def __init__(self, plan: StepPlan, overlap: bool):
        self.plan = plan
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="collate") if overlap else None
        self.pending = None

    def get(self, step: int, next_step: int | None) -> tuple[list[Batch], int]:
        if self.pending is not None and self.pending[0] == step:
            out = self.pending[1].result()
        else:
            out = self.plan.batches(step)
        self.pending = None
        if self.pool is not None and next_step is not None:
            self.pending = (next_step, self.pool.submit(self.plan.batches, next_step))
        return out

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def train_step(ddp, model, batches: list[dict], features: FeatureStore, opt, scaler, params, cfg: TrainConfig,
               dist: Dist, device, amp, lr: float, graphs: bool = False) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns this process's share of the
    step's mean loss as a device tensor. Nothing here waits for the device: counts come from
    the host batches, and the global answer-token count is summed on the device."""
    # Both losses are means over the *global* batch: answer tokens, and questions with a look target
    # (padding slots of a fixed shape excluded; the look count is a host tensor of the batch, no sync)
    n_local = float(sum(b.n_targets for b in batches))
    n_look = float(sum(float(b["look_weight"].sum()) for b in batches if "look_weight" in b))
    if dist.enabled:
        totals = dist.all_sum(to_device({"n": torch.tensor([n_local, n_look], dtype=torch.float32)}, device)["n"])
        total_targets, total_look = totals[0], totals[1].clamp(min=1.0)
    else:
        total_targets, total_look = n_local, max(n_look, 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device, dtype=torch.float32)
    for m, batch in enumerate(batches):
        sync = m == len(batches) - 1
        ctx = ddp.no_sync() if dist.enabled and not sync else contextlib.nullcontext()
        feats = features.get(batch["image_index"])
        b = to_device(batch, device)
        if graphs:  # a new iteration for the CUDA graphs: the last replay's outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        looking = "look_pos" in b
        with ctx:
            with amp:
                out = ddp(b["input_ids"], feats, **{k: b[k] for k in MODEL_INPUTS if k in b}, return_logits=looking)
                loss_sum, aux, look_term = out.loss_sum, out.aux_loss, 0.0
                if looking:
                    look = model.llm.layers[-1].self_attn
                    q, k = look.kept_qk
                    look.kept_qk = None  # not kept past this micro-batch
                    look_sum = look_loss(q, k, b["look_pos"], b["image_slots"], b["look_image"], b["look_target"],
                                         b["look_weight"], reduction="sum")
                    look_term = cfg.look_loss * look_sum / total_look
            # DDP averages gradients over processes: scale so the result is the mean over
            # every answer token (and every look question) of the global batch.
            loss = (loss_sum / total_targets + look_term) * dist.world + aux / len(batches)
            scaler.scale(loss).backward()
        step_loss += loss_sum.detach().float()
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return step_loss / total_targets
