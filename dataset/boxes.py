"""Organ and finding boxes per image (SLAKE's ``detection.json``) and the per-patch labels
training derives from them.

The converter keeps each image's boxes in ``medical_boxes.json`` beside the VQA files::

    {"xmlab1/source.jpg": {"size": [w, h], "boxes": {"Liver": [[x, y, w, h]], "Cyst": [[...], ...]}}}

(x, y the top-left corner, in the image's own pixels). SLAKE stores a list of one-key objects,
``[{"Liver": [x, y, w, h]}, ...]``; a plain ``{"Liver": [x, y, w, h]}`` mapping (a box or a
list of boxes per name) is accepted too. Training turns the boxes into the labels of the
vision tower's patch grid (``patch_targets``): a patch carries a name when its centre lies in
one of that name's boxes, after the tower's resize and centre crop.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from infra.errors import UserError

BOXES_FILE = "medical_boxes.json"
MAX_BOXES = 256  # per image; more is not a detection file
MAX_DETECTION_BYTES = 1_000_000  # SLAKE's are under 2 kB; checked before parsing, so a huge file costs nothing
MAX_NAME_CHARS = 64


class BoxError(UserError, ValueError):
    pass


def _finite(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer of hundreds of digits
        return False


def _box(value, name: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(map(_finite, value)):
        raise BoxError(f"box of {name!r} must be [x, y, w, h] numbers, got {str(value)[:60]}")
    if value[2] <= 0 or value[3] <= 0:
        raise BoxError(f"box of {name!r} has no area: {list(value)}")
    return [float(v) for v in value]


def parse_detection(data: bytes | str) -> dict[str, list[list[float]]]:
    """``detection.json`` content -> {name: [[x, y, w, h], ...]}; BoxError says what is wrong.
    Names become question text ("Is there a cyst in the liver?"), so a name with control
    characters, markup or the image placeholder is refused, not written into the data."""
    if len(data) > MAX_DETECTION_BYTES:
        raise BoxError(f"{len(data):,} bytes, more than a detection file holds ({MAX_DETECTION_BYTES:,})")
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise BoxError(f"not valid JSON ({str(exc)[:100]})") from None
    pairs = []
    if isinstance(obj, list):
        for item in obj:
            if not isinstance(item, dict):
                raise BoxError(f"expected objects like {{\"Liver\": [x, y, w, h]}}, got {str(item)[:60]}")
            pairs += item.items()
    elif isinstance(obj, dict):
        pairs = list(obj.items())
    else:
        raise BoxError("expected a list of {name: [x, y, w, h]} objects or one such mapping")
    out: dict[str, list[list[float]]] = {}
    for name, value in pairs:
        if not isinstance(name, str) or not name.strip():
            raise BoxError(f"box name must be a non-empty string, got {str(name)[:60]!r}")
        if len(name) > MAX_NAME_CHARS or not _plain_name(name):
            raise BoxError(f"box name {name[:60]!r} is not a plain organ or finding name (control characters, "
                           f"<...> markup or over {MAX_NAME_CHARS} characters)")
        many = isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple))
        for b in (value if many else [value]):
            out.setdefault(name.strip(), []).append(_box(b, name))
    if sum(len(v) for v in out.values()) > MAX_BOXES:
        raise BoxError(f"more than {MAX_BOXES} boxes")
    return out


def _plain_name(name: str) -> bool:
    return name.isprintable() and "<" not in name and ">" not in name


def read_boxes_file(path: str | Path) -> dict[str, dict]:
    """``medical_boxes.json`` -> {image path: {"size": [w, h], "boxes": {name: [[x, y, w, h], ...]}}};
    {} if absent. The one reader for training and evaluation: every entry is checked (a
    hand-edited file gets a BoxError naming the image and the field, never a traceback)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BoxError(f"{path}: not a readable boxes file ({str(exc)[:100]}); convert the dataset again") from None
    if not isinstance(table, dict):
        raise BoxError(f"{path}: expected an object keyed by image path; convert the dataset again")
    return {key: _entry(path, key, entry) for key, entry in table.items()}


