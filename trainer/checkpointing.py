"""The run's one save path (Checkpointer, with its NaN/Inf guard) and ``--resume``."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path


from model.checkpoint import CheckpointError, atomic_save, ensure_finite, load_weights, safe_load, save_checkpoint
from model.config import resolve_path
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.errors import TrainingError
from trainer.logs import MetricsLog, plot_losses

log = logging.getLogger("train")

# fields that must agree between a resume state and the run continuing it
RESUME_KEYS = ("stage", "hidden_size", "num_hidden_layers", "use_moe", "batch_size", "accumulation_steps",
               "epochs", "seed", "data_path", "learning_rate", "vision_model", "projector", "pack_questions",
               "look_loss", "look_contrast")
# what a resume state written before a RESUME_KEYS field existed trained with
RESUME_KEY_BEFORE = {"look_contrast": "none"}
# Flags that lost their measurements and were removed (docs/learning.md has the numbers): the value
# that meant "off", and the last commit that had the flag. A resume state that recorded another value
# trained with it.
REMOVED_FLAGS = {**{k: (off, "ab73515") for k, off in (
    ("balance_closed", False), ("pair_closed", False), ("projector_lr_scale", 1.0), ("debias", 0.0),
    ("debias_until", 1.0), ("rank_weight", 0.0), ("rank_margin", 1.0))}, "prior_weight": (0.0, "934e6a6"),
    "look_fallback": ("none", "934e6a6"), "patch_loss": (0.0, "27ee718"),
    "train_vision": ("none", "5bbdddf"), "vision_lr": (2e-5, "5bbdddf")}
# values of kept flags that were removed
REMOVED_CHOICES = {("projector", "film"): "27ee718", ("look_contrast", "contrast"): "a0d7012",
                   ("look_contrast", "all"): "a9e8ae9", ("look_contrast", "nearest"): "88f56f9"}


ALL_REMOVED_AT = "934e6a6"  # a commit that still had every removed flag


def removed_flags_used(train_config: dict) -> dict[str, tuple[object, str]]:
    """The removed flags (and the removed --projector film) a stored run configuration used:
    flag -> (its value, the last commit that had it)."""
    used = {k: (v, REMOVED_FLAGS[k][1]) for k, v in train_config.items()
            if k in REMOVED_FLAGS and v != REMOVED_FLAGS[k][0]}
    used.update({k: (v, commit) for (k, v), commit in REMOVED_CHOICES.items() if train_config.get(k) == v})
    return used


def _commit_with(used: dict[str, tuple[object, str]]) -> str:
    """A commit that still had every removed flag or value in ``used``."""
    commits = {commit for _, commit in used.values()}
    return commits.pop() if len(commits) == 1 else f"{ALL_REMOVED_AT} (it has all of them)"


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
    resume_saved: int | None = None  # the step of the resume state this run wrote, if any
    data_fingerprint: dict | None = None  # {"samples", "sha"} of the training data (VQADataset.fingerprint)
    previous: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.previous = [p for p in (self.final_path, self.resume_path) if p.is_file()]

    def kept_message(self) -> str:
        if self.last_saved:
            return f"the last good checkpoint {self.last_saved[0]} (step {self.last_saved[1]}) is kept"
        if self.previous:
            return f"nothing was saved by this run; {', '.join(map(str, self.previous))} from before is untouched"
        return "nothing was saved"

    def save(self, model, tok, opt, scaler, metrics: MetricsLog, step: int, epoch: int, extra: dict,
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
                self._save_resume(model, opt, scaler, step)
            if plot:
                plot_losses(metrics.rows(), self.final_path.with_name(f"{self.final_path.stem}_loss.png"),
                            f"{self.final_path.stem} ({self.cfg.stage})")
        self.last_saved = (self.final_path, step)
        self.dist.barrier()

    def _save_resume(self, model, opt, scaler, step: int):
        atomic_save({"model": model.trainable_state_dict(), "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "world": self.dist.world,
                     "train_config": self.cfg.to_dict(), "data": self.data_fingerprint}, self.resume_path)
        self.resume_saved = step

    def save_resume(self, model, opt, scaler, metrics: MetricsLog, step: int):
        """A resume state at ``step`` alone (Ctrl-C mid-epoch): the weights checkpoint keeps its last
        epoch, so a stopped run never leaves a half-trained model under the final name."""
        if self.dist.is_main:
            metrics.commit()
            self._save_resume(model, opt, scaler, step)
        self.dist.barrier()

    def resume_advice(self) -> str:
        """Where to continue from: only a resume state this run wrote (an older one may hold other
        settings, and --resume would refuse it)."""
        if self.resume_saved is None:
            return ""
        return f"; continue with --resume (it reads {self.resume_path}, step {self.resume_saved})"


def load_resume(cfg: TrainConfig, resume_path: Path, model, opt, scaler, dist: Dist, total_steps: int,
                data: dict | None = None) -> int:
    """Continues from a resume state after checking that it is this run's: the same settings
    (RESUME_KEYS), world size and training data (``data``: {"samples", "sha"}, as the Checkpointer
    stores it); a mismatch stops with what differs. Returns the step to continue from."""
    try:
        state = safe_load(resume_path, "resume state", "run without --resume to start fresh")
    except CheckpointError as exc:
        raise TrainingError(f"--resume: {exc}") from None
    lacking = [k for k in ("model", "optimizer", "scaler", "step", "train_config") if k not in state]
    if lacking or not isinstance(state.get("train_config"), dict):
        raise TrainingError(f"--resume: {resume_path} is not a resume state (it lacks {lacking or ['train_config']}; "
                            "a weights checkpoint is continued with --from_weight instead); run without --resume "
                            "to start fresh")
    used = removed_flags_used(state["train_config"])
    if used:
        raise TrainingError(f"--resume: {resume_path} was trained with flags this toolkit no longer has "
                            f"({', '.join(f'--{k} {v}' for k, (v, _) in used.items())}; they lost their measurements, "
                            f"docs/learning.md); continue it with the toolkit at commit "
                            f"{_commit_with(used)}, or start fresh without --resume")
    _check_same_run(cfg, state, resume_path, dist, data)
    try:
        ensure_finite(state["model"], str(resume_path))
    except CheckpointError as exc:
        raise TrainingError(f"--resume: {exc}; the file is damaged, start fresh") from None
    load_weights(model, state["model"], f"--resume {resume_path}")  # a CheckpointError is a UserError
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s at step %d/%d", resume_path, state["step"], total_steps)
    if state["step"] >= total_steps:
        log.info("nothing left to do: the run had finished")
    return state["step"]


def _check_same_run(cfg: TrainConfig, state: dict, resume_path: Path, dist: Dist, data: dict | None):
    stored = {**RESUME_KEY_BEFORE, **state["train_config"]}
    then = state.get("data")
    # the data's fingerprint supersedes its path: the same data in another folder resumes
    keys = [k for k in RESUME_KEYS if not (k == "data_path" and then is not None and data is not None)]
    mismatch = {k: (stored.get(k), getattr(cfg, k)) for k in keys if stored.get(k) != getattr(cfg, k)}
    if state.get("world") != dist.world:
        mismatch["world size"] = (state.get("world"), dist.world)
    if mismatch:
        raise TrainingError(f"--resume: {resume_path} was written with different settings "
                            f"{mismatch}; use the same flags or start fresh")
    if data is None or then is None:  # a resume state from before the data was fingerprinted
        if data is not None:
            log.warning("--resume: %s does not record which training data it saw (an older toolkit wrote it); "
                        "continuing on %s as it is now", resume_path, cfg.data_path)
        return
    if then != data:
        raise TrainingError(
            f"--resume: the training data changed since {resume_path} was written: {cfg.data_path} now gives "
            f"{data['samples']} samples (fingerprint {data['sha']}), the run trained on {then.get('samples')} "
            f"(fingerprint {then.get('sha')}). Continuing would mix two datasets in one run: put back the data it "
            "was trained on (re-convert with the same flags and --seed), or start fresh without --resume")
