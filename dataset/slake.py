"""SLAKE sources -> the JSONL contract (dataset/contract.py). The only module that knows
source formats:

* the original release or the ``BoKelvin/SLAKE`` hub snapshot: ``train.json``,
  ``validate.json``/``validation.json``, ``test.json`` + ``imgs/`` (or ``imgs.zip``);
* image/question/answer hub datasets with embedded images (``--hub_id``), e.g.
  ``mdwiratathya/SLAKE-vqa-english``, VQA-RAD or PathVQA copies; also a local folder or
  parquet files laid out like them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dataset.boxes import BOXES_FILE, MAX_BOX_QUESTIONS, BoxError, grounded_questions, parse_detection
from dataset.contract import (IMAGES_DIR, MANIFEST, PRETRAIN_FILE, VQA_FILES, DataError, read_utf8, safe_relpath,
                              validate_record)
from dataset.images import ImageReadError, load_image
from dataset.implied import implied_questions
from dataset.resplit import QA, changing_prior_split, prior_conflicting, text_key
from infra.atomic import atomic_write_text
from model.config import IMAGE_PLACEHOLDER
from infra.lock import LockError, output_lock
from infra.safe_files import MAX_IMAGE_BYTES, SourceError, read_bytes
from infra.runtime import progress
from infra.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "BoKelvin/SLAKE"
SPLIT_ALIASES = {"train": "train", "validate": "validation", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test"}
RELEASE_FILES = {"train": ["train.json"], "validation": ["validate.json", "validation.json"], "test": ["test.json"]}
REQUIRED_FIELDS = ("img_name", "question", "answer")
YES_NO = {"yes", "no"}
REGION_NAMES = {"brain": "brain", "brain_tissue": "brain", "brain_face": "head and face", "lung": "chest",
                "chest_lung": "chest", "chest_heart": "chest", "chest_mediastinal": "mediastinum",
                "abdomen": "abdomen", "pelvic cavity": "pelvic cavity", "neck": "neck"}
CAPTION_PROMPTS = ["Describe this medical image.", "What does this image show?",
                   "Give a short report of this scan.", "Summarise the findings in this image."]


class ConversionError(UserError, RuntimeError):
    pass


@dataclass
class SourceRecord:
    split: str
    qid: object
    question: str
    answer: str
    image_key: str          # identity of the image within the source (path or content hash)
    load_image: object      # () -> bytes
    answer_type: str | None = None
    content_type: str | None = None
    modality: str | None = None
    location: str | None = None
    lang: str = "en"
    where: str = ""
    problem: str | None = None  # set when the record is malformed
    source: str | None = None   # set for records merged from another dataset (--also)
    load_boxes: object = None   # () -> bytes of the image folder's detection.json, if the source has one


@dataclass
class Conversion:
    source: str
    records: list[SourceRecord]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- sources

class _ImageFolder:
    """Images of a release copy: an ``imgs/`` folder or an ``imgs.zip`` archive."""

    def __init__(self, root: Path):
        self.dir = root / "imgs"
        self.zip_path = root / "imgs.zip"
        self._zip = None
        self._members: dict[str, str] = {}
        if not self.dir.is_dir() and self.zip_path.is_file():
            self._zip = zipfile.ZipFile(self.zip_path)
            for name in self._zip.namelist():
                if not name.endswith("/"):
                    rel = name.split("imgs/", 1)[1] if "imgs/" in name else name
                    self._members[rel] = name
        elif not self.dir.is_dir():
            raise ConversionError(f"{root}: no images found (expected an imgs/ folder or imgs.zip beside "
                                  "the split files)")

    def boxes_loader(self, rel: str):
        """The ``detection.json`` beside image ``rel`` (SLAKE keeps one per image folder), or None."""
        parent = str(Path(rel).parent)
        name = "detection.json" if parent == "." else f"{parent}/detection.json"
        if self._zip is not None:
            return self.loader(name) if name in self._members else None
        path = self.dir / name
        return self.loader(name) if path.is_file() or path.is_symlink() else None

    def loader(self, rel: str):
        if self._zip is not None:
            def load():
                if rel not in self._members:
                    raise FileNotFoundError(f"{rel} not in {self.zip_path}")
                info = self._zip.getinfo(self._members[rel])
                if info.file_size > MAX_IMAGE_BYTES:
                    raise SourceError(f"{rel} in {self.zip_path} unpacks to {info.file_size / 2**20:.0f} MB, more "
                                      f"than {MAX_IMAGE_BYTES / 2**20:.0f} MB: refused")
                return self._zip.read(self._members[rel])
        else:
            def load():
                return read_bytes(self.dir / rel, MAX_IMAGE_BYTES, root=self.dir, what="release file")
        return load


def _meta(value) -> str | None:
    """A metadata field as text: strings stripped, numbers written out, anything else (lists,
    objects) dropped, so a release with ``"modality": 5`` converts instead of failing later."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return value.strip() or None if isinstance(value, str) else None


