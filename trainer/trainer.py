"""The one training loop behind both stages.

Single GPU/CPU or ``torchrun --nproc_per_node N`` (NCCL on GPU, gloo on CPU). Every
optimizer step consumes one global batch of ``batch_size x world_size x
accumulation_steps`` samples drawn from a per-epoch permutation that depends only on
the seed and the epoch, and its loss is the mean over the *global* number of answer
tokens, so any split of the same global batch over processes or accumulation steps
computes the same update. Resume therefore reproduces the uninterrupted run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
import math
import os
import signal
import time
from pathlib import Path

import torch

from dataset.boxes import BOXES_FILE, grid_side, image_keys, patch_targets, read_boxes_file
from dataset.vqa_dataset import (PackedQuestions, VQADataset, annotate_contrast_look, annotate_look,
                                 closed_text_prior)
from infra.atomic import remove_stale_temps
from model.checkpoint import (build_config, checkpoint_path, load_weights, locate_checkpoint,
                              read_checkpoint, tokenizer_from_files)
from model.config import DEFAULT_VISION_MODEL, VLMConfig, resolve_path
from infra.lock import output_lock
from model.minimind_weights import load_minimind_llm
from infra.runtime import Progress, autocast, compute_dtype, seed_everything
from model.tokenization import ChatEncoder, load_tokenizer
from model.vision import CLONE_HINT, RANDOM_TOWERS, load_vision_tower
from model.vlm import MedicalVLM
from dataset.features import FeatureStore
from trainer.checkpointing import Checkpointer, load_resume
from trainer.config import TrainConfig
from trainer.distributed import Dist, init_distributed
from trainer.errors import TrainingError, TrainingInterrupted
from trainer.logs import MetricsLog
from trainer.schedule import lr_at
from trainer.step import BatchFeed, StepPlan, StepRunner, make_optimizer, shape_key, train_step
from trainer.interrupt import StopRequest, signal_name
from trainer.validation import evaluate, more_epochs_advice, prior_advice, validation_prior

log = logging.getLogger("train")

CLOSED_PRIOR_HINT = 0.7  # above this share the training log points at the image-use metrics
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe",
             "projector")


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


def boxes_file(cfg: TrainConfig) -> Path:
    if cfg.boxes_path != "auto":
        return resolve_path(cfg.boxes_path)
    return resolve_path(cfg.data_path).parent / BOXES_FILE


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
    model_cfg = build_config(tok, tower, **{k: getattr(cfg, k) for k in ARCH_KEYS})
    if cfg.max_seq_len > model_cfg.max_position_embeddings:
        raise TrainingError(f"--max_seq_len {cfg.max_seq_len} exceeds {model_cfg.max_position_embeddings}")
    model = MedicalVLM(model_cfg, tower)
    if ckpt is not None:
        try:
            old = VLMConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"--from_weight {start}: the stored config is not valid ({exc})") from None
        keys = (*ARCH_KEYS, "vocab_size")
        diff = {k: (getattr(old, k), getattr(model_cfg, k)) for k in keys if getattr(old, k) != getattr(model_cfg, k)}
        if diff:
            raise TrainingError(f"--from_weight {start} does not fit this run: {', '.join(f'{k} {a} vs {b}' for k, (a, b) in diff.items())}. "
                                "Use the same size flags as the run that wrote it, or --from_weight none")
        fp = ckpt["vision"].get("fingerprint")
        if fp and fp != tower.fingerprint():
            raise TrainingError(f"--from_weight {start} was trained with vision tower '{ckpt['vision']['id']}' "
                                f"({fp}) but this run uses '{tower.name}' ({tower.fingerprint()}): the projector "
                                "would see different features. Pass the same --vision_model.")
        load_weights(model, ckpt["model"], f"--from_weight {start}")  # a CheckpointError names the file
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
                                cfg.num_workers, progress=dist.is_main)
    dist.barrier()
    if features is None:
        features = FeatureStore(model.vision_tower, data.image_paths, device, cache_dir, cfg.feature_cache_gb,
                                cfg.num_workers, build=False, progress=False)
    n_closed, prior = closed_text_prior(data.samples)
    if prior is not None:  # how much the question text alone tells about closed answers
        log.info("closed training questions: %d; the commonest answer of each question text is right for %.1f%% "
                 "of them (50%% when every text is answered both ways equally often)%s", n_closed, 100 * prior,
                 "" if prior < CLOSED_PRIOR_HINT else
                 ": the text alone predicts most closed answers, so a good closed score need not mean the model "
                 "looks at the image (eval_vlm.py reports accuracy against the prior)")
    packed = PackedQuestions(data, encoder.image_id, cfg.pack_questions, cfg.seed) \
        if cfg.pack_questions > 1 else None
    return data, val, features, packed


def look_targets(cfg: TrainConfig, model: MedicalVLM, data: VQADataset, features: FeatureStore):
    """Attaches the --look_loss targets (where each question should look: from the boxes file,
    then --look_contrast for questions naming no box) to the training samples; says in the
    log when the data gives none."""
    if not cfg.look_loss:
        return
    grid = grid_side(model.config.image_tokens)
    if grid is None:
        log.info("--look_loss: the tower's %d image tokens are not a square grid; the loss is off",
                 model.config.image_tokens)
        return
    _box_looks(cfg, data, grid, contrast=cfg.look_contrast != "none")
    if cfg.look_contrast != "none":
        n = annotate_contrast_look(data, features.get, grid)
        log.info("--look_contrast %s: %d training questions look where their image differs from the images "
                 "their text was answered otherwise on, near the same place, both ways", cfg.look_contrast, n)


def _box_looks(cfg: TrainConfig, data: VQADataset, grid: int, contrast: bool):
    if not boxes_file(cfg).is_file():
        log.info("--look_loss: no %s beside the data (no organ/finding boxes)%s; convert_slake_dataset.py writes it "
                 "from SLAKE's detection.json files", BOXES_FILE,
                 "" if contrast else ", so the model is not told where to look")
        return
    table = read_boxes_file(boxes_file(cfg))  # a BoxError names the image and the field
    classes, targets, known = patch_targets(table, image_keys(data.image_paths, resolve_path(cfg.images_path)), grid)
    n = annotate_look(data, classes, targets, known)
    if n:
        log.info("--look_loss %g: %d of %d training questions name a box of their image (%s)", cfg.look_loss,
                 n, len(data), ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else ""))
    else:
        log.info("--look_loss: no question names a box of its image (%s)%s",
                 "no boxes in the data" if not classes else f"{int(known.sum())} images with boxes",
                 "" if contrast else ", so the model is not told where to look")


def stop_now(stop: StopRequest, dist: Dist, step: int, every: int, device) -> bool:
    """Whether to stop after ``step``. Under torchrun every process must stop at the same step (the
    save waits for all of them), so the request is agreed on once per log interval, with the one
    sync the loss log already makes there; alone, at once."""
    if not dist.enabled:
        return stop.requested
    if step % every:
        return False
    return float(dist.all_sum(torch.tensor([float(stop.requested)], device=device))[0]) > 0


def train(cfg: TrainConfig) -> dict:
    """Runs one stage; rank 0 holds ``out_dir/.<name>.lock`` for the whole run, so a second run
    writing the same checkpoint and metrics is refused instead of interleaving with this one."""
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(cfg)
    out_dir = resolve_path(cfg.out_dir)
    check_out_dir(out_dir, cfg)
    with output_lock(out_dir / f".{run_name(cfg)}.lock", f"{out_dir / run_name(cfg)}.pth"):
        return _train(cfg)


def preflight(cfg: TrainConfig):
    """What a user must fetch or convert, checked together before any model is built: when both
    the data and the CLIP weights are missing, one message names both fixes (each alone keeps
    its own detailed message, raised where it is found)."""
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


@dataclass
class Run:
    """Everything the training loop works with, built once by ``_setup``."""
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model: MedicalVLM
    tok: object
    data: VQADataset
    val: VQADataset | None
    features: FeatureStore
    packed: PackedQuestions | None
    n_seq: int
    steps_per_epoch: int
    total_steps: int
    start_step: int
    params: list
    opt: torch.optim.Optimizer
    scaler: object
    runner: StepRunner
    feed: BatchFeed
    epoch0: list
    metrics: MetricsLog
    saver: Checkpointer
    amp: object
    prior: object
    out_dir: Path
    name: str
    wandb_run: object = None


def _paths(cfg: TrainConfig, dist: Dist) -> tuple[Path, str]:
    out_dir, name = resolve_path(cfg.out_dir), run_name(cfg)
    if dist.is_main:  # hidden temporary files of a save that was killed
        for p in (out_dir / f"{name}.pth", out_dir / f"{name}_resume.pth", out_dir / f"{name}_metrics.jsonl",
                  out_dir / f"{name}_loss.png"):
            remove_stale_temps(p)
    return out_dir, name


def _setup(cfg: TrainConfig) -> Run:
    """Device, model, data, step plan, optimizer (and resume state), metrics and saver."""
    preflight(cfg)
    dist, device = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    dtype = compute_dtype(cfg.dtype, device)
    out_dir, name = _paths(cfg, dist)
    log.info("stage %s -> %s | device %s | %s | world size %d", cfg.stage, out_dir / f"{name}.pth", device,
             str(dtype).replace("torch.", ""), dist.world)
    model, tok = build_model(cfg, device)
    log.info(model.parameter_line())
    data, val, features, packed = setup_data(cfg, model, ChatEncoder(tok, model.config.image_tokens), dist, device)
    look_targets(cfg, model, data, features)
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
    resume_path = out_dir / f"{name}_resume.pth"
    fingerprint = {"samples": len(data), "sha": data.fingerprint()}
    start_step = load_resume(cfg, resume_path, model, opt, scaler, dist, total_steps, fingerprint) \
        if cfg.resume else 0
    ddp = model
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=False, broadcast_buffers=False)  # every parameter gets a gradient
    plan = StepPlan(data.samples, packed, cfg, dist, steps_per_epoch, model.config.pad_token_id,
                    model.config.image_token_id, None, pin=device.type == "cuda")
    epoch0 = plan.epoch(0)[0]  # (packed once; the plan keeps it for the first epoch)
    runner = StepRunner(ddp, cfg, device, total_steps, epoch0, val.samples if val is not None else None,
                        out_dir / "compile_cache")
    plan.shapes = runner.shapes
    overlap = cfg.prefetch if cfg.prefetch is not None else device.type == "cuda"
    log.info("batch feed: %s", ("next batches built on a worker thread" if overlap else "batches built in the loop")
             + ("" if cfg.prefetch is not None else f" (--prefetch auto: {'on' if overlap else 'off'} on {device.type})"))
    wandb_run = _wandb(cfg, dist, name)
    metrics = MetricsLog(out_dir / f"{name}_metrics.jsonl", dist.is_main,
                         resume_step=start_step if cfg.resume else None, wandb_run=wandb_run)
    prior = validation_prior(data, val)
    if prior is not None:
        log.info("validation baseline, the commonest training answer of each question text: exact match %s",
                 prior.exact_match_text())
    return Run(cfg, dist, device, model, tok, data, val, features, packed, n_seq, steps_per_epoch, total_steps,
               start_step, params, opt, scaler, runner, BatchFeed(plan, overlap=overlap), epoch0, metrics,
               Checkpointer(cfg, out_dir / f"{name}.pth", resume_path, dist, data_fingerprint=fingerprint),
               autocast(device, dtype), prior,
               out_dir, name, wandb_run)


def _wandb(cfg: TrainConfig, dist: Dist, name: str):
    if not (cfg.use_wandb and dist.is_main):
        return None
    try:
        import wandb  # optional: only for --use_wandb
    except ImportError as exc:
        raise TrainingError("--use_wandb needs the wandb package: pip install wandb") from exc
    return wandb.init(project=cfg.wandb_project, name=name, config=cfg.to_dict())


class EpochClock:
    """Training-step seconds per epoch, with validation, saving and compiling kept apart: each step
    that compiles a new batch shape is timed (a sync before and after) and reported on its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.epoch_seconds: list[float] = []
        self.compile_seconds: list[float] = []
        self.shapes: set = set()
        self.t_epoch, self.paused, self.compiling = time.perf_counter(), 0.0, 0.0
        self.t_compile = self.t_pause = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def new_shape(self, key) -> bool:
        """Whether this step compiles (a shape not seen before); starts its timer."""
        if key is None or key in self.shapes:
            return False
        self.shapes.add(key)
        self._sync()
        self.t_compile = time.perf_counter()
        return True

    def compiled(self, width: int):
        self._sync()
        seconds = time.perf_counter() - self.t_compile
        self.compiling += seconds
        log.info("compiled the step for batches of width %d in %.1f s (%d shape(s) so far)", width, seconds,
                 len(self.shapes))

    def pause(self):
        self.t_pause = time.perf_counter()

    def end_epoch(self) -> float:
        self._sync()
        self.epoch_seconds.append(self.t_pause - self.t_epoch - self.paused - self.compiling)
        self.compile_seconds.append(self.compiling)
        return self.epoch_seconds[-1]

    def resume(self, epoch_end: bool):
        if epoch_end:
            self.t_epoch, self.paused, self.compiling = time.perf_counter(), 0.0, 0.0
        else:
            self.paused += time.perf_counter() - self.t_pause


