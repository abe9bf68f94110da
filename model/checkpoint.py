"""The one checkpoint API: file names, atomic writes, what goes in, how it comes back.

Every reader takes a ``.pth`` checkpoint, a model folder written by ``save_pretrained``
(model/pretrained.py: config.json + model.safetensors + tokenizer + model card) or a hub id
of such a folder. A ``.pth`` checkpoint is a single file holding the language model + projector weights (never
the frozen vision tower), the full ``VLMConfig``, the tokenizer files, the vision tower's
id and weight fingerprint, the training stage and step. ``load_model`` rebuilds the
model from the file alone and refuses a vision tower whose weights differ from the one
the model was trained with.
"""
from __future__ import annotations

import logging
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from infra.atomic import atomic_open
from infra.runtime import unwrap
from model.config import VLMConfig, resolve_path
from model.tokenization import end_token_id, image_token_id, prepare_tokenizer
from model.vision import VisionTower, load_vision_tower
from model.pretrained import CONFIG, WEIGHTS, download, is_pretrained_dir, looks_like_hub_id, read_pretrained
from model.format import FORMAT, FORMAT_VERSION, TOKENIZER_FILES, CheckpointError, ensure_finite  # noqa: F401
from model.vlm import MedicalVLM

log = logging.getLogger(__name__)

STAGE_PREFIX = {"pretrain": "medical_pretrain_vlm", "sft": "medical_vlm"}
STAGE_SCRIPT = {"pretrain": "python train_pretrain_vlm.py", "sft": "python train_sft_vlm.py"}


def checkpoint_name(stage: str, hidden_size: int, use_moe: bool) -> str:
    return f"{STAGE_PREFIX[stage]}_{hidden_size}{'_moe' if use_moe else ''}.pth"


def checkpoint_path(out_dir: str | Path, stage: str, hidden_size: int, use_moe: bool) -> Path:
    return resolve_path(out_dir) / checkpoint_name(stage, hidden_size, use_moe)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save through a temporary file (see infra/atomic.py)."""
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
        return {p.name: p.read_text(encoding="utf-8") for p in Path(d).iterdir()
                if p.is_file() and p.name in TOKENIZER_FILES}


def tokenizer_from_files(files, source: str = "checkpoint") -> PreTrainedTokenizerBase:
    """Rebuilds the tokenizer stored in a checkpoint. Only the allow-listed file names are
    written, each into a fresh private temporary folder, and nothing else."""
    if not isinstance(files, dict) or "tokenizer.json" not in files:
        raise CheckpointError(f"{source}: the stored tokenizer is missing or has no tokenizer.json")
    bad = [name for name in files if name not in TOKENIZER_FILES]
    if bad:
        raise CheckpointError(f"{source}: the stored tokenizer has entries that are not tokenizer file names "
                              f"({', '.join(repr(b) for b in bad[:3])}); refusing to load it. The file may have "
                              "been tampered with: only use checkpoints from sources you trust")
    if not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{source}: the stored tokenizer files are not text")
    with tempfile.TemporaryDirectory() as d:
        for name in TOKENIZER_FILES & files.keys():
            (Path(d) / name).write_text(files[name], encoding="utf-8")
        try:
            tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        except Exception as exc:  # malformed JSON and the like: transformers raises many types
            raise CheckpointError(f"{source}: the stored tokenizer cannot be read ({exc.__class__.__name__}: "
                                  f"{exc})") from exc
        return prepare_tokenizer(tok, source)


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
    vision: dict = field(default_factory=dict)  # the tower id and weight fingerprint it was trained with


def save_checkpoint(path: str | Path, model: MedicalVLM, tok: PreTrainedTokenizerBase, stage: str,
                    step: int, extra: dict | None = None, dtype: str | torch.dtype = "float32") -> Path:
    """Writes the checkpoint atomically; refuses (CheckpointError, nothing written) when any
    weight is NaN/Inf. ``dtype``: precision of the stored floating-point weights."""
    model = unwrap(model)  # DDP / compiled wrappers
    tower = model.vision_tower
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).clone()
             for k, v in model.trainable_state_dict().items()}
    ensure_finite(state, f"not saving {path}")
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


def locate_checkpoint(spec: str | Path, stage_hint: str | None = None) -> Path:
    """Where a checkpoint given as a ``.pth`` file, a model folder (``save_pretrained``) or a
    hub id of such a folder is on disk (hub ids are downloaded once)."""
    local = resolve_path(spec)
    if local.exists() or local.is_symlink():
        return local
    if Path(spec).is_absolute() or not looks_like_hub_id(str(spec)):
        hint = produced_by(local)
        if stage_hint in STAGE_SCRIPT and "writes it" not in hint:
            hint = f"; run `{STAGE_SCRIPT[stage_hint]}` first to produce it, or pass --model_path" + hint
        where = "" if str(local) == str(spec) else f" (looked for {local})"
        raise FileNotFoundError(f"{spec} not found{where}{hint}")
    return download(str(spec))


def produced_by(path: Path) -> str:
    """'; run X first to produce it' for the toolkit's own checkpoint names, and the other
    checkpoints beside it (another size or stage) with the flags that would use them."""
    name = path.name
    hint = ""
    for stage, prefix in STAGE_PREFIX.items():
        if re.fullmatch(rf"{prefix}_\d+(_moe)?\.pth", name):
            size = name.removeprefix(prefix + "_").split(".")[0].split("_")[0]
            hint = f"; `{STAGE_SCRIPT[stage]} --hidden_size {size}` writes it"
    others = sorted(p.name for p in path.parent.glob("medical_*vlm_*.pth")) if path.parent.is_dir() else []
    others = [o for o in others if o != name and not o.endswith("_resume.pth")]
    if others:
        hint += f" (found beside it: {', '.join(others[:4])}: pass one of them instead, with its size flags)"
    return hint


def read_checkpoint(path: str | Path, stage_hint: str | None = None) -> dict:
    """The checkpoint's dictionary, from a ``.pth``, a model folder or a hub id."""
    hint = ""
    if stage_hint in STAGE_SCRIPT:
        hint = f"run `{STAGE_SCRIPT[stage_hint]}` first to produce it, or pass --model_path"
    path = locate_checkpoint(path, stage_hint)
    if path.is_dir():
        if not is_pretrained_dir(path):
            raise CheckpointError(f"{path} is a folder without {CONFIG} and {WEIGHTS}: pass a .pth checkpoint or a "
                                  "folder written by save_pretrained / scripts/export_hf.py")
        obj = read_pretrained(path)
    else:
        obj = safe_load(path, "checkpoint", hint)
    if obj.get("format") != FORMAT:
        looks_llm = any(k.startswith(("tok_embeddings", "model.embed_tokens", "layers.")) for k in obj)
        raise CheckpointError(
            f"{path} is not a medical-VLM checkpoint (no '{FORMAT}' header)"
            + ("; it looks like MiniMind language-model weights: pass them to training with --from_llm"
               if looks_llm else ""))
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version (format {obj['format_version']}); "
                              "update this toolkit")
    missing = [k for k in ("model", "config", "tokenizer", "vision", "stage", "step") if k not in obj]
    if missing or not isinstance(obj["model"], dict):
        raise CheckpointError(f"{path} is incomplete (missing {missing or ['model']}); re-create it")
    try:
        ensure_finite(obj["model"], str(path))
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: the file is damaged or was saved from a diverged run; "
                              "use an earlier checkpoint or train again") from None
    return obj