def read_release(root: str | Path) -> Conversion:
    """The original SLAKE release or the BoKelvin/SLAKE snapshot, from a local folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"--slake_dir {root} is not a folder")
    images = _ImageFolder(root)
    records = []
    for split, names in RELEASE_FILES.items():
        path = next((root / n for n in names if (root / n).is_file()), None)
        if path is None:
            raise ConversionError(f"{root}: missing the {split} split (expected one of {names})")
        try:
            rows = json.loads(read_utf8(path))
        except DataError as exc:
            raise ConversionError(str(exc)) from None
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
        if not isinstance(rows, list):
            raise ConversionError(f"{path}: expected a JSON list of question records")
        for i, row in enumerate(rows):
            where = f"{path.name}[{i}]"
            if not isinstance(row, dict):
                records.append(SourceRecord(split, None, "", "", "", None, where=where,
                                            problem="record is not a JSON object"))
                continue
            rec = SourceRecord(
                split=split, qid=row.get("qid", f"{split}-{i}"), question=row.get("question"),
                answer=row.get("answer"), image_key="", load_image=None,
                answer_type=_meta(row.get("answer_type")), content_type=_meta(row.get("content_type")),
                modality=_meta(row.get("modality")), location=_meta(row.get("location")),
                lang=_meta(row.get("q_lang")) or "en", where=where)
            missing = [f for f in REQUIRED_FIELDS if f not in row]
            rel = safe_relpath(row.get("img_name"))
            if missing:
                rec.problem = f"missing field(s) {missing}"
            elif rel is None:
                rec.problem = f"image path {row.get('img_name')!r} escapes the image folder"
            else:
                rec.image_key, rec.load_image = rel, images.loader(rel)
                rec.load_boxes = images.boxes_loader(rel)
            records.append(rec)
    return Conversion(f"release:{root}", records)


def download_release(hub_id: str = DEFAULT_HUB_ID) -> Conversion:
    """The authors' hub copy, downloaded (and cached) by huggingface_hub."""
    from huggingface_hub import snapshot_download
    try:
        local = snapshot_download(repo_id=hub_id, repo_type="dataset")
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the user
        raise ConversionError(_offline_message(hub_id, exc)) from exc
    conv = read_release(local)
    conv.source = f"hub:{hub_id}"
    return conv


def _offline_message(hub_id: str, exc: Exception) -> str:
    return (f"Could not download '{hub_id}' from the Hugging Face hub ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}).\nNothing was written. Alternatives:\n"
            "  --slake_dir DIR   a local copy of SLAKE (imgs/ or imgs.zip, train.json, validate.json or "
            "validation.json, test.json)\n"
            "  --hub_id ID       another hub dataset (image/question/answer columns), or a local folder of "
            "its parquet files\n"
            "  --demo            the built-in synthetic mini-SLAKE (no download)")


def _image_bytes(value) -> bytes:
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    if isinstance(value, dict) and value.get("path") and Path(value["path"]).is_file():
        return Path(value["path"]).read_bytes()
    raise ValueError("no image data")


def read_hub_vqa(hub_id: str) -> Conversion:
    """Hub datasets with image/question/answer columns (embedded images), or a local folder
    of such parquet files. Answer types are inferred (yes/no -> CLOSED)."""
    import datasets
    try:
        ds = datasets.load_dataset(hub_id)
    except Exception as exc:
        raise ConversionError(_offline_message(hub_id, exc)) from exc
    records, notes = [], []
    for split_name in ds:
        split = SPLIT_ALIASES.get(split_name.lower())
        if split is None:
            notes.append(f"ignored split '{split_name}'")
            continue
        table = ds[split_name].cast_column("image", datasets.Image(decode=False)) \
            if "image" in ds[split_name].column_names else ds[split_name]
        cols = table.column_names
        missing = [c for c in ("image", "question", "answer") if c not in cols]
        if missing:
            raise ConversionError(f"{hub_id} split '{split_name}' lacks column(s) {missing}; found {cols}")
        for i, row in enumerate(progress(table, desc=f"reading {split_name}", unit="q")):
            where = f"{split_name}[{i}]"
            try:
                data = _image_bytes(row["image"])
                key = hashlib.sha256(data).hexdigest()[:16]
                rec = SourceRecord(split, row.get("qid", f"{split}-{i}"), row["question"], row["answer"],
                                   f"{key}.png", (lambda d=data: d), _meta(row.get("answer_type")),
                                   _meta(row.get("content_type")), _meta(row.get("modality")),
                                   _meta(row.get("location")),
                                   where=where)
            except (ValueError, KeyError, TypeError) as exc:
                rec = SourceRecord(split, i, "", "", "", None, where=where, problem=f"unreadable image ({exc})")
            records.append(rec)
    if not any(r.answer_type for r in records):
        notes.append("answer_type inferred: CLOSED for yes/no answers, OPEN otherwise")
    return Conversion(f"hub-vqa:{hub_id}", records, notes)


