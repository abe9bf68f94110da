"""The one training loop behind both stages.

Single GPU/CPU or ``torchrun --nproc_per_node N`` (NCCL on GPU, gloo on CPU). Every
optimizer step consumes one global batch of ``batch_size x world_size x
accumulation_steps`` samples drawn from a per-epoch permutation that depends only on
the seed and the epoch, and its loss is the mean over the *global* number of answer
tokens, so any split of the same global batch over processes or accumulation steps
computes the same update. Resume therefore reproduces the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist

from dataset.contract import answer_of, question_of
from dataset.features import FeatureStore
from dataset.boxes import BOXES_FILE, BoxError, grid_side, image_keys, patch_targets, read_boxes_file
from dataset.contract import image_file, images_of, read_jsonl
from dataset.vqa_dataset import (MODEL_INPUTS, PackedQuestions, VQADataset, annotate_closed, annotate_look,
                                 balance_closed,
                                 closed_text_prior, collate, paired_permutation)
from model.atomic import atomic_open, atomic_write_text, remove_stale_temps
from model.checkpoint import (CheckpointError, atomic_save, build_config, checkpoint_path, ensure_finite,
                              load_weights, locate_checkpoint, read_checkpoint, safe_load, save_checkpoint,
                              tokenizer_from_files)
from model.config import DEFAULT_VISION_MODEL, VLMConfig, resolve_path
from model.lock import LockError, output_lock
from model.minimind_weights import load_minimind_llm
from model.runtime import Progress, autocast, compute_dtype, configure_cuda, pick_device, seed_everything
from model.tokenization import ChatEncoder, load_tokenizer
from model.vision import load_vision_tower
from model.vlm import MedicalVLM
from trainer.config import TrainConfig
from trainer.losses import closed_answer_loss, look_loss, patch_loss

log = logging.getLogger("train")

CLOSED_PRIOR_HINT = 0.7  # above this share the training log points at --balance_closed and image-use metrics
# fields that must agree between a resume state and the run continuing it
RESUME_KEYS = ("stage", "hidden_size", "num_hidden_layers", "use_moe", "batch_size", "accumulation_steps",
               "epochs", "seed", "data_path", "learning_rate", "vision_model", "projector", "pack_questions",
               "balance_closed", "train_vision", "vision_lr", "pair_closed", "projector_lr_scale", "debias",
               "rank_weight", "rank_margin", "patch_loss", "debias_until", "look_loss")
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe",
             "projector")


class TrainingError(RuntimeError):
    pass


class TrainingInterrupted(TrainingError):
    """Ctrl-C: the message says what was kept."""


# Longest time a process waits for the others (rank 0 builds the feature cache while the
# rest wait at a barrier: minutes for a large image set on a slow disk).
DDP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            tdist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t)
        return t


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device_flag)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {device_flag} under torchrun, but CUDA is not available here: pass "
                            "--device cpu to train on CPU processes (gloo), or fix the CUDA install")
    use_cuda = torch.cuda.is_available() and (device_flag == "auto" or device_flag.startswith("cuda"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        configure_cuda()
    if not tdist.is_initialized():
        # device_id binds NCCL to this GPU at once (no guessing, no hang on a wrong device)
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=DDP_TIMEOUT,
                                 device_id=device if use_cuda else None)
    return Dist(rank, world, local_rank), device


def data_source(cfg: TrainConfig) -> str:
    """Where the training data came from, from the converter's manifest beside it (the model
    card states it): e.g. 'hub:BoKelvin/SLAKE', 'release', 'demo-hard:seed=0'; 'unknown' without
    a manifest. Local paths are dropped: a shared model must not carry them."""
    try:
        source = json.loads((resolve_path(cfg.data_path).parent / "manifest.json").read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    parts = [("release" if p.strip().startswith("release:") else p.strip()) for p in str(source).split(" + ")]
    return " + ".join(p if "/" not in p or p.startswith("hub") else Path(p).name for p in parts)


def check_out_dir(out_dir: Path, cfg: TrainConfig):
    """Output and cache folders must be folders (or creatable) before hours of training."""
    for flag, folder in (("--out_dir", out_dir), ("--cache_dir", resolve_path(cfg.cache_dir) if cfg.cache_dir else None)):
        if folder is None:
            continue
        if folder.exists() and not folder.is_dir():
            raise TrainingError(f"{flag} {folder} is a file, not a folder: pass another {flag}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"{flag} {folder} cannot be created ({exc.strerror or exc}): pass another {flag}") from None


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then the peak held to the end (``constant``), or down to ``min_lr_ratio``
    of the peak: by a cosine over the rest of the run, or (``wsd``: warm-up, stable, decay) held
    at the peak and decayed linearly over the last ``decay_ratio`` of the steps only, so the
    run's length changes only where it ends."""
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.learning_rate
    if cfg.schedule == "wsd":
        decay_start = max(warm, total - round(cfg.decay_ratio * total))
        if step < decay_start:
            return cfg.learning_rate
        progress = (step - decay_start + 1) / max(1, total - decay_start)
        return cfg.learning_rate * (lo + (1 - lo) * (1 - progress))
    progress = (step - warm) / max(1, total - warm)
    return cfg.learning_rate * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_name(cfg: TrainConfig) -> str:
    return checkpoint_path(cfg.out_dir, cfg.stage, cfg.hidden_size, cfg.use_moe).stem


