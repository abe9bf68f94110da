"""Hugging Face-style model folders (nanoVLM's layout), next to the ``.pth`` checkpoints.

A folder written by ``save_pretrained`` holds::

    config.json         model config, vision tower id + weight fingerprint, stage, step, training flags
    model.safetensors   language model + projector weights (no pickle: loading runs no code)
    tokenizer.json ...  the tokenizer files
    README.md           the model card

``read_pretrained`` turns such a folder into the same dictionary ``read_checkpoint`` gets from a
``.pth``, so every reader (evaluation, the web demo, ``--from_weight``, the Python API) takes
either, or a hub id of such a folder (downloaded once by huggingface_hub).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from infra.runtime import unwrap
from infra.safe_files import MAX_TEXT_BYTES, MAX_WEIGHTS_BYTES, SourceError, checked, read_bytes
from model.format import FORMAT, FORMAT_VERSION, TOKENIZER_FILES, CheckpointError, ensure_finite

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
TIED = "llm.lm_head.weight"  # the same tensor as the token embedding: stored once
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SLAKE_CITATION = """@inproceedings{liu2021slake,
  title={SLAKE: A Semantically-Labeled Knowledge-Enhanced Dataset for Medical Visual Question Answering},
  author={Liu, Bo and Zhan, Li-Ming and Xu, Li and Ma, Lin and Yang, Yan and Wu, Xiao-Ming},
  booktitle={IEEE International Symposium on Biomedical Imaging (ISBI)},
  year={2021}
}"""


def is_pretrained_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


# what a local path looks like even when it does not exist (yet): a file extension, or a first
# part that is one of the toolkit's own folders
LOCAL_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".json", ".ckpt")
LOCAL_ROOTS = ("out", "hf", "dataset", "model", "models", "checkpoints", "tmp")


def looks_like_hub_id(spec: str) -> bool:
    """The one local-or-hub rule: ``owner/name`` (exactly one '/'), no file extension, not
    starting with '.', '~' or '/', and not under one of the toolkit's folders (``out/x`` is a
    missing local file, never a hub repository). Existing paths are checked before this."""
    spec = str(spec)
    if not HUB_ID.match(spec) or spec.startswith((".", "~", "/")):
        return False
    owner, name = spec.split("/")
    return owner.lower() not in LOCAL_ROOTS and not name.lower().endswith(LOCAL_SUFFIXES)


def download(repo_id: str) -> Path:
    """A hub model folder, fetched once into the huggingface_hub cache."""
    from huggingface_hub import snapshot_download  # local: only a hub id needs it (keeps start-up light)
    try:
        local = snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG, WEIGHTS, CARD, *TOKENIZER_FILES])
    except Exception as exc:  # offline, unknown repo, no access: one message for the user
        raise CheckpointError(
            f"could not fetch the model '{repo_id}' from the Hugging Face hub ({exc.__class__.__name__}: "
            f"{(str(exc).splitlines() or [''])[0]}). Without network access, download it where you have one "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass the folder instead") from exc
    if not is_pretrained_dir(local):
        raise CheckpointError(f"hub repository '{repo_id}' has no {CONFIG} + {WEIGHTS}: not a model exported "
                              "by scripts/export_hf.py")
    return Path(local)


def save_pretrained(folder: str | Path, model, tokenizer, stage: str, step: int, extra: dict | None = None,
                    metrics: dict | None = None, dtype: str | torch.dtype = "float32",
                    vision: dict | None = None) -> Path:
    """Writes the folder through a staging folder beside it, swapped in at the end: a failed
    export never leaves half a model under ``folder``. ``vision``: the tower id and
    fingerprint, when the model was loaded without its tower."""
    model = unwrap(model)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.trainable_state_dict().items() if k != TIED}
    ensure_finite(state, f"not exporting {folder}")
    tower = model.vision_tower
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": "medical-vlm",
            "config": model.config.to_dict(),
            "vision": vision or {"id": model.config.vision_model,
                                 "fingerprint": tower.fingerprint() if tower is not None else None},
            "stage": stage, "step": int(step), "extra": extra or {}}
    folder = Path(folder)
    claim_model_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".staging", dir=folder.parent))
    try:
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(staging)
        (staging / CARD).write_text(model_card(meta, metrics), encoding="utf-8")
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def claim_model_folder(folder: Path):
    """The save guard of model folders: ``folder`` may be written only when it does not exist,
    is an empty folder, or is a model folder this toolkit wrote (its config.json has our format
    header and it holds nothing but the files save_pretrained writes). Anything else (a file,
    the repository, ``out/`` with its checkpoints, a folder with other files) is refused before
    a byte is written, and nothing is ever deleted that the toolkit did not create."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CheckpointError(f"{folder} exists and is not a folder: choose a new folder name for the model")
    if not folder.exists():
        return
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    ours = {CONFIG, WEIGHTS, CARD, *TOKENIZER_FILES}
    foreign = [n for n in entries if n not in ours or (folder / n).is_symlink() or not (folder / n).is_file()]
    try:
        header = json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        header = None
    if foreign or header != FORMAT:
        shown = ", ".join(foreign[:4] or entries[:4]) + (" ..." if len(foreign or entries) > 4 else "")
        raise CheckpointError(f"{folder} is not empty and not a model folder written by this toolkit (it holds "
                              f"{shown}): nothing was written or deleted; choose a new folder (e.g. hf/<name>)")