def read_source(spec: str) -> Conversion:
    """Any supported source: a release-layout folder (train.json + imgs/), else a hub id or
    a local folder of image/question/answer parquet files."""
    path = Path(spec).expanduser()
    if path.is_dir() and any((path / n).is_file() for n in RELEASE_FILES["train"]):
        return read_release(path)
    return read_hub_vqa(spec)


def _image_hash(rec: SourceRecord) -> str | None:
    try:
        return hashlib.sha256(rec.load_image()).hexdigest()
    except (OSError, KeyError, TypeError):
        return None  # a missing image is reported (and skipped) by the conversion itself


def merge_training_sources(main: Conversion, extras: list[tuple[str, Conversion]]) -> Conversion:
    """Adds the *training* splits of other medical VQA datasets (e.g. VQA-RAD, PathVQA copies)
    to ``main``'s: their validation and test splits are dropped, so SLAKE's are untouched.
    Records keep a ``source`` name and their images a folder of their own. An image that is
    also in ``main`` (any split, by content) is refused: it would leak or duplicate data."""
    main_hashes = {}
    for r in main.records:
        if not r.problem and r.image_key and r.image_key not in main_hashes:
            main_hashes[r.image_key] = _image_hash(r)
    seen = {h: k for k, h in main_hashes.items() if h}
    records, notes = list(main.records), list(main.notes)
    for name, conv in extras:
        safe = re.sub(r"[^\w.-]+", "_", name).strip("._") or "extra"
        kept, dropped, shared = 0, 0, []
        hashes: dict[str, str | None] = {}
        for r in conv.records:
            if r.split != "train":
                dropped += 1
                continue
            if not r.problem and r.image_key:
                if r.image_key not in hashes:
                    hashes[r.image_key] = _image_hash(r)
                h = hashes[r.image_key]
                if h in seen:
                    shared.append((r.image_key, seen[h]))
            r.source = safe
            r.image_key = f"{safe}/{r.image_key}" if r.image_key else r.image_key
            records.append(r)
            kept += 1
        if shared:
            raise ConversionError(f"--also {name}: {len(shared)} image(s) are also in {main.source} (same content), "
                                  f"e.g. {shared[0][0]} = {shared[0][1]}: merging would leak or duplicate them; "
                                  "remove them from that source first")
        notes.append(f"--also {name}: {kept} training question(s) added as source '{safe}' "
                     f"({dropped} of its validation/test questions not used)")
    return Conversion(f"{main.source} + " + " + ".join(n for n, _ in extras) if extras else main.source,
                      records, notes)


# ----------------------------------------------------------------------------- conversion

def _region(location: str | None) -> str:
    if not location:
        return "body"
    return REGION_NAMES.get(location.strip().lower(), location.replace("_", " ").lower())


def make_caption(meta: dict, qas: list[tuple[str, str, str | None]]) -> str:
    """A caption from an image's metadata and its training Q&A (modality, region, organs,
    abnormalities), so stage 1 aligns features with facts the image really shows."""
    modality = meta.get("modality") or "medical"
    # "an MRI", "an X-Ray", "a CT": acronyms take the article of their spoken first letter
    vowel_sound = modality[0] in "AEIOUaeiou" or (modality[:2].isupper() and modality[0] in "AEFHILMNORSX")
    parts = [f"This is {'an' if vowel_sound else 'a'} {modality} image of the {_region(meta.get('location'))}."]
    organs, findings, normal = [], [], None
    for q, a, ctype in qas:
        ql, al = q.lower(), a.strip()
        if ctype == "Organ" and al.lower() not in YES_NO:
            organs += [o.strip() for o in al.split(",") if o.strip()]
        elif ctype == "Organ" and al.lower() == "yes":
            m = re.search(r"contain (?:the |a |an )?([\w\s-]+?)\?", ql)
            if m:
                organs.append(m.group(1).strip())
        if ctype == "Abnormality":
            if al.lower() in YES_NO and ("abnormal" in ql or "normal" in ql):
                is_abnormal = (al.lower() == "yes") == ("abnormal" in ql)
                normal = not is_abnormal
            elif al.lower() not in YES_NO and al.lower() not in ("none", "no"):
                findings.append(al)
    organs = list(dict.fromkeys(o.lower() for o in organs))
    findings = list(dict.fromkeys(f.lower() for f in findings))
    if organs:
        parts.append(f"It shows the {', '.join(organs[:6])}.")
    if findings:
        parts.append(f"Findings: {', '.join(findings[:4])}.")
    elif normal is True:
        parts.append("No abnormality is seen.")
    elif normal is False:
        parts.append("An abnormality is present.")
    return " ".join(parts)