def _step(run: Run, batches, lr: float, new_shape: bool) -> torch.Tensor:
    """One optimizer step. --compile auto turns compiling on for every long CUDA run: a compiler
    failure on a step that compiles must not end the run, and the eager step computes the same
    update (nothing was stepped yet), so only such a step is retried, with a warning."""
    def once():
        return train_step(run.runner.run, run.model, batches, run.features, run.opt, run.scaler, run.params, run.cfg,
                          run.dist, run.device, run.amp, lr, run.runner.graphs)
    try:
        return once()
    except Exception as exc:  # noqa: BLE001
        if not new_shape:
            raise
        run.runner.fall_back("the training step", exc)
        run.opt.zero_grad(set_to_none=True)
        return once()


def _validate(run: Run):
    """The validation pass: the compiled forward (eval mode compiles its own graphs, once per
    validation shape), under torchrun the plain model; a compiler failure falls back to eager."""
    fast = run.runner.compiled and not run.dist.enabled
    try:
        return evaluate(run.runner.run if fast else run.model, run.val, run.features, run.cfg, run.dist, run.device,
                        run.amp, run.runner.val_shapes if fast else None, run.runner.graphs and fast)
    except Exception as exc:  # noqa: BLE001 (as for the training step: only a compiled pass)
        if not fast:
            raise
        run.runner.fall_back("the validation pass", exc)
        return evaluate(run.model, run.val, run.features, run.cfg, run.dist, run.device, run.amp)