def resolve_from_weight(cfg: TrainConfig) -> Path | None:
    if cfg.from_weight in ("", "none"):
        return None
    if cfg.from_weight == "pretrain":
        path = checkpoint_path(cfg.out_dir, "pretrain", cfg.hidden_size, cfg.use_moe)
        if path.is_file():
            return path
        others = sorted(p.name for p in path.parent.glob("medical_pretrain_vlm_*.pth") if not p.stem.endswith("_resume"))
        log.warning("no stage-1 checkpoint at %s: starting stage 2 without it (run `python train_pretrain_vlm.py "
                    "--hidden_size %d` first for better results, or pass --from_weight none to silence this)%s", path,
                    cfg.hidden_size, f". Found stage-1 checkpoints of another size beside it: {', '.join(others)}; "
                    "to use one, pass the size flags it was trained with" if others else "")
        return None
    try:
        path = locate_checkpoint(cfg.from_weight)  # a .pth, a model folder or a hub id
    except FileNotFoundError as exc:
        raise TrainingError(f"--from_weight {exc}") from None
    if not path.exists():
        raise TrainingError(f"--from_weight {cfg.from_weight}: file not found")
    return path


def tuned_vision(cfg: TrainConfig, tower) -> dict:
    """Config fields for --train_vision: how many of the tower's last blocks are fine-tuned."""
    if cfg.train_vision == "none":
        return {}
    total = len(tower.layers)
    n = total if cfg.train_vision == "all" else int(cfg.train_vision.split(":")[1])
    if n > total:
        raise TrainingError(f"--train_vision {cfg.train_vision}: the tower '{tower.name}' has only {total} blocks")
    log.info("vision tower: fine-tuning its last %d of %d blocks at --vision_lr %g; the feature cache keeps the "
             "output of the first %d", n, total, cfg.vision_lr, total - n)
    return {"vision_tuned_layers": n, "vision_layer_config": tower.model.config.to_dict()}


def boxes_file(cfg: TrainConfig) -> Path:
    if cfg.boxes_path != "auto":
        return resolve_path(cfg.boxes_path)
    return resolve_path(cfg.data_path).parent / BOXES_FILE


def patch_classes(cfg: TrainConfig) -> list[str]:
    """The box names of the training images, for --patch_loss's head ([] when off)."""
    if not cfg.patch_loss:
        return []
    path = boxes_file(cfg)
    try:
        table = read_boxes_file(path)
    except BoxError as exc:
        raise TrainingError(str(exc)) from None
    root = resolve_path(cfg.images_path)
    data_path = resolve_path(cfg.data_path)
    keys = set()
    if data_path.is_file():
        for n, rec in enumerate(read_jsonl(data_path), 1):
            keys.update(image_keys([image_file(root, rel, f"{data_path}:{n}") for rel in images_of(rec)], root))
    names = sorted({name for k in keys if k in table for name in table[k].get("boxes", {})})
    if not names:
        log.warning("--patch_loss %g: no organ/finding boxes for the training images in %s, so the patch loss is "
                    "off (the converter writes them from each image folder's detection.json; run "
                    "convert_slake_dataset.py again, or pass --boxes_path)", cfg.patch_loss, path)
    else:
        log.info("--patch_loss %g: a head predicts %d box names per image patch (%s)", cfg.patch_loss, len(names),
                 ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""))
    return names


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[MedicalVLM, object]:
    start = resolve_from_weight(cfg)
    ckpt = read_checkpoint(start) if start else None
    tok = tokenizer_from_files(ckpt["tokenizer"], str(start)) if ckpt else load_tokenizer(cfg.tokenizer_path)
    before = (ckpt or {}).get("extra", {}).get("train_config", {})
    source = cfg.resolve_learning_rate(bool(cfg.from_llm or before.get("from_llm") or before.get("lm_pretrained")))
    log.info("learning rate %g (%s)", cfg.learning_rate, source)
    log.info("learning-rate schedule: %d%% linear warm-up, then %s (%s)", round(100 * cfg.warmup_ratio), {
        "constant": "constant", "cosine": f"cosine decay to {cfg.min_lr_ratio:g} of the peak",
        "wsd": f"stable, then linear decay to {cfg.min_lr_ratio:g} of the peak over the last "
               f"{round(100 * cfg.decay_ratio)}% of the steps"}[cfg.lr_schedule], cfg.schedule_source)
    tower = load_vision_tower(cfg.vision_model)
    model_cfg = build_config(tok, tower, **{k: getattr(cfg, k) for k in ARCH_KEYS}, **tuned_vision(cfg, tower),
                             patch_labels=patch_classes(cfg))
    if cfg.max_seq_len > model_cfg.max_position_embeddings:
        raise TrainingError(f"--max_seq_len {cfg.max_seq_len} exceeds {model_cfg.max_position_embeddings}")
    model = MedicalVLM(model_cfg, tower)
    if ckpt is not None:
        try:
            old = VLMConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"--from_weight {start}: the stored config is not valid ({exc})") from None
        keys = (*ARCH_KEYS, "vocab_size") + (("vision_tuned_layers",) if old.vision_tuned_layers else ())
        diff = {k: (getattr(old, k), getattr(model_cfg, k)) for k in keys if getattr(old, k) != getattr(model_cfg, k)}
        if diff:
            raise TrainingError(f"--from_weight {start} does not fit this run: {', '.join(f'{k} {a} vs {b}' for k, (a, b) in diff.items())}. "
                                "Use the same size flags as the run that wrote it, or --from_weight none")
        fp = ckpt["vision"].get("fingerprint")
        if fp and fp != tower.fingerprint():
            raise TrainingError(f"--from_weight {start} was trained with vision tower '{ckpt['vision']['id']}' "
                                f"({fp}) but this run uses '{tower.name}' ({tower.fingerprint()}): the projector "
                                "would see different features. Pass the same --vision_model.")
        # a patch head for other box names (or none before) starts afresh
        try:
            load_weights(model, ckpt["model"], f"--from_weight {start}",
                         skip_prefixes=("patch_head.",) if old.patch_labels != model_cfg.patch_labels else ())
        except CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        log.info("starting from %s (stage %s, step %d)", start, ckpt["stage"], ckpt["step"])
    if cfg.from_llm:
        load_minimind_llm(model, str(resolve_path(cfg.from_llm)))
    frozen = cfg.frozen_llm
    if frozen in ("all", "except_last"):
        model.llm.requires_grad_(False)
        if frozen == "except_last":
            model.llm.layers[-1].requires_grad_(True)
            model.llm.norm.requires_grad_(True)
    log.info("language model: %s", {"all": "frozen", "except_last": "frozen except the last layer",
                                     "none": "trained"}[frozen])
    if cfg.stage == "pretrain" and frozen == "all" and not cfg.from_llm and ckpt is None:
        log.warning("the language model is frozen at random weights: only the projector learns")
    return model.to(device), tok