def verification_questions(per_image: dict[str, list[tuple[str, str, str]]], seed: int = 0
                           ) -> dict[str, list[tuple[str, str]]]:
    """Yes/no questions that check a named value against the image, from the open questions of
    the training images (no boxes needed): for an open question q answered a, "q Is it a?" ->
    Yes and "q Is it b?" -> No, b drawn (seeded) from the other answers of the same question
    text. Every such text is answered Yes and No equally often by construction, so the text
    alone tells nothing; stage 1 learns there to verify a named value against the image, which
    the closed questions of stage 2 need and which captions do not teach. ``per_image``: image ->
    (question, answer, answer_type) of its training questions."""
    rng = random.Random(seed)
    pool: dict[str, set] = defaultdict(set)
    for qas in per_image.values():
        for q, a, t in qas:
            if t == "OPEN":
                pool[text_key(q)].add(a)
    out: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(per_image):
        qs = []
        for q, a, t in per_image[key]:
            others = sorted(pool.get(text_key(q), set()) - {a})
            if t != "OPEN" or not others or len(a) > 40:
                continue
            stem = q.strip()
            qs += [(f"{stem} Is it {a}?", "Yes"), (f"{stem} Is it {rng.choice(others)}?", "No")]
        if qs:
            out[key] = qs
    return out


def _image_problem(data: bytes, name: str) -> tuple[str | None, tuple[int, int] | None]:
    """Decodes the image with the loader and limits that training and evaluation use, so a
    file that would stop them later is skipped (and listed) here instead. Returns (problem,
    (width, height))."""
    try:
        return None, load_image(name, data).size
    except ImageReadError as exc:
        return f"unreadable image ({str(exc).removeprefix(name + ': ')})", None


def _copy_image(data: bytes, dest: Path, previous: Path) -> bool:
    """Writes the image into the staging folder; an identical file of the previous dataset
    is hard-linked instead. Returns True if new bytes were written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if previous.is_file() and previous.stat().st_size == len(data) and previous.read_bytes() == data:
        try:
            os.link(previous, dest)
            return False
        except OSError:  # no hard links on this filesystem: copy
            pass
    dest.write_bytes(data)
    return True


STAGING_PREFIX = ".convert-staging-"
# Verification questions ("What modality ...? Is it CT?" -> Yes / No, verification_questions) in both
# stages by default: at the guide's 4 + 4 epochs they beat no verification on every set measured, three
# seeds each (docs/learning.md): closed lead over the prior +7.1 against +0.0 (easy-prior trap), -3.0
# against -8.1 (attribute-prior trap), +30.9 against +27.1 (hard set), open within 2 points; the cost is
# about 2-3x the training time of a small model (more stage-1 and stage-2 questions).
VERIFY_DEFAULT = "both"
# Closed questions implied by the same image's open answers (dataset/implied.py), added to both
# stages' training data where they even out a closed text's answers. The default since 2026-12-04: at
# the guide's 4 + 4 epochs, three seeds, closed lead over the text prior on the attribute-prior trap
# +14.1 against +8.7 (every seed past +10), changing-prior splits 61.1 % against 55.5 % (attribute-prior)
# and 96.0 / 84.2 % against 68.5 / 48.3 % (easy-prior / shifted-prior, seed 42); docs/learning.md.
IMPLIED_DEFAULT = "both"


def convert(conv: Conversion, out_dir: str | Path, lang: str = "en", strict: bool = False,
            allow_overlap: bool = False, box_qa: bool = True, priors=None, split: str = "release",
            seed: int = 0, verify_qa: str = VERIFY_DEFAULT, implied_qa: str = IMPLIED_DEFAULT) -> dict:
    """Writes the contract files into ``out_dir`` and returns the manifest. ``split``: "release"
    keeps the source's splits; "cp" re-splits its images so each question text's usual answer
    changes between training and test (dataset/resplit.py; ``seed`` breaks ties).

    Everything is built in a staging folder inside ``out_dir`` and swapped in only when
    the whole conversion succeeded: a refusal (overlap, ``--strict``), an error or Ctrl-C
    leaves the previous dataset exactly as it was."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with output_lock(out_dir / ".convert.lock", f"the dataset folder {out_dir}"):
            for old in out_dir.glob(STAGING_PREFIX + "*"):  # left by a killed run (the lock says none is running)
                shutil.rmtree(old, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
            try:
                manifest = _build(conv, staging, out_dir / IMAGES_DIR, BuildOptions(
                    lang, strict, allow_overlap, box_qa, priors, split, seed, verify_qa, implied_qa))
                _swap_in(staging, out_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except LockError as exc:
        raise ConversionError(str(exc)) from None
    return manifest


def _unwritable(question: str, answer: str) -> str | None:
    """Why a question would be refused by the training and evaluation scripts (the data
    contract's own validator, dataset.contract.validate_record), or would put terminal control
    characters into prompts; None when it can be written."""
    if not all("".join(t.split()).isprintable() for t in (question, answer)):  # ESC, BEL, ...; not spaces
        return "control characters in the question or answer"
    try:
        validate_record({"conversations": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question.strip()}"},
                                           {"role": "assistant", "content": answer}],
                         "image": "x.jpg", "answer_type": "OPEN"}, "record", require_vqa=True)
    except DataError as exc:
        return str(exc).removeprefix("record: ")
    return None