@dataclass
class LossWindow:
    """The summed loss and tokens since the last log line (the loss stays on the device)."""
    loss: torch.Tensor
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def log(self, run: Run, step: int, lr: float, bar: Progress):
        mean_loss = float(run.dist.all_sum(self.loss)) / self.steps  # the one sync per log interval
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"loss became {mean_loss} at step {step}: training diverged and this step was not "
                f"saved; {run.saver.kept_message()}. Lower --learning_rate (now {run.cfg.learning_rate}), keep "
                "--grad_clip on, or use --dtype bfloat16 instead of float16.")
        tok_s = self.tokens * run.dist.world / max(time.perf_counter() - self.t0, 1e-9)
        run.metrics.write({"step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": round(mean_loss, 6),
                           "lr": lr, "tokens_per_s": round(tok_s, 1)})
        bar.set_postfix(f"loss {mean_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s")
        self.loss.zero_()
        self.steps, self.tokens, self.t0 = 0, 0, time.perf_counter()


def _train(cfg: TrainConfig) -> dict:
    run = _setup(cfg)
    end_step = min(run.total_steps, cfg.stop_at_step) if cfg.stop_at_step else run.total_steps
    bar = Progress(run.total_steps, cfg.stage, "step", enabled=run.dist.is_main, initial=run.start_step,
                   every=cfg.log_interval)
    window = LossWindow(torch.zeros((), device=run.device, dtype=torch.float32))
    clock = EpochClock(run.device)
    last_val, val_history = None, []
    step, spe = run.start_step, run.steps_per_epoch
    run.model.train()
    stop = StopRequest()
    try:
        stop.__enter__()
        while step < end_step:
            batches, n_tokens = run.feed.get(step, step + 1 if step + 1 < end_step else None)
            new_shape = clock.new_shape(shape_key(batches) if run.runner.compiled else None)
            lr = lr_at(step, run.total_steps, cfg)
            window.loss += _step(run, batches, lr, new_shape)
            if new_shape:
                clock.compiled(batches[0]["input_ids"].shape[1])
            window.tokens += n_tokens
            window.steps += 1
            step += 1
            epoch_end = step % spe == 0
            want_save = (cfg.save_interval and step % cfg.save_interval == 0) or epoch_end or step == end_step
            if step % cfg.log_interval == 0 or want_save:
                window.log(run, step, lr, bar)
            bar.update(1)
            clock.pause()
            if epoch_end:
                seconds = clock.end_epoch()
                run.metrics.write({"step": step, "epoch": step // spe, "epoch_seconds": round(seconds, 3),
                                   **({"compile_seconds": round(clock.compiling, 3)}
                                      if run.runner.shapes is not None else {})})
                if run.val is not None:
                    last_val = _validate(run)
                    val_history.append(last_val)
                    run.metrics.write({"step": step, "epoch": step // spe, **last_val.row()})
                bar.write(f"epoch {step // spe}/{cfg.epochs} done in {seconds:.1f} s"
                          + (f" (+ {clock.compiling:.1f} s compiling)" if clock.compiling else "")
                          + (f": {last_val.line()}" if last_val is not None else ""))
            if want_save:
                with_resume = step == end_step or bool(cfg.save_interval and step % cfg.save_interval == 0)
                run.saver.save(run.model, run.tok, run.opt, run.scaler, run.metrics, step, step // spe,
                               last_val.row() if last_val is not None else {"val_loss": None},
                               with_resume=with_resume, plot=epoch_end or step == end_step)
            clock.resume(epoch_end)
            if stop_now(stop, run.dist, step, cfg.log_interval, run.device) and step < end_step:
                _stop_here(run, step, stop.signal)  # at a step boundary: weights and optimizer agree
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted at step {step}/{run.total_steps}: {run.saver.kept_message()}"
                                  f"{run.saver.resume_advice()}", signal.SIGINT) from None
    finally:
        stop.__exit__()
        run.feed.close()
        bar.close()
        run.metrics.close()
    return _finish(run, step, last_val, val_history, clock)


def _stop_here(run: Run, step: int, signum: int | None):
    if run.saver.resume_saved != step:
        run.saver.save_resume(run.model, run.opt, run.scaler, run.metrics, step)
    raise TrainingInterrupted(f"stopped at step {step}/{run.total_steps} ({signal_name(signum)}): a resume state "
                              f"was saved; {run.saver.kept_message()}{run.saver.resume_advice()}", signum)


def _finish(run: Run, step: int, last_val, val_history: list, clock: EpochClock) -> dict:
    """The end of a run: what was saved, the advice, and the run's summary."""
    if run.wandb_run is not None:
        run.wandb_run.finish()
    if run.saver.last_saved:
        log.info("saved %s at step %d (metrics %s, curve %s)", run.saver.final_path, run.saver.last_saved[1],
                 run.metrics.path, run.out_dir / f"{run.name}_loss.png")
    else:
        log.info("nothing to train (step %d of %d): no checkpoint was written", step, run.total_steps)
    for advice in (more_epochs_advice(val_history, run.cfg.epochs), prior_advice(last_val, run.prior, run.cfg.epochs)):
        if advice:
            log.warning("%s", advice)
    return {"checkpoint": run.saver.final_path if run.saver.last_saved else None, "resume": run.saver.resume_path,
            "metrics": run.metrics.path, "steps": step, "total_steps": run.total_steps,
            "val_loss": last_val.loss if last_val else None, "validation": last_val,
            "epoch_seconds": clock.epoch_seconds, "compile": run.runner.choice,
            "compile_seconds": clock.compile_seconds, "step_shapes": len(clock.shapes), "samples": run.n_seq,
            "tokens": sum(len(s_.input_ids) for s_ in run.epoch0) if run.packed else run.data.num_tokens(),
            "questions": len(run.data), "trainable_params": run.model.parameter_summary()["trainable"]}