DROPPED = ("patch_head.",)


def load_weights(model: MedicalVLM, state: dict, source: str, skip_prefixes: tuple[str, ...] = ()):
    """The one strict weight loader (evaluation, the demo, the API, --from_weight, --resume):
    every tensor the model has must be there, with its shape and a floating-point dtype where
    the model's is; anything extra is refused. The frozen vision tower is not part of a
    checkpoint. ``skip_prefixes``: parts deliberately left as built (e.g. a new patch head)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: the weights are not a name -> tensor mapping")
    want = {k: v for k, v in model.state_dict().items() if not k.startswith(("vision_tower.", *skip_prefixes))}
    # DROPPED: training-only heads of removed levers (--patch_loss); answers never used them
    have = {k: v for k, v in state.items() if not k.startswith((*skip_prefixes, *DROPPED))}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = [f"{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}" for k in sorted(set(want) & set(have))
             if not torch.is_tensor(have[k]) or have[k].shape != want[k].shape]
    kinds = [f"{k} is {have[k].dtype}" for k in sorted(set(want) & set(have))
             if torch.is_tensor(have[k]) and have[k].is_floating_point() != want[k].is_floating_point()]
    problems = [f"{name} ({len(items)}): {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                                    ("wrong dtype", kinds)) if items]
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit the stored config ({'; '.join(problems)}); the "
                              "file is incomplete, damaged or from another model")
    model.load_state_dict(have, strict=False)  # exactly ``want``: the tower and skipped parts stay as built


def load_model(path: str | Path, device: str | torch.device = "cpu", vision_model: str | None = None,
               stage_hint: str | None = None, with_vision: bool = True) -> LoadedCheckpoint:
    """Rebuilds model + tokenizer from a checkpoint. ``vision_model`` overrides where the
    tower is loaded from (e.g. another local copy); its weights must still match."""
    path = locate_checkpoint(path, stage_hint)
    obj = read_checkpoint(path, stage_hint)
    try:
        config = VLMConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the stored config is not valid ({exc})") from None
    if not isinstance(obj["vision"], dict) or not isinstance(obj["vision"].get("id"), str):
        raise CheckpointError(f"{path}: the stored vision entry must be an object with an 'id' (the tower's name)")
    tok = tokenizer_from_files(obj["tokenizer"], str(path))
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
    try:
        model = MedicalVLM(config, tower)
    except ValueError as exc:  # e.g. a config whose image tokens do not match the tower
        raise CheckpointError(f"{path}: {exc}") from None
    load_weights(model, obj["model"], str(path))
    model.to(device).eval()
    return LoadedCheckpoint(model, tok, config, obj["stage"], obj["step"], path, obj.get("extra", {}), obj["vision"])


def from_pretrained(source, device: str | torch.device = "cpu", vision_model: str | None = None) -> MedicalVLM:
    """The model from a folder written by ``MedicalVLM.save_pretrained``, a hub id of one, or a
    ``.pth`` checkpoint, with its tokenizer as ``model.tokenizer`` (the Hugging Face convention)."""
    loaded = load_model(source, device, vision_model=vision_model)
    loaded.model.tokenizer = loaded.tokenizer
    return loaded.model