def _changing_prior(records: list[SourceRecord], seed: int, priors) -> tuple[list[SourceRecord], dict]:
    """Re-splits the source's own images (not --also's extra training images) in place, keeping
    each split's image count, and keeps on the test side only the questions whose answer is not
    their text's usual training answer (dataset/resplit.py). Returns the records kept and the
    manifest's account, with the per-question prior's closed accuracy on the test split before
    and after when ``priors`` is given."""
    own = [r for r in records if r.source is None]
    count = {s: len({r.image_key for r in own if r.split == s}) for s in ("validation", "test")}
    if not count["test"]:
        raise ConversionError("--split cp needs a source with a test split")

    def closed_prior() -> float | None:
        by_split = defaultdict(list)
        for r in records:
            by_split[r.split].append(r)
        return _test_baselines(priors, by_split).get("majority_per_question", {}).get("closed_accuracy")

    before = closed_prior()
    try:
        cp = changing_prior_split([QA(r.image_key, r.question, r.answer) for r in own],
                                  count["validation"], count["test"], seed)
    except ValueError as exc:
        raise ConversionError(f"--split cp: {exc}") from None
    for r in own:
        r.split = cp.split_of[r.image_key]
    test = [r for r in records if r.split == "test"]
    qa = lambda r: QA(r.image_key, r.question, r.answer)
    keep = dict(zip(map(id, test), prior_conflicting([qa(r) for r in records if r.split == "train"], list(map(qa, test)))))
    records = [r for r in records if keep.get(id(r), True)]
    return records, {"kind": "cp", "seed": seed, "texts_moved": cp.texts_moved, "texts_movable": cp.texts_movable,
                  "test_questions_dropped": len(test) - sum(keep.values()),
                  "closed_prior_test_before": before, "closed_prior_test_after": closed_prior()}


def _swap_in(staging: Path, out_dir: Path):
    """Moves the staged dataset over the previous one: renames only, manifest removed first
    and written last, so the few microseconds in between never look like a complete set."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    old_images = None
    if (out_dir / IMAGES_DIR).exists():
        old_images = staging / "previous_images"
        os.replace(out_dir / IMAGES_DIR, old_images)
    os.replace(staging / IMAGES_DIR, out_dir / IMAGES_DIR)
    for name in [*VQA_FILES.values(), PRETRAIN_FILE, BOXES_FILE, MANIFEST]:
        os.replace(staging / name, out_dir / name)
    if old_images is not None:
        shutil.rmtree(old_images, ignore_errors=True)


def _english_splits(records: list[SourceRecord]) -> dict[str, str]:
    """Each image's split among the English questions (images in one English split only)."""
    seen: dict[str, set] = defaultdict(set)
    for r in records:
        if r.lang == "en" and not r.problem and r.image_key:
            seen[r.image_key].add(r.split)
    return {key: next(iter(splits)) for key, splits in seen.items() if len(splits) == 1}