class MetricsLog:
    """The run's JSONL metrics. Rows go to a hidden working file beside the log; the log itself
    is replaced (atomically) only when the run saves a checkpoint (``commit``), so a run that
    fails before or between saves leaves the previous log matching the previous checkpoint.
    A resumed run first drops the rows logged after the step it resumes from, so no step
    appears twice."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None, wandb_run=None):
        self.path, self.enabled, self.wandb = path, enabled, wandb_run
        self.work = path.with_name(f".{path.name}.run")
        self.resume_step = resume_step
        self.started = False

    def _start(self):
        self.started = True
        kept = []
        if self.resume_step is not None and self.path.is_file():
            kept = [r for r in self._read(self.path) if r.get("step", 0) <= self.resume_step]
        atomic_write_text(self.work, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict):
        if not self.enabled:
            return
        if not self.started:
            self._start()
        with self.work.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))

    def commit(self):
        """The rows so far become the log (called right after a checkpoint was saved)."""
        if self.enabled and self.started and self.work.is_file():
            atomic_write_text(self.path, self.work.read_text(encoding="utf-8", errors="replace"))

    def close(self):
        self.work.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> list[dict]:
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
        return rows

    def rows(self) -> list[dict]:
        return self._read(self.work) if self.started and self.work.is_file() else []


def plot_losses(rows: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _micro_batches(perm: torch.Tensor, step: int, cfg: TrainConfig, dist: Dist) -> list[torch.Tensor]:
    g = cfg.batch_size * dist.world * cfg.accumulation_steps
    chunk = perm[step * g:(step + 1) * g]
    out = []
    for m in range(cfg.accumulation_steps):
        start = (m * dist.world + dist.rank) * cfg.batch_size
        out.append(chunk[start:start + cfg.batch_size])
    return out


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def pad_multiple(cfg: TrainConfig) -> int:
    """Batch widths are rounded up to this: few distinct shapes, so torch.compile compiles
    a handful of graphs instead of one per length (and tensor cores like multiples of 8)."""
    return 64 if cfg.compile else 8


def to_device(batch: dict, device: torch.device) -> dict:
    """Host batch -> device. On CUDA the host tensors are pinned first, so the copies are
    asynchronous and the step never waits for them."""
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class Validation:
    """One pass over the validation set: mean loss per answer token, and exact match per
    answer type. Exact match is teacher-forced (every answer token, end of turn included, is
    the arg-max prediction), which is what greedy decoding would answer, at no generation cost;
    it can keep rising while the loss rises too (confident mistakes cost more loss)."""
    loss: float
    closed: float | None
    open: float | None

    def exact_match_text(self) -> str:
        return ", ".join(f"{k} {100 * v:.1f}%" for k, v in (("closed", self.closed), ("open", self.open))
                         if v is not None)

    def line(self) -> str:
        acc = self.exact_match_text()
        return f"validation loss {self.loss:.4f}" + (f", exact match {acc}" if acc else "")

    def row(self) -> dict:
        return {"val_loss": round(self.loss, 6),
                **{f"val_{k}_acc": round(v, 4) for k, v in (("closed", self.closed), ("open", self.open))
                   if v is not None}}

    @property
    def accuracy(self) -> float | None:
        known = [v for v in (self.closed, self.open) if v is not None]
        return sum(known) / len(known) if known else None


def validation_prior(data: VQADataset, val: VQADataset | None) -> Validation | None:
    """What answering every validation question with the commonest training answer for the same
    question text scores (the per-question prior; loss unknown). A model whose closed exact match
    stays there answers closed questions from the text alone."""
    from evaluation.metrics import baselines
    if val is None:
        return None

    def items(d):
        return [{"question": question_of(s.record), "answer": answer_of(s.record), "answer_type": s.record["answer_type"]}
                for s in d.samples if s.record.get("answer_type") in ("OPEN", "CLOSED")]
    train_items, val_items = items(data), items(val)
    if not train_items or not val_items:
        return None
    b = baselines(train_items, val_items)["majority_per_question"]
    return Validation(float("nan"), b["closed_accuracy"], b["open_accuracy"])


def prior_advice(last: Validation | None, prior: Validation | None, epochs: int) -> str | None:
    """A warning when closed questions end at the per-question prior: the image is not used for them."""
    if last is None or prior is None or last.closed is None or prior.closed is None:
        return None
    if last.closed > prior.closed + 0.02:
        return None
    return (f"closed questions end at the level of the question-text prior (validation exact match "
            f"{100 * last.closed:.1f}% vs {100 * prior.closed:.1f}% for the commonest training answer of each question): "
            f"the model does not use the image for them yet. Small models trained from scratch learn closed questions "
            f"late (after about 12 epochs on the hard demo set): train longer, e.g. --epochs {max(4 * epochs, 32)}")


@torch.no_grad()
def evaluate(model, data: VQADataset, features: FeatureStore, cfg: TrainConfig, dist: Dist, device, amp) -> Validation:
    model.eval()
    # loss sum, tokens, then (exact, count) for closed and open questions; summed on the device
    total = torch.zeros(6, device=device, dtype=torch.float64)
    idx = list(range(dist.rank, len(data), dist.world))
    for i in range(0, len(idx), cfg.batch_size):
        samples = [data.samples[j] for j in idx[i:i + cfg.batch_size]]
        batch = collate(samples, model.config.pad_token_id, model.config.image_token_id, pad_multiple(cfg))
        closed = torch.tensor([s.record.get("answer_type") == "CLOSED" for s in samples], dtype=torch.float64)
        rows = batch["target_pos"] // batch["input_ids"].shape[1]  # the sample each answer token belongs to
        feats = features.get(batch["image_index"])
        batch = to_device({**batch, "closed": closed, "rows": rows}, device)
        with amp:
            loss_sum, n, _, hits = model(batch["input_ids"], feats, with_hits=True,
                                         **{k: batch[k] for k in MODEL_INPUTS if k in batch})
        misses = torch.zeros(len(samples), device=device, dtype=torch.float64).index_add_(
            0, batch["rows"], (~hits).double())
        exact = (misses == 0).double()
        closed = batch["closed"]
        total += torch.stack([loss_sum.double(), torch.tensor(float(n), device=device, dtype=torch.float64),
                              (exact * closed).sum(), closed.sum(), (exact * (1 - closed)).sum(), (1 - closed).sum()])
    dist.all_sum(total)
    model.train()
    t = total.tolist()
    return Validation(t[0] / max(t[1], 1), t[2] / t[3] if t[3] else None, t[4] / t[5] if t[5] else None)


@dataclass
class Checkpointer:
    """The one save path of a run, with its guard: the weights are checked for NaN/Inf
    before anything is written, so a good file is never replaced by a bad one, and the log
    says "saved" only for files that were written."""
    cfg: TrainConfig
    final_path: Path
    resume_path: Path
    dist: Dist
    last_saved: tuple[Path, int] | None = None
    previous: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.previous = [p for p in (self.final_path, self.resume_path) if p.is_file()]

    def kept_message(self) -> str:
        if self.last_saved:
            return f"the last good checkpoint {self.last_saved[0]} (step {self.last_saved[1]}) is kept"
        if self.previous:
            return f"nothing was saved by this run; {', '.join(map(str, self.previous))} from before is untouched"
        return "nothing was saved"

    def save(self, model, tok, opt, scaler, metrics: "MetricsLog", step: int, epoch: int, extra: dict,
             with_resume: bool, plot: bool):
        if self.dist.is_main:
            try:  # save_checkpoint's own guard refuses NaN/Inf weights before anything is written
                save_checkpoint(self.final_path, model, tok, self.cfg.stage, step, dtype=self.cfg.save_dtype,
                                extra={"train_config": self.cfg.to_dict(), "epoch": epoch,
                                       "data_source": data_source(self.cfg), **extra})
            except CheckpointError as exc:
                raise TrainingError(
                    f"the weights became NaN/Inf at step {step} ({exc}): training diverged and this step was not "
                    f"saved; {self.kept_message()}. Lower --learning_rate (now {self.cfg.learning_rate}), keep "
                    "--grad_clip on, or use --dtype bfloat16 instead of float16.") from None
            metrics.commit()
            if with_resume:
                atomic_save({"model": model.trainable_state_dict(), "optimizer": opt.state_dict(),
                             "scaler": scaler.state_dict(), "step": step, "world": self.dist.world,
                             "train_config": self.cfg.to_dict()}, self.resume_path)
            if plot:
                plot_losses(metrics.rows(), self.final_path.with_name(f"{self.final_path.stem}_loss.png"),
                            f"{self.final_path.stem} ({self.cfg.stage})")
        self.last_saved = (self.final_path, step)
        self.dist.barrier()


def setup_data(cfg: TrainConfig, model: MedicalVLM, encoder: ChatEncoder, dist: Dist, device):
    """Training/validation samples and their frozen vision features (built once, cached)."""
    images_path = resolve_path(cfg.images_path)
    hint = ("run `python convert_slake_dataset.py` first (or --demo offline)"
            if cfg.data_path.startswith("dataset/") else "")
    data = VQADataset(resolve_path(cfg.data_path), images_path, encoder, cfg.max_seq_len, hint=hint)
    val = None
    if cfg.val_path:
        vpath = resolve_path(cfg.val_path)
        if vpath.is_file():
            val = VQADataset(vpath, images_path, encoder, cfg.max_seq_len, image_paths=data.image_paths)
        else:
            log.warning("validation file %s not found: no validation loss", vpath)
    cache_dir = resolve_path(cfg.cache_dir) if cfg.cache_dir else None
    # rank 0 builds the cache file; the others wait, then read it
    features = None
    if dist.is_main or cache_dir is None:
        features = FeatureStore(model.vision_tower, data.image_paths, device, cache_dir, cfg.feature_cache_gb,
                                cfg.num_workers, progress=dist.is_main, stop_before=model.cache_layers())
    dist.barrier()
    if features is None:
        features = FeatureStore(model.vision_tower, data.image_paths, device, cache_dir, cfg.feature_cache_gb,
                                cfg.num_workers, build=False, progress=False, stop_before=model.cache_layers())
    n_closed, prior = closed_text_prior(data.samples)
    if prior is not None:  # how much the question text alone tells about closed answers
        log.info("closed training questions: %d; the commonest answer of each question text is right for %.1f%% "
                 "of them (50%% when every text is answered both ways equally often)%s", n_closed, 100 * prior,
                 "" if cfg.balance_closed or prior < CLOSED_PRIOR_HINT else
                 ": the text alone predicts most closed answers, so a good closed score need not mean the model "
                 "looks at the image (eval_vlm.py reports accuracy against the prior; --balance_closed evens the "
                 "answers per text)")
    if cfg.balance_closed:
        added = balance_closed(data, cfg.seed)
        log.info("--balance_closed: %d repeated closed question(s) balance the answers of every closed question text "
                 "(now %.1f%%)", added, 100 * (closed_text_prior(data.samples)[1] or 0))
    if cfg.debias or cfg.rank_weight:
        marked = annotate_closed(data, encoder, cfg.max_seq_len)
        log.info("closed-answer losses (--debias %g, --rank_weight %g) on %d closed training question(s)",
                 cfg.debias, cfg.rank_weight, marked)
    packed = PackedQuestions(data, encoder.image_id, cfg.pack_questions, cfg.seed) \
        if cfg.pack_questions > 1 else None
    return data, val, features, packed


def box_tables(cfg: TrainConfig, model: MedicalVLM, data: VQADataset) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(names, targets [n_images, patches, names], known [n_images]) from the boxes file for the
    data's image table: the patch head's names when it has one, else every name in the file."""
    grid = grid_side(model.config.image_tokens)
    if grid is None:
        raise TrainingError(f"--patch_loss / --look_loss need a square patch grid; this tower gives "
                            f"{model.config.image_tokens} image tokens")
    try:
        table = read_boxes_file(boxes_file(cfg))
    except BoxError as exc:
        raise TrainingError(str(exc)) from None
    return patch_targets(table, image_keys(data.image_paths, resolve_path(cfg.images_path)), grid,
                         classes=model.config.patch_labels or None)


