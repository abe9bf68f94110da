"""The one checkpoint API: file names, atomic writes, what goes in, how it comes back.

A checkpoint is a single ``.pth`` holding the language model + projector weights (never
the frozen vision tower), the full ``VLMConfig``, the tokenizer files, the vision tower's
id and weight fingerprint, the training stage and step. ``load_model`` rebuilds the
model from the file alone and refuses a vision tower whose weights differ from the one
the model was trained with.
"""
from __future__ import annotations

import logging
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.atomic import atomic_open
from model.config import VLMConfig, resolve_path
from model.tokenization import end_token_id, image_token_id, prepare_tokenizer
from model.vision import VisionTower, load_vision_tower
from model.vlm import MedicalVLM

log = logging.getLogger(__name__)

FORMAT = "medical-vlm"
FORMAT_VERSION = 1
STAGE_PREFIX = {"pretrain": "medical_pretrain_vlm", "sft": "medical_vlm"}
STAGE_SCRIPT = {"pretrain": "python train_pretrain_vlm.py", "sft": "python train_sft_vlm.py"}


class CheckpointError(ValueError):
    pass


def checkpoint_name(stage: str, hidden_size: int, use_moe: bool) -> str:
    return f"{STAGE_PREFIX[stage]}_{hidden_size}{'_moe' if use_moe else ''}.pth"


def checkpoint_path(out_dir: str | Path, stage: str, hidden_size: int, use_moe: bool) -> Path:
    return resolve_path(out_dir) / checkpoint_name(stage, hidden_size, use_moe)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save through a temporary file (see model/atomic.py)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def safe_load(path: str | Path, what: str = "checkpoint", hint: str = "") -> dict:
    """torch.load with weights_only=True and errors that say what the file is not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found{'; ' + hint if hint else ''}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable PyTorch file (not a torch.save archive: truncated, "
                              "corrupted or another format); re-create it or point to the right file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupted?): {exc}") from exc
    except Exception as exc:  # unpickling of a foreign object refused by weights_only
        raise CheckpointError(f"{path} holds objects other than tensors and plain data; refusing to load "
                              f"it ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a {what}")
    return obj


def tokenizer_files(tok: PreTrainedTokenizerBase) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(d).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            (Path(d) / name).write_text(text, encoding="utf-8")
        return prepare_tokenizer(AutoTokenizer.from_pretrained(d), "checkpoint")


def build_config(tok: PreTrainedTokenizerBase, tower: VisionTower | None, **overrides) -> VLMConfig:
    """The only place where token ids and vision sizes enter the config: from the tokenizer
    and the tower themselves, never from literals."""
    cfg = dict(overrides)
    cfg.update(vocab_size=len(tok), image_token_id=image_token_id(tok), pad_token_id=tok.pad_token_id,
               eos_token_id=end_token_id(tok))
    if tower is not None:
        cfg.update(vision_model=tower.name, vision_hidden_size=tower.hidden_size, image_tokens=tower.num_patches)
    return VLMConfig(**cfg)


@dataclass
class LoadedCheckpoint:
    model: MedicalVLM
    tokenizer: PreTrainedTokenizerBase
    config: VLMConfig
    stage: str
    step: int
    path: Path
    meta: dict = field(default_factory=dict)


def save_checkpoint(path: str | Path, model: MedicalVLM, tok: PreTrainedTokenizerBase, stage: str,
                    step: int, extra: dict | None = None) -> Path:
    model = getattr(model, "module", model)  # DDP / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    tower = model.vision_tower
    state = {k: v.detach().to("cpu").clone() for k, v in model.trainable_state_dict().items()}
    obj = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": state,
        "config": model.config.to_dict(),
        "tokenizer": tokenizer_files(tok),
        "vision": {"id": model.config.vision_model,
                   "fingerprint": tower.fingerprint() if tower is not None else None},
        "stage": stage, "step": int(step),
        "extra": extra or {},
    }
    return atomic_save(obj, path)


def read_checkpoint(path: str | Path, stage_hint: str | None = None) -> dict:
    hint = ""
    if stage_hint in STAGE_SCRIPT:
        hint = f"run `{STAGE_SCRIPT[stage_hint]}` first to produce it, or pass --model_path"
    obj = safe_load(resolve_path(path), "checkpoint", hint)
    if obj.get("format") != FORMAT:
        looks_llm = any(k.startswith(("tok_embeddings", "model.embed_tokens", "layers.")) for k in obj)
        raise CheckpointError(
            f"{path} is not a medical-VLM checkpoint (no '{FORMAT}' header)"
            + ("; it looks like MiniMind language-model weights: pass them to training with --from_llm"
               if looks_llm else ""))
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version (format {obj['format_version']}); "
                              "update this toolkit")
    return obj


def load_model(path: str | Path, device: str | torch.device = "cpu", vision_model: str | None = None,
               stage_hint: str | None = None, with_vision: bool = True) -> LoadedCheckpoint:
    """Rebuilds model + tokenizer from a checkpoint. ``vision_model`` overrides where the
    tower is loaded from (e.g. another local copy); its weights must still match."""
    obj = read_checkpoint(path, stage_hint)
    config = VLMConfig.from_dict(obj["config"])
    tok = tokenizer_from_files(obj["tokenizer"])
    if len(tok) != config.vocab_size or image_token_id(tok) != config.image_token_id:
        raise CheckpointError(f"{path}: stored tokenizer ({len(tok)} tokens) does not match the model "
                              f"config ({config.vocab_size}); the file is inconsistent")
    tower = None
    if with_vision:
        tower = load_vision_tower(vision_model or obj["vision"]["id"])
        expected = obj["vision"].get("fingerprint")
        if expected and tower.fingerprint() != expected:
            raise CheckpointError(
                f"vision tower '{tower.name}' has weights {tower.fingerprint()} but {path} was trained with "
                f"'{obj['vision']['id']}' weights {expected}: its features would not match what the "
                "projector learned. Use the same tower (--vision_model) as in training.")
    model = MedicalVLM(config, tower)
    try:
        missing, unexpected = model.load_state_dict(obj["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit the stored config ({str(exc).splitlines()[1].strip()})") from exc
    missing = [k for k in missing if not k.startswith("vision_tower.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the stored config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    model.to(device).eval()
    return LoadedCheckpoint(model, tok, config, obj["stage"], obj["step"], resolve_path(path), obj.get("extra", {}))