@dataclass
class BuildOptions:
    """How ``convert`` builds the contract files (convert's keyword arguments)."""
    lang: str = "en"
    strict: bool = False
    allow_overlap: bool = False
    box_qa: bool = True
    priors: object = None   # priors(train, test): the answer-prior baselines (evaluation.metrics.baselines,
    #                         passed in by the converter script so the data layer never imports evaluation)
    split: str = "release"
    seed: int = 0
    verify_qa: str = VERIFY_DEFAULT
    implied_qa: str = IMPLIED_DEFAULT


class _Skipped(list):
    """The records left out, with their reason; under --strict the first one stops the conversion."""

    def __init__(self, strict: bool):
        super().__init__()
        self.strict = strict

    def add(self, rec: SourceRecord, reason: str):
        if self.strict:
            raise ConversionError(f"{rec.where} (qid {rec.qid}): {reason} (--strict stops here; drop "
                                  "--strict to skip and report such records)")
        self.append({"split": rec.split, "qid": rec.qid, "where": rec.where, "reason": reason})


def _usable_records(conv: Conversion, lang: str, skipped: _Skipped) -> tuple[list[SourceRecord], int]:
    """The records of ``lang`` that can be written (answers normalised), and how many non-English
    ones moved to their image's English split.

    The split rule for other languages: SLAKE's Chinese questions use the same images as the
    English ones but split them differently (its Chinese test images are English training
    images). Every image keeps the split it has among the English questions and the other
    languages' questions follow their image, so no image is in two splits in any language."""
    anchor = _english_splits(conv.records) if lang != "en" else {}
    moved = 0
    kept: list[SourceRecord] = []
    for rec in conv.records:
        if lang != "all" and rec.lang != lang:
            continue
        if rec.lang != "en" and anchor.get(rec.image_key, rec.split) != rec.split:
            rec.split = anchor[rec.image_key]
            moved += 1
        if rec.problem:
            skipped.add(rec, rec.problem)
            continue
        if not isinstance(rec.question, str) or not rec.question.strip():
            skipped.add(rec, "empty question")
            continue
        if not isinstance(rec.answer, (str, int, float)) or not str(rec.answer).strip():
            skipped.add(rec, "empty answer")
            continue
        rec.answer = str(rec.answer).strip()
        if rec.answer_type not in ("OPEN", "CLOSED"):
            rec.answer_type = "CLOSED" if rec.answer.lower() in YES_NO else "OPEN"
        problem = _unwritable(rec.question, rec.answer)
        if problem:
            skipped.add(rec, problem)
            continue
        kept.append(rec)
    return kept, moved


@dataclass
class _Images:
    status: dict[str, str | None]   # image -> why it is unusable, or None
    copied: int                      # files written (the others were reused from the previous dataset)
    boxes: dict[str, dict]           # image -> its size and detection.json boxes (dataset/boxes.py)
    box_warnings: list[str]


def _copy_images(records: list[SourceRecord], images_dir: Path, previous_images: Path) -> _Images:
    """Reads each image once, checks it and copies it; its boxes come along when the source has them."""
    images_dir.mkdir()
    out = _Images({}, 0, {}, [])
    for rec in progress(records, desc="images", unit="q"):
        if rec.image_key in out.status:
            continue
        size = None
        try:
            data = rec.load_image()
            problem, size = _image_problem(data, rec.image_key)
        except SourceError as exc:
            problem = f"refused image ({exc})"
        except (OSError, KeyError) as exc:
            problem = f"missing image ({exc.__class__.__name__}: {exc})"
        out.status[rec.image_key] = problem
        if problem is None:
            out.copied += _copy_image(data, images_dir / rec.image_key, previous_images / rec.image_key)
            if rec.load_boxes is not None:
                try:
                    out.boxes[rec.image_key] = {"size": list(size), "boxes": parse_detection(rec.load_boxes())}
                except (OSError, KeyError, BoxError, SourceError) as exc:  # boxes are extra: the image is still used
                    out.box_warnings.append(f"{rec.image_key}: detection.json skipped ({exc})")
    return out