def patch_tables(cfg: TrainConfig, model: MedicalVLM, data: VQADataset, device) -> tuple | None:
    """(targets [n_images, patches, names], known [n_images]) on the device for --patch_loss;
    --look_loss targets are attached to the samples here too."""
    if model.patch_head is None and not cfg.look_loss:
        return None
    if model.patch_head is None and grid_side(model.config.image_tokens) is None:
        log.info("--look_loss: the tower's %d image tokens are not a square grid; the loss is off",
                 model.config.image_tokens)
        return None
    if not boxes_file(cfg).is_file() and model.patch_head is None:
        log.info("--look_loss: no %s beside the data (no organ/finding boxes), so the model is not told where to "
                 "look; convert_slake_dataset.py writes it from SLAKE's detection.json files", BOXES_FILE)
        return None
    classes, targets, known = box_tables(cfg, model, data)
    if cfg.look_loss:
        n = annotate_look(data, classes, targets, known)
        if n:
            log.info("--look_loss %g: %d of %d training questions name a box of their image (%s)", cfg.look_loss,
                     n, len(data), ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else ""))
        else:
            log.info("--look_loss: no question names a box of its image (%s), so the model is not told where to "
                     "look", "no boxes in the data" if not classes else f"{int(known.sum())} images with boxes")
    if model.patch_head is None:
        return None
    log.info("--patch_loss: boxes for %d of %d images", int(known.sum()), len(known))
    return targets.to(device), known.to(device)