def _entry(path: Path, key: str, entry) -> dict:
    where = f"{path}: image {key!r}"
    fix = "; fix it or convert the dataset again"
    if not isinstance(entry, dict):
        raise BoxError(f"{where}: expected {{\"size\": [w, h], \"boxes\": {{...}}}}, got {type(entry).__name__}{fix}")
    size = entry.get("size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(map(_finite, size))
            or min(size) < 1 or max(size) > 1_000_000):
        raise BoxError(f"{where}: field 'size' must be [width, height] in pixels, got {str(size)[:60]}{fix}")
    boxes = entry.get("boxes", {})
    if not isinstance(boxes, dict):
        raise BoxError(f"{where}: field 'boxes' must map names to lists of [x, y, w, h]{fix}")
    checked = {}
    for name, value in boxes.items():
        if not isinstance(value, (list, tuple)) or not all(isinstance(b, (list, tuple)) for b in value):
            raise BoxError(f"{where}: field 'boxes' / {name!r} must be a list of [x, y, w, h] boxes, got "
                           f"{str(value)[:60]}{fix}")
        try:
            checked[name] = [_box(b, name) for b in value]
        except BoxError as exc:
            raise BoxError(f"{where}: field 'boxes': {exc}{fix}") from None
    return {**entry, "size": [float(size[0]), float(size[1])], "boxes": checked}


def image_keys(paths: list[Path], root: str | Path) -> list[str]:
    """The boxes file's keys for resolved image paths: each path relative to the image folder
    (a path outside it keeps its full form, which no boxes file holds)."""
    root = Path(root).resolve()
    return [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix() for p in paths]


def grid_side(image_tokens: int) -> int | None:
    """The side of the square patch grid of ``image_tokens`` tokens; None when it is not square."""
    side = math.isqrt(image_tokens)
    return side if side * side == image_tokens else None