def _check_splits(conv: Conversion, final: list[SourceRecord], opts: BuildOptions, skipped: _Skipped) -> dict:
    """The image overlap between splits (train & test refused unless allowed); and a conversion
    replaces a good dataset only with a complete one: every split the source has must keep
    questions, and there must be training questions at all."""
    split_images = defaultdict(set)
    for rec in final:
        split_images[rec.split].add(rec.image_key)
    overlap = {f"{a}&{b}": sorted(split_images[a] & split_images[b])
               for a, b in (("train", "validation"), ("train", "test"), ("validation", "test"))}
    leaked = overlap["train&test"]
    if leaked and not opts.allow_overlap:
        raise ConversionError(f"{len(leaked)} image(s) appear in both train and test (e.g. {leaked[:3]}): "
                              "test scores would be inflated. Fix the splits, or pass --allow_overlap "
                              "if you know what you are doing.")
    offered = Counter(r.split for r in conv.records if opts.lang == "all" or r.lang == opts.lang)
    empty = [s for s in VQA_FILES if (offered.get(s) or s in ("train", "test")) and not split_images.get(s)]
    if empty:
        reasons = Counter(e["reason"].split(":")[0] for e in skipped).most_common(3)
        raise ConversionError(
            f"{conv.source}: the conversion yields no usable questions for the "
            f"{', '.join(empty)} split ({sum(offered.values())} question(s) in the source for lang "
            f"{opts.lang!r}, {len(final)} usable"
            + (f"; most common reasons: {', '.join(f'{r} ({n})' for r, n in reasons)}" if reasons else "")
            + "): refusing to replace a dataset with an incomplete one")
    return {"images": {s: len(split_images.get(s, ())) for s in VQA_FILES},
            "image_overlap": {k: len(v) for k, v in overlap.items()}}


def _qa_line(key: str, question: str, answer: str, **fields) -> str:
    return json.dumps({"conversations": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question.strip()}"},
                                         {"role": "assistant", "content": answer}],
                       "image": key, **fields}, ensure_ascii=False)


def _question_line(rec: SourceRecord, **fields) -> str:
    """One source question with its qid, answer type and (for --also rows) source, then ``fields``:
    the same line in the VQA files and in stage 1's file."""
    return _qa_line(rec.image_key, rec.question, rec.answer, qid=rec.qid, answer_type=rec.answer_type,
                    **({"source": rec.source} if rec.source else {}), **fields)


def _derived_lines(table: dict, source: str, content_type: str) -> list[str]:
    """The training-file lines of derived questions (``table``: image -> (question, answer))."""
    return [_qa_line(key, q, a, qid=f"{source}-{n}", answer_type="CLOSED", source=source,
                     content_type=content_type, modality=None, location=None)
            for n, (key, q, a) in enumerate((k, q, a) for k, qas in sorted(table.items()) for q, a in qas)]


def _write_vqa(out_dir: Path, by_split: dict, verify: dict, in_train: bool, implied: dict):
    """The three VQA files; the verification questions join the training file when ``in_train``,
    the implied questions always (pass an empty table for none)."""
    for split, fname in VQA_FILES.items():
        lines = [_question_line(rec, content_type=rec.content_type, modality=rec.modality, location=rec.location)
                 for rec in by_split.get(split, [])]
        if split == "train":
            lines += (_derived_lines(verify, "verify", "Verify") if in_train else []) + \
                _derived_lines(implied, "implied", "Implied")
        atomic_write_text(out_dir / fname, "".join(line + "\n" for line in lines))


def _write_stage1(out_dir: Path, per_image: dict, box_questions: dict, verify: dict, implied: dict,
                  train: list) -> int:
    """Stage 1's data: a caption per training image, the box, verification and implied questions,
    then the training split's own questions. Returns the number of captions."""
    lines = []
    for i, (key, recs) in enumerate(sorted(per_image.items())):
        meta = {"modality": recs[0].modality, "location": recs[0].location}
        caption = make_caption(meta, [(r.question, r.answer, r.content_type) for r in recs])
        lines.append(_qa_line(key, CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)], caption))
    captions = len(lines)
    for source, table in (("boxes", box_questions), ("verify", verify), ("implied", implied)):
        lines += [_qa_line(key, q, a, source=source) for key, qas in sorted(table.items()) for q, a in qas]
    # Then the training questions themselves (open and closed): stage 1's 4 epochs of captions teach
    # nothing about answering a question, and a model trained from scratch learns closed questions
    # late; with them the guide's 4 + 4 epochs are 8 on the task. On the mean of three seeds this
    # raised the closed lead over the text prior and open accuracy on both box-less traps and kept
    # the hard set's lead (docs/learning.md, Learning III); it costs stage-1 time (about 1.5-2x samples).
    lines += [_question_line(rec) for rec in train]
    atomic_write_text(out_dir / PRETRAIN_FILE, "".join(line + "\n" for line in lines))
    return captions


def _box_questions(boxes: dict, keys: list[str]) -> dict:
    dropped: Counter = Counter()
    questions = grounded_questions(boxes, keys, dropped=dropped)
    if dropped:
        log.warning("box questions: %d image(s) had more than %d; %d question(s) left out, Yes and No kept as even "
                    "as each image allows (many distinct box names, e.g. numbered findings?)",
                    dropped["images"], MAX_BOX_QUESTIONS, dropped["questions"])
    return questions