def read_pretrained(folder: str | Path) -> dict:
    """The folder as the dictionary a ``.pth`` checkpoint holds; nothing is unpickled."""
    folder = Path(folder)
    try:  # every file through the source rule: inside the folder, regular, below a size limit
        meta = json.loads(read_bytes(folder / CONFIG, MAX_TEXT_BYTES, folder, "model file").decode("utf-8"))
        weights = checked(folder / WEIGHTS, MAX_WEIGHTS_BYTES, folder, "model file")
        tokenizer = {name: read_bytes(folder / name, MAX_TEXT_BYTES, folder, "model file").decode("utf-8")
                     for name in TOKENIZER_FILES if (folder / name).exists() or (folder / name).is_symlink()}
    except SourceError as exc:
        raise CheckpointError(str(exc)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: {CONFIG} or a tokenizer file is not valid UTF-8 JSON/text ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / CONFIG} does not describe a model")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / WEIGHTS} is not a readable safetensors file (truncated or "
                              f"corrupted?): {exc}") from None
    if "llm.embed_tokens.weight" in state:
        state[TIED] = state["llm.embed_tokens.weight"]
    return {**meta, "model": state, "tokenizer": tokenizer}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _public(name) -> str:
    """A name fit for a shared card: hub ids as they are, local paths by their last part only
    (a card must not carry the folders of the machine that trained the model)."""
    text = str(name)
    flat = text.replace("\\", "/")
    return text if looks_like_hub_id(text) or "/" not in flat else flat.rstrip("/").rsplit("/", 1)[-1]


def model_card(meta: dict, metrics: dict | None = None) -> str:
    cfg, extra = meta["config"], meta.get("extra") or {}
    train = extra.get("train_config") or {}
    base = (f"MiniMind2 language-model weights `{Path(train['from_llm']).name}`" if train.get("from_llm")
            else "none: the language model was trained from random initialisation")
    source = str(extra.get("data_source", "unknown"))
    synthetic = source.startswith("demo")
    slake = not synthetic and source != "unknown"
    data_line = ("the toolkit's synthetic demo set (drawn images, no patient data; no SLAKE data)" if synthetic else
                 f"SLAKE ({source})" if slake else "unknown (no converter manifest beside the training data)")
    trained = f"{extra['epoch']} of {train.get('epochs', '?')}" if "epoch" in extra else str(train.get("epochs", "?"))
    lines = [
        "---", f"license: {'cc-by-4.0' if slake else 'other'}", "tags:", "- medical", "- visual-question-answering",
        "- minimind", *(["- slake", "datasets:", "- BoKelvin/SLAKE"] if slake else []), "---", "",
        f"# Medical VQA model (MiniMind-V recipe{', SLAKE' if slake else ''})", "",
        "> **Research use only — not for diagnosis.** A small model trained on a small public dataset; its "
        "answers can be wrong and must never guide clinical decisions.", "",
        "| | |", "|---|---|",
        f"| language model | MiniMind2 decoder, {cfg['hidden_size']} wide × {cfg['num_hidden_layers']} layers"
        f"{', mixture of experts' if cfg.get('use_moe') else ''}, vocabulary {cfg['vocab_size']} |",
        f"| base weights | {base} |",
        f"| vision tower | `{_public(meta['vision']['id'])}` (frozen; weight fingerprint `{meta['vision'].get('fingerprint')}`), "
        f"{cfg['image_tokens']} image tokens of width {cfg['vision_hidden_size']} |",
        f"| projector | {cfg['projector']} |",
        f"| stage | {meta['stage']} (step {meta['step']}) |",
        f"| training data | {data_line}: `{_public(train.get('data_path', '?'))}` ({trained} epochs, batch "
        f"{train.get('batch_size', '?')}, learning rate {train.get('learning_rate', '?')}) |",
    ]
    if str(meta["vision"]["id"]).startswith("random"):
        lines += ["", "**Warning: this model uses a RANDOM vision tower** (a test or offline demo model); it does "
                      "not understand real images."]
    lines += ["", "## Use", "", "```python", "from evaluation.api import MedicalVQA",
              "vqa = MedicalVQA.load(\"path/or/hub-id\")",
              "print(vqa.answer(\"scan.png\", \"Which organ is abnormal?\"))", "```", "",
              "The vision tower's weights are not included: the loader fetches the tower named above and "
              "refuses one whose weights differ from the fingerprint."]
    if metrics:
        lines += ["", "## Evaluation", "",
                  f"On `{_public(metrics.get('data', 'the test split'))}` ({metrics['count']['all']} questions), exact "
                  "match after normalisation:", "",
                  "| | closed | open | overall |", "|---|---|---|---|",
                  f"| model | {_pct(metrics['closed_accuracy'])} | {_pct(metrics['open_accuracy'])} | "
                  f"{_pct(metrics['overall_accuracy'])} |"]
        for name, b in (metrics.get("baselines") or {}).items():
            lines.append(f"| {name.replace('_', ' ')} | {_pct(b['closed_accuracy'])} | {_pct(b['open_accuracy'])} | "
                         f"{_pct(b['overall_accuracy'])} |")
    if slake:
        lines += ["", "## Data and licence", "",
                  "Trained on SLAKE (Liu et al., ISBI 2021), released under CC-BY-4.0; this model card and the "
                  "weights carry the same licence and attribution.", "", "```bibtex", SLAKE_CITATION, "```", ""]
    else:
        lines += ["", "## Data", "", f"Trained on {data_line}. It was not trained on SLAKE.", ""]
    return "\n".join(lines)
