"""The JSONL contract between the converter and every other script.

VQA files (``medical_vqa_{train,validation,test}.jsonl``), one question per line::

    {"conversations": [{"role": "user", "content": "<image>\\n<question>"},
                       {"role": "assistant", "content": "<answer>"}],
     "image": "<path relative to medical_images/>",   # or a list for multi-image samples
     "qid": 0, "answer_type": "OPEN"|"CLOSED", "content_type": "...", "modality": "...",
     "location": "..."}

Caption file (``medical_pretrain.jsonl``): same shape, one caption conversation per
training image, without the VQA metadata. Readers validate every line and name the
file, line and field that is wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.config import IMAGE_PLACEHOLDER

VQA_FILES = {"train": "medical_vqa_train.jsonl", "validation": "medical_vqa_validation.jsonl",
             "test": "medical_vqa_test.jsonl"}
PRETRAIN_FILE = "medical_pretrain.jsonl"
IMAGES_DIR = "medical_images"
MANIFEST = "manifest.json"
ANSWER_TYPES = ("OPEN", "CLOSED")


class DataError(ValueError):
    pass


def images_of(record: dict) -> list[str]:
    img = record.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


def validate_record(rec, where: str, require_vqa: bool = False) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of messages")
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant") \
                or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: conversations[{i}] must be {{'role': system|user|assistant, "
                            f"'content': str}}, got {msg!r}")
    if conv[-1]["role"] != "assistant" or not conv[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant answer")
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in conv if m["role"] != "assistant")
    images = rec.get("image")
    if images is not None and not (isinstance(images, str) or
                                   (isinstance(images, list) and all(isinstance(x, str) for x in images))):
        raise DataError(f"{where}: field 'image' must be a path string or a list of them")
    if n_placeholders != len(images_of(rec)):
        raise DataError(f"{where}: {n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but "
                        f"{len(images_of(rec))} image(s) in field 'image'")
    if require_vqa and rec.get("answer_type") not in ANSWER_TYPES:
        raise DataError(f"{where}: field 'answer_type' must be OPEN or CLOSED, got {rec.get('answer_type')!r}")
    return rec


def read_jsonl(path: str | Path, require_vqa: bool = False, hint: str = "") -> list[dict]:
    """All records of a contract file, validated; errors name file:line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found" + (f"; {hint}" if hint else ""))
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            records.append(validate_record(rec, f"{path}:{n}", require_vqa))
    if not records:
        raise DataError(f"{path} has no records" + (f"; {hint}" if hint else ""))
    return records


def question_of(record: dict) -> str:
    """The user's text without image placeholders (for baselines and reports)."""
    user = [m["content"] for m in record["conversations"] if m["role"] == "user"][-1]
    return user.replace(IMAGE_PLACEHOLDER, "").strip()


def answer_of(record: dict) -> str:
    return record["conversations"][-1]["content"]