def _build(conv: Conversion, out_dir: Path, previous_images: Path, opts: BuildOptions) -> dict:
    """Filter the records, copy the images, check the splits, write the VQA files, stage 1's data,
    the boxes and the manifest into ``out_dir`` (a staging folder)."""
    skipped = _Skipped(opts.strict)
    kept, moved = _usable_records(conv, opts.lang, skipped)
    images = _copy_images(kept, out_dir / IMAGES_DIR, previous_images)  # a bad image drops all of its questions
    final = []
    for rec in kept:
        problem = images.status[rec.image_key]
        if problem:
            skipped.add(rec, f"{problem}: {rec.image_key}")
        else:
            final.append(rec)
    resplit = None
    if opts.split == "cp":
        final, resplit = _changing_prior(final, opts.seed, opts.priors)
    split_counts = _check_splits(conv, final, opts, skipped)
    by_split = defaultdict(list)
    for rec in final:
        by_split[rec.split].append(rec)
    # stage 1 sees training images only, so validation/test images are never seen in training
    per_image: dict[str, list[SourceRecord]] = defaultdict(list)
    for rec in by_split.get("train", []):
        per_image[rec.image_key].append(rec)
    # yes/no questions that check a named value against the image, from the open answers (no boxes
    # needed): stage 1 ("stage1") or both stages ("both") learn from them to verify what a question names
    verify = verification_questions({k: [(r.question, r.answer, r.answer_type) for r in recs if r.lang == "en"]
                                     for k, recs in per_image.items()}, opts.seed) if opts.verify_qa != "none" else {}
    # closed questions whose answer the same image's open answers imply, evening out each text's answers
    implied = implied_questions({k: [(r.question, r.answer, r.answer_type) for r in recs]
                                 for k, recs in per_image.items()}, opts.seed) if opts.implied_qa == "both" else {}
    _write_vqa(out_dir, by_split, verify, in_train=opts.verify_qa == "both", implied=implied)
    # stage 1 also learns where each finding is, from the boxes of the training images (English)
    box_questions = _box_questions(images.boxes, sorted(per_image)) \
        if opts.box_qa and opts.lang in ("en", "all") else {}
    captions = _write_stage1(out_dir, per_image, box_questions, verify, implied, by_split.get("train", []))
    used = {rec.image_key for rec in final}
    atomic_write_text(out_dir / BOXES_FILE, json.dumps({k: v for k, v in sorted(images.boxes.items()) if k in used},
                                                       ensure_ascii=False) + "\n")
    for w in images.box_warnings[:5]:
        log.warning("%s", w)
    if len(images.box_warnings) > 5:
        log.warning("... and %d more image(s) whose detection.json was skipped (listed in the manifest)",
                    len(images.box_warnings) - 5)
    n_verify = sum(map(len, verify.values()))
    manifest = {
        "source": conv.source, "lang": opts.lang,
        "counts": {s: len(by_split.get(s, [])) for s in VQA_FILES},
        "answer_types": {s: dict(sorted(Counter(r.answer_type for r in by_split.get(s, [])).items()))
                         for s in VQA_FILES},
        "images": split_counts["images"],
        "pretrain_captions": captions,
        "pretrain_verify_questions": n_verify,
        "train_verify_questions": n_verify if opts.verify_qa == "both" else 0,
        "implied_questions": sum(map(len, implied.values())),
        "pretrain_box_questions": sum(map(len, box_questions.values())),
        "pretrain_train_questions": len(by_split.get("train", [])),
        "image_overlap": split_counts["image_overlap"],
        # what answering from the question alone scores on the test split (evaluation prints the same)
        "baselines_test": _test_baselines(opts.priors, by_split),
        "split": resplit or {"kind": "release"},
        "images_written": images.copied,
        "images_with_boxes": sum(k in used for k in images.boxes),
        "box_warnings": images.box_warnings,
        "skipped": list(skipped),
        "notes": conv.notes + ([f"split rule: {moved} non-English question(s) moved to the split their image has "
                                "among the English questions (one split per image in every language)"]
                               if moved else []),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _test_baselines(priors, by_split: dict) -> dict:
    if not (priors and by_split.get("train") and by_split.get("test")):
        return {}
    return priors([{"question": r.question, "answer": r.answer, "answer_type": r.answer_type} for r in by_split["train"]],
                  [{"question": r.question, "answer": r.answer, "answer_type": r.answer_type, "content_type": None,
                    "modality": None} for r in by_split["test"]])
