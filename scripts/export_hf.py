"""Export a .pth checkpoint as a Hugging Face-style model folder, and optionally share it.

Run from the repository root:
    python -m scripts.export_hf out/medical_vlm_768.pth hf/medical_vlm_768
    python -m scripts.export_hf out/medical_vlm_768.pth hf/medical_vlm_768 --push_to_hub you/medvqa-768
The folder holds config.json, model.safetensors, the tokenizer files and a README.md model card
(with the metrics of out/eval/<name>/metrics.json when that file exists). Every script that
takes a checkpoint takes the folder or its hub id too.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model.checkpoint import CheckpointError, load_model
from model.config import resolve_path
from infra.runtime import setup_logging

log = logging.getLogger("export")


def default_metrics(checkpoint: Path) -> Path:
    """Where eval_vlm.py writes the metrics of this checkpoint (out/eval/<name>/metrics.json)."""
    return checkpoint.parent / "eval" / checkpoint.name.removesuffix(".pth") / "metrics.json"


def is_metrics(m) -> bool:
    """What the model card reads from eval_vlm.py's metrics.json, with the right types."""
    number = (lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)))  # noqa: E731
    return (isinstance(m, dict) and isinstance(m.get("count"), dict) and isinstance(m["count"].get("all"), int)
            and all(k in m and number(m[k]) for k in ("closed_accuracy", "open_accuracy", "overall_accuracy"))
            and isinstance(m.get("baselines") or {}, dict)
            and all(isinstance(b, dict) and all(number(b.get(k)) for k in ("closed_accuracy", "open_accuracy",
                                                                           "overall_accuracy"))
                    for b in (m.get("baselines") or {}).values()))


def push(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload medical VQA model")
    return str(getattr(info, "commit_url", info))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a .pth checkpoint (or a model folder, to re-export it)")
    ap.add_argument("out_dir", help="the model folder to write")
    ap.add_argument("--metrics", help="metrics.json for the model card (default: out/eval/<name>/metrics.json)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder to this hub repository")
    ap.add_argument("--private", action="store_true", help="create the hub repository as private")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        ckpt = load_model(args.checkpoint, with_vision=False)
        metrics_path = resolve_path(args.metrics) if args.metrics else default_metrics(ckpt.path)
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
        if metrics is not None and not is_metrics(metrics):
            raise CheckpointError(f"{metrics_path} is not a metrics.json written by eval_vlm.py (it needs count.all, "
                                  "closed_accuracy, open_accuracy and overall_accuracy); pass the right --metrics")
        if metrics is None:
            log.info("no metrics at %s: the model card will have no evaluation table", metrics_path)
        folder = ckpt.model.save_pretrained(resolve_path(args.out_dir), ckpt.tokenizer, ckpt.stage, ckpt.step,
                                            extra=ckpt.meta, metrics=metrics, dtype=args.dtype, vision=ckpt.vision)
    except (OSError, CheckpointError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.error("error: %s", exc)
        return 2  # a user-caused error: one named message, exit code 2
    log.info("wrote %s (%s)", folder, ", ".join(sorted(p.name for p in folder.iterdir())))
    if args.push_to_hub:
        try:
            url = push(folder, args.push_to_hub, args.private)
        except Exception as exc:  # offline, no token, no rights: the folder is written either way
            log.error("error: upload to %s failed (%s: %s); the folder %s is complete, upload it later with "
                      "--push_to_hub or `huggingface-cli upload`", args.push_to_hub, exc.__class__.__name__, exc,
                      folder)
            return 2  # a user-caused error: one named message, exit code 2
        log.info("uploaded to %s", url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