def _patch_centres(size: tuple[float, float], grid: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch centres in the original image's pixels, undoing the tower's preprocessing:
    shortest edge resized to ``crop``, then a centre crop of ``crop`` x ``crop``."""
    w, h = size
    scale = crop / min(w, h)
    off_x, off_y = (w * scale - crop) / 2, (h * scale - crop) / 2
    c = (torch.arange(grid, dtype=torch.float64) + 0.5) * crop / grid
    return (c + off_x) / scale, (c + off_y) / scale


def patch_targets(table: dict[str, dict], keys: list[str], grid: int, classes: list[str] | None = None,
                  crop: int = 224) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(class names, targets [n_images, grid*grid, classes] float, known [n_images] bool): which
    names cover each patch of each image (``keys``: image paths as in the boxes file). Images
    without boxes are marked unknown and carry no patch loss. ``classes``: a fixed list (a
    checkpoint's); by default every name in the boxes of ``keys``, sorted."""
    entries = [table.get(k) for k in keys]
    if classes is None:
        classes = sorted({n for e in entries if e for n in e.get("boxes", {})})
    index = {n: i for i, n in enumerate(classes)}
    targets = torch.zeros(len(keys), grid * grid, len(classes))
    known = torch.zeros(len(keys), dtype=torch.bool)
    for i, e in enumerate(entries):
        if not e or not e.get("boxes"):
            continue
        xs, ys = _patch_centres(e["size"], grid, crop)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        for name, bs in e["boxes"].items():
            if name not in index:
                continue
            for x, y, w, h in bs:
                inside = (xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)
                targets[i, inside, index[name]] = 1.0
        known[i] = True
    return classes, targets, known


def _inside(entry: dict) -> dict[str, set[str]]:
    """name -> the names one of whose boxes holds the centre of one of its boxes and is larger."""
    boxes = entry.get("boxes", {})
    out: dict[str, set[str]] = {}
    for a, abs_ in boxes.items():
        for x, y, w, h in abs_:
            cx, cy = x + w / 2, y + h / 2
            for b, bbs in boxes.items():
                if b != a and any(bx <= cx < bx + bw and by <= cy < by + bh and bw * bh > w * h
                                  for bx, by, bw, bh in bbs):
                    out.setdefault(a, set()).add(b)
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


MAX_BOX_QUESTIONS = 32  # per image: instance-numbered names ("Finding 12-3") would otherwise multiply them


def cap_questions(qas: list[tuple[str, str]], cap: int = MAX_BOX_QUESTIONS) -> list[tuple[str, str]]:
    """At most ``cap`` of an image's yes/no questions, Yes and No as even as the image allows
    (the Yes first up to half, then the No), in their original order."""
    if len(qas) <= cap:
        return qas
    yes = [i for i, (_, a) in enumerate(qas) if a == "Yes"]
    no = [i for i, (_, a) in enumerate(qas) if a != "Yes"]
    take_yes = yes[:max(cap // 2, cap - len(no))]
    keep = set(take_yes) | set(no[:cap - len(take_yes)])
    return [qa for i, qa in enumerate(qas) if i in keep]


def grounded_questions(table: dict[str, dict], keys: list[str], cap: int = MAX_BOX_QUESTIONS,
                       dropped: Counter | None = None) -> dict[str, list[tuple[str, str]]]:
    """Yes/no questions that the boxes answer, per image of ``keys``: "Is there a cyst in the
    left lung?" for every name that lies inside another name's box somewhere in the set (a
    finding) and every such containing name present in the image (an organ): Yes when a box
    of the finding has its centre in the organ's box. Stage 1 learns from them *which* finding
    is *where*, the binding that yes/no questions need and that captions do not teach. At most
    ``cap`` per image (``cap_questions``); ``dropped`` counts what the cap left out."""
    inside = {k: _inside(table[k]) for k in keys if k in table}
    findings = sorted({a for c in inside.values() for a, bs in c.items() if bs})
    regions = sorted({b for c in inside.values() for bs in c.values() for b in bs} - set(findings))
    out: dict[str, list[tuple[str, str]]] = {}
    for k, contained in inside.items():
        present = [r for r in regions if r in table[k].get("boxes", {})]
        qs = [(f"Is there {_article(f)} {f.lower()} in the {r.lower()}?", "Yes" if r in contained.get(f, ()) else "No")
              for f in findings for r in present]
        if len(qs) > cap and dropped is not None:  # capped per image: bounded by the image count, not the names
            dropped["images"] += 1
            dropped["questions"] += len(qs) - cap
        qs = cap_questions(qs, cap)
        if qs:
            out[k] = qs
    return out


def named_boxes(text: str, names: list[str]) -> list[int]:
    """Indices of the box names a question mentions (whole words, plurals too)."""
    text = text.lower()
    return [j for j, n in enumerate(names) if re.search(rf"\b{re.escape(n.lower())}(s|es)?\b", text)]


def pointing_group(text: str, names: list[str]) -> str | None:
    """What a question points at, by the box names it mentions: 'kind x side' (a finding or organ
    and a sided organ: "Is there a cyst in the left lung?"), 'side' (sided organs only: "How many
    findings are in the left kidney?") or 'kind' (no side: "How many cysts are in the image?",
    "Is the liver healthy?"); None when it names no box."""
    found = [names[j].lower() for j in named_boxes(text, names)]
    if not found:
        return None
    sided = [n for n in found if n.split()[0] in ("left", "right")]
    return "kind x side" if sided and len(sided) < len(found) else "side" if sided else "kind"


def look_mask(text: str, names: list[str], image_targets: torch.Tensor) -> torch.Tensor | None:
    """[patches] bool: where a question should look in its image, from the box names it mentions
    ("cyst", "left lung"; plurals too): the patches the named boxes share when they overlap, else
    those of the largest named box (the region to search); None when it names no box of the
    image. ``image_targets`` [patches, names] from ``patch_targets``. One rule for the training
    signal (--look_loss) and the evaluation's pointing game."""
    sets = [image_targets[:, j] > 0 for j in named_boxes(text, names)]
    sets = [m for m in sets if m.any()]
    if not sets:
        return None
    both = torch.stack(sets).all(0)
    return both if both.any() else max(sets, key=lambda m: int(m.sum()))
