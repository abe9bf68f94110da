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
import re
from pathlib import Path, PurePosixPath

from model.config import IMAGE_PLACEHOLDER
from infra.errors import UserError

VQA_FILES = {"train": "medical_vqa_train.jsonl", "validation": "medical_vqa_validation.jsonl",
             "test": "medical_vqa_test.jsonl"}
PRETRAIN_FILE = "medical_pretrain.jsonl"
IMAGES_DIR = "medical_images"
MANIFEST = "manifest.json"
ANSWER_TYPES = ("OPEN", "CLOSED")


class DataError(UserError, ValueError):
    pass


def safe_relpath(name) -> str | None:
    """The one image-path rule: a relative path inside the image folder, written with '/'.
    Returns the normalised path, or None for absolute paths, drive letters, '..' parts,
    empty names and control characters."""
    if not isinstance(name, str) or not name.strip() or any(ord(c) < 32 for c in name):
        return None
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name) or str(p) in ("", "."):
        return None
    return str(p)


def image_file(root: str | Path, rel: str, where: str = "") -> Path:
    """Where an image named in the data lives: ``root/rel`` after the path rule, and still
    inside ``root`` once symbolic links are followed. Every reader opens images through this."""
    prefix = f"{where}: " if where else ""
    clean = safe_relpath(rel)
    root = Path(root)
    if clean is None:
        raise DataError(f"{prefix}image path {rel!r} escapes {root}: image paths must be relative to the "
                        "image folder, without '..' or a leading '/'")
    path = (root / clean).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{prefix}image path {rel!r} leads outside {root} (through a symbolic link)")
    return path


def read_utf8(path: str | Path) -> str:
    """A text file as str; a file that is not UTF-8 is a DataError naming the line and byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {col}); "
                        "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)") from None


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
    for rel in images_of(rec):
        if safe_relpath(rel) is None:
            raise DataError(f"{where}: image path {rel!r} escapes the image folder: image paths must be "
                            "relative to it, without '..' or a leading '/'")
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
    for n, line in enumerate(read_utf8(path).split("\n"), 1):  # not splitlines: \u2028 may be in text
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


# questions the converter derives from others (--verify_questions, --implied_questions)
DERIVED_SOURCES = ("verify", "implied")


def is_derived(record: dict) -> bool:
    """A question the converter made from the source's own (its ``source`` says so): trained on,
    but left out of the answer priors a model is compared with."""
    return record.get("source") in DERIVED_SOURCES


def own_answers(records: list[dict]) -> list[dict]:
    """The source's own questions among VQA records as {"question", "answer", "answer_type"}: what
    the answer-prior baselines, the answer sets of the explanations and ``--constrain`` are built
    from (derived questions and records without an answer type are left out)."""
    return [{"question": question_of(r), "answer": answer_of(r), "answer_type": r["answer_type"]}
            for r in records if r.get("answer_type") in ANSWER_TYPES and not is_derived(r)]


def read_answers(path: str | Path, hint: str = "") -> list[dict]:
    """``own_answers`` of a VQA file."""
    return own_answers(read_jsonl(path, require_vqa=True, hint=hint))