def make_optimizer(model: MedicalVLM, cfg: TrainConfig, device, dtype):
    if cfg.learning_rate is None:  # build_model resolves it; a config made in code may not have
        cfg.resolve_learning_rate(cfg.lm_pretrained)
    params = [p for p in model.parameters() if p.requires_grad]
    vision = {id(p) for p in model.vision_tuned.parameters()} if model.vision_tuned is not None else set()
    projector = {id(p) for p in model.projector.parameters()}
    groups = []
    for scale, members in ((1.0, [p for p in params if id(p) not in vision and id(p) not in projector]),
                           (cfg.projector_lr_scale, [p for p in params if id(p) in projector]),
                           (cfg.vision_lr / cfg.learning_rate, [p for p in params if id(p) in vision])):
        groups += [{"params": [p for p in members if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in members if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                            betas=(0.9, 0.95), fused=True)  # fused: no per-parameter host reads of the step count
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return params, opt, scaler


def load_resume(cfg: TrainConfig, resume_path: Path, model, opt, scaler, dist: Dist, total_steps: int) -> int:
    try:
        state = safe_load(resume_path, "resume state", "run without --resume to start fresh")
    except CheckpointError as exc:
        raise TrainingError(f"--resume: {exc}") from None
    lacking = [k for k in ("model", "optimizer", "scaler", "step", "train_config") if k not in state]
    if lacking or not isinstance(state.get("train_config"), dict):
        raise TrainingError(f"--resume: {resume_path} is not a resume state (it lacks {lacking or ['train_config']}; "
                            "a weights checkpoint is continued with --from_weight instead); run without --resume "
                            "to start fresh")
    mismatch = {k: (state["train_config"].get(k), getattr(cfg, k)) for k in RESUME_KEYS
                if state["train_config"].get(k) != getattr(cfg, k)}
    if state.get("world") != dist.world:
        mismatch["world size"] = (state.get("world"), dist.world)
    if mismatch:
        raise TrainingError(f"--resume: {resume_path} was written with different settings "
                            f"{mismatch}; use the same flags or start fresh")
    try:
        ensure_finite(state["model"], str(resume_path))
    except CheckpointError as exc:
        raise TrainingError(f"--resume: {exc}; the file is damaged, start fresh") from None
    try:
        load_weights(model, state["model"], f"--resume {resume_path}")
    except CheckpointError as exc:
        raise TrainingError(str(exc)) from None
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s at step %d/%d", resume_path, state["step"], total_steps)
    if state["step"] >= total_steps:
        log.info("nothing left to do: the run had finished")
    return state["step"]


def more_epochs_advice(history: list[Validation], epochs: int) -> str | None:
    """A hint when validation was still clearly improving at the end of training: the loss
    falling, or the exact match rising (it often keeps rising after the loss has turned up)."""
    if len(history) < 2:
        return None
    before, last = history[-2], history[-1]
    losses = [v.loss for v in history]
    more = f"more epochs would likely help (e.g. --epochs {2 * epochs})"
    drop = (before.loss - last.loss) / max(abs(before.loss), 1e-9)
    if last.loss <= min(losses) and drop >= 0.01:
        return (f"validation loss still falling ({before.loss:.4f} -> {last.loss:.4f} in the last epoch, "
                f"-{100 * drop:.1f}%): {more}")
    accuracies = [v.accuracy for v in history if v.accuracy is not None]
    if last.accuracy is not None and before.accuracy is not None and last.accuracy >= max(accuracies) \
            and last.accuracy - before.accuracy >= 0.01:
        return (f"validation exact match still rising ({100 * before.accuracy:.1f}% -> {100 * last.accuracy:.1f}% "
                f"in the last epoch): {more}")
    return None


def train_step(ddp, model, batches: list[dict], features: FeatureStore, opt, scaler, params, cfg: TrainConfig,
               dist: Dist, device, amp, lr: float, patches: tuple | None = None,
               debias: float | None = None) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns this process's share of the
    step's mean loss as a device tensor. Nothing here waits for the device: counts come from
    the host batches, and the global answer-token count is summed on the device."""
    n_local = float(sum(b["targets"].shape[0] for b in batches))
    if dist.enabled:
        total_targets = dist.all_sum(to_device({"n": torch.tensor([n_local], dtype=torch.float32)}, device)["n"])[0]
    else:
        total_targets = n_local
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # the tuned vision blocks follow --vision_lr
    step_loss = torch.zeros((), device=device, dtype=torch.float32)
    for m, batch in enumerate(batches):
        sync = m == len(batches) - 1
        ctx = ddp.no_sync() if dist.enabled and not sync else contextlib.nullcontext()
        feats = features.get(batch["image_index"])
        b = to_device(batch, device)
        extra = "closed_rows" in b or "look_pos" in b or (patches is not None and b["image_index"].numel())
        with ctx:
            with amp:
                out = ddp(b["input_ids"], feats, **{k: b[k] for k in MODEL_INPUTS if k in b}, return_logits=bool(extra))
                loss_sum, _, aux = out[:3]
                if "closed_rows" in b:
                    loss_sum = loss_sum + closed_answer_loss(out[3], b["closed_rows"], b["closed_tokens"],
                                                             b["closed_prior"],
                                                             cfg.debias if debias is None else debias, cfg.rank_weight,
                                                             cfg.rank_margin)
                if "look_pos" in b:
                    look = model.llm.layers[-1].self_attn
                    q, k = look.kept_qk
                    look.kept_qk = None  # not kept past this micro-batch
                    aux = aux + cfg.look_loss * look_loss(q, k, b["look_pos"], b["image_slots"], b["look_image"],
                                                          b["look_target"])
                if patches is not None and b["image_index"].numel():
                    index = b["image_index"]
                    aux = aux + cfg.patch_loss * patch_loss(model.patch_head, out[4], b["image_slots"],
                                                            patches[0].index_select(0, index),
                                                            patches[1].index_select(0, index))
            # DDP averages gradients over processes: scale so the result is the mean over
            # every answer token of the global batch.
            loss = loss_sum * dist.world / total_targets + aux / len(batches)
            scaler.scale(loss).backward()
        step_loss += loss_sum.detach().float()
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return step_loss / total_targets


def train(cfg: TrainConfig) -> dict:
    """Runs one stage; rank 0 holds ``out_dir/.<name>.lock`` for the whole run, so a second run
    writing the same checkpoint and metrics is refused instead of interleaving with this one."""
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(cfg)
    out_dir = resolve_path(cfg.out_dir)
    check_out_dir(out_dir, cfg)
    try:
        with output_lock(out_dir / f".{run_name(cfg)}.lock", f"{out_dir / run_name(cfg)}.pth"):
            return _train(cfg)
    except LockError as exc:
        raise TrainingError(str(exc)) from None


def preflight(cfg: TrainConfig):
    """What a user must fetch or convert, checked together before any model is built: when both
    the data and the CLIP weights are missing, one message names both fixes (each alone keeps
    its own detailed message, raised where it is found)."""
    from model.vision import CLONE_HINT, RANDOM_TOWERS
    problems = []
    if not resolve_path(cfg.data_path).is_file():
        problems.append(f"the training data {resolve_path(cfg.data_path)} is missing: run `python "
                        "convert_slake_dataset.py` (or `--demo` offline), or pass --data_path")
    name = cfg.vision_model
    local = name == DEFAULT_VISION_MODEL or Path(name).is_absolute() or name.startswith((".", "model/"))
    if name not in RANDOM_TOWERS and local and not resolve_path(name).is_dir():
        problems.append(f"the vision tower {resolve_path(name)} is missing: {CLONE_HINT} (or --vision_model random "
                        "for an offline smoke test)")
    if len(problems) > 1:
        raise TrainingError("two things are missing before training can start:\n  - " + "\n  - ".join(problems))


def _train(cfg: TrainConfig) -> dict:
    preflight(cfg)
    dist, device = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    dtype = compute_dtype(cfg.dtype, device)
    name = run_name(cfg)
    out_dir = resolve_path(cfg.out_dir)
    final_path = out_dir / f"{name}.pth"
    resume_path = out_dir / f"{name}_resume.pth"
    metrics_path = out_dir / f"{name}_metrics.jsonl"
    if dist.is_main:  # hidden temporary files of a save that was killed
        for p in (final_path, resume_path, metrics_path, out_dir / f"{name}_loss.png"):
            remove_stale_temps(p)
    log.info("stage %s -> %s | device %s | %s | world size %d", cfg.stage, final_path, device,
             str(dtype).replace("torch.", ""), dist.world)

    model, tok = build_model(cfg, device)
    log.info(model.parameter_line())
    encoder = ChatEncoder(tok, model.config.image_tokens)
    data, val, features, packed = setup_data(cfg, model, encoder, dist, device)
    patches = patch_tables(cfg, model, data, device)
    n_seq = len(packed) if packed else len(data)
    global_batch = cfg.batch_size * dist.world * cfg.accumulation_steps
    steps_per_epoch = n_seq // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{cfg.data_path} has {n_seq} training sequences, fewer than one global batch of "
                            f"{global_batch} (batch_size x processes x accumulation_steps): lower --batch_size")
    total_steps = steps_per_epoch * cfg.epochs
    log.info("data: %d samples (%d tokens, %d images)%s, %d steps/epoch x %d epochs, global batch %d",
             len(data), data.num_tokens(), len(data.image_paths),
             f", packed {cfg.pack_questions} per image into {n_seq} sequences" if packed else "",
             steps_per_epoch, cfg.epochs, global_batch)

    params, opt, scaler = make_optimizer(model, cfg, device, dtype)
    start_step = load_resume(cfg, resume_path, model, opt, scaler, dist, total_steps) if cfg.resume else 0

    if cfg.compile:
        model.llm.compile()
    ddp = model
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=False, broadcast_buffers=False)  # every parameter gets a gradient

    wandb_run = None
    if cfg.use_wandb and dist.is_main:
        try:
            import wandb
        except ImportError as exc:
            raise TrainingError("--use_wandb needs the wandb package: pip install wandb") from exc
        wandb_run = wandb.init(project=cfg.wandb_project, name=name, config=cfg.to_dict())
    metrics = MetricsLog(metrics_path, dist.is_main, resume_step=start_step if cfg.resume else None,
                         wandb_run=wandb_run)
    amp = autocast(device, dtype)
    saver = Checkpointer(cfg, final_path, resume_path, dist)
    prior = validation_prior(data, val)
    if prior is not None:
        log.info("validation baseline, the commonest training answer of each question text: exact match %s",
                 prior.exact_match_text())

    model.train()
    end_step = min(total_steps, cfg.stop_at_step) if cfg.stop_at_step else total_steps
    bar = Progress(total_steps, cfg.stage, "step", enabled=dist.is_main, initial=start_step, every=cfg.log_interval)
    window_loss = torch.zeros((), device=device, dtype=torch.float32)
    window_steps, window_tokens, t_window = 0, 0, time.perf_counter()
    last_val, val_history = None, []
    epoch_seconds: list[float] = []  # training steps only: validation and saving excluded
    t_epoch, paused = time.perf_counter(), 0.0
    step = start_step
    samples_epoch, samples = -1, data.samples
    perm_epoch, perm = -1, None
    pad_to = pad_multiple(cfg)
    try:
        while step < end_step:
            epoch = step // steps_per_epoch
            if packed is not None and epoch != samples_epoch:
                samples, samples_epoch = packed.epoch_samples(epoch), epoch
            if epoch != perm_epoch:  # one order per epoch, from (seed, epoch) alone
                perm = paired_permutation(samples, cfg.seed, epoch) if cfg.pair_closed else \
                    _epoch_perm(len(samples), cfg.seed, epoch)
                perm_epoch = epoch
            micro = [[samples[i] for i in m.tolist()] for m in _micro_batches(perm, step % steps_per_epoch, cfg, dist)]
            batches = [collate(m, model.config.pad_token_id, model.config.image_token_id, pad_to) for m in micro]
            lr = lr_at(step, total_steps, cfg)
            debias = cfg.debias if step < cfg.debias_until * total_steps else 0.0
            window_loss += train_step(ddp, model, batches, features, opt, scaler, params, cfg, dist, device, amp, lr,
                                      patches, debias)
            window_tokens += sum(len(s.input_ids) for m in micro for s in m)
            window_steps += 1
            step += 1

            epoch_end = step % steps_per_epoch == 0
            want_save = (cfg.save_interval and step % cfg.save_interval == 0) or epoch_end or step == end_step
            if step % cfg.log_interval == 0 or want_save:
                mean_loss = float(dist.all_sum(window_loss)) / window_steps  # the one sync per log interval
                if not math.isfinite(mean_loss):
                    raise TrainingError(
                        f"loss became {mean_loss} at step {step}: training diverged and this step was not "
                        f"saved; {saver.kept_message()}. Lower --learning_rate (now {cfg.learning_rate}), keep "
                        "--grad_clip on, or use --dtype bfloat16 instead of float16.")
                elapsed = time.perf_counter() - t_window
                tok_s = window_tokens * dist.world / max(elapsed, 1e-9)
                metrics.write({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": round(mean_loss, 6),
                               "lr": lr, "tokens_per_s": round(tok_s, 1)})
                bar.set_postfix(f"loss {mean_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s")
                window_loss.zero_()
                window_steps, window_tokens, t_window = 0, 0, time.perf_counter()
            bar.update(1)
            t_pause = time.perf_counter()
            if epoch_end:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                epoch_seconds.append(t_pause - t_epoch - paused)
                metrics.write({"step": step, "epoch": step // steps_per_epoch,
                               "epoch_seconds": round(epoch_seconds[-1], 3)})
            if epoch_end and val is not None:
                last_val = evaluate(model, val, features, cfg, dist, device, amp)
                val_history.append(last_val)
                metrics.write({"step": step, "epoch": step // steps_per_epoch, **last_val.row()})
            if epoch_end:
                bar.write(f"epoch {step // steps_per_epoch}/{cfg.epochs} done in {epoch_seconds[-1]:.1f} s"
                          + (f": {last_val.line()}" if last_val is not None else ""))
            if want_save:
                with_resume = step == end_step or bool(cfg.save_interval and step % cfg.save_interval == 0)
                saver.save(model, tok, opt, scaler, metrics, step, step // steps_per_epoch,
                           last_val.row() if last_val is not None else {"val_loss": None},
                           with_resume=with_resume, plot=epoch_end or step == end_step)
            if epoch_end:
                t_epoch, paused = time.perf_counter(), 0.0
            else:
                paused += time.perf_counter() - t_pause
    except KeyboardInterrupt:
        resume = f"; continue with --resume from {resume_path}" if resume_path.is_file() else ""
        raise TrainingInterrupted(f"interrupted at step {step}/{total_steps}: {saver.kept_message()}{resume}") from None
    finally:
        bar.close()
        metrics.close()
    if wandb_run is not None:
        wandb_run.finish()
    if saver.last_saved:
        log.info("saved %s at step %d (metrics %s, curve %s)", final_path, saver.last_saved[1], metrics.path,
                 out_dir / f"{name}_loss.png")
    else:
        log.info("nothing to train (step %d of %d): no checkpoint was written", step, total_steps)
    for advice in (more_epochs_advice(val_history, cfg.epochs), prior_advice(last_val, prior, cfg.epochs)):
        if advice:
            log.warning("%s", advice)
    return {"checkpoint": final_path if saver.last_saved else None, "resume": resume_path, "metrics": metrics.path,
            "steps": step, "total_steps": total_steps, "val_loss": last_val.loss if last_val else None,
            "validation": last_val, "epoch_seconds": epoch_seconds,
            "samples": n_seq, "tokens": sum(len(s_.input_ids) for s_ in samples) if packed else data.num_tokens(),
            "questions": len(data), "trainable_params": model.parameter_summary()["trainable"]}
