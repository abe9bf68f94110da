"""Tokenised training data and the batch collator.

Samples are tokenised once up front (a few thousand short conversations) and refer to
images by index into a table of unique image files, so frozen vision features are
computed once per image and gathered per batch.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset.answers import normalize
from dataset.boxes import look_mask
from dataset.contract import DataError, image_file, images_of, read_jsonl
from model.config import IMAGE_PLACEHOLDER
from model.tokenization import IGNORE_INDEX, ChatEncoder

log = logging.getLogger(__name__)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    images: list[int]  # indices into VQADataset.image_paths
    record: dict
    # shared-prefix packing (PackedQuestions): 0 = the shared image prefix, j >= 1 = question j
    segments: list[int] | None = None
    positions: list[int] | None = None
    # --look_loss (annotate_look): where in its image the question should look, a distribution over patches;
    # a packed sequence carries one per question: (position of its first answer token, target)
    look: torch.Tensor | None = None
    looks: list[tuple[int, torch.Tensor]] | None = None

    def look_entries(self) -> list[tuple[int, torch.Tensor]]:
        if self.looks is not None:
            return self.looks
        if self.look is None:
            return []
        return [(_first_answer_token(self.input_ids, self.labels)[0], self.look)]


class VQADataset:
    def __init__(self, data_path: str | Path, images_path: str | Path, encoder: ChatEncoder,
                 max_seq_len: int, image_paths: list[Path] | None = None, hint: str = ""):
        """``image_paths``: an existing image table to extend (so the train and validation
        sets share one feature cache)."""
        self.path = Path(data_path)
        self.images_root = Path(images_path)
        self.records = read_jsonl(self.path, hint=hint)
        self.image_paths: list[Path] = image_paths if image_paths is not None else []
        index = {p: i for i, p in enumerate(self.image_paths)}
        self.samples: list[Sample] = []
        self.truncated = 0
        self.dropped: list[str] = []
        for n, rec in enumerate(self.records, 1):
            where = f"{self.path}:{n}"
            try:
                enc = encoder.encode(rec["conversations"], max_seq_len)
            except ValueError as exc:
                self.dropped.append(f"{where}: {exc}")
                continue
            if not any(t != IGNORE_INDEX for t in enc.labels):
                raise DataError(f"{where}: sample has no answer tokens to learn from")
            idx = []
            for rel in images_of(rec):
                p = image_file(self.images_root, rel, where)
                if not p.is_file():
                    raise DataError(f"{where}: image {p} not found; run convert_slake_dataset.py or pass "
                                    "--images_path to the folder the 'image' paths are relative to")
                if p not in index:
                    index[p] = len(self.image_paths)
                    self.image_paths.append(p)
                idx.append(index[p])
            self.truncated += enc.truncated_tokens > 0
            self.samples.append(Sample(enc.input_ids, enc.labels, idx, rec))
        if not self.samples:
            raise DataError(f"{self.path}: no usable samples ({len(self.dropped)} too long for "
                            f"--max_seq_len {max_seq_len})")
        if self.truncated:
            log.warning("%s: %d sample(s) longer than --max_seq_len %d had their question shortened "
                        "(answers and image tokens are never cut)", self.path, self.truncated, max_seq_len)
        if self.dropped:
            log.warning("%s: %d sample(s) dropped, e.g. %s", self.path, len(self.dropped), self.dropped[0])

    def __len__(self) -> int:
        return len(self.samples)

    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)

    def fingerprint(self) -> str:
        """What the run trains on, in order: every sample's tokens, which of them are learned, and its
        image names (as the data file writes them, so a moved dataset folder keeps its fingerprint).
        ``--resume`` compares it, so a re-converted or edited data file is not continued silently."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(repr((s.input_ids, s.labels, images_of(s.record))).encode())
        return h.hexdigest()[:16]


def _prompt_text(record: dict) -> str:
    """Everything said before the answer, image placeholders removed."""
    return " ".join(m["content"] for m in record["conversations"][:-1]).replace(IMAGE_PLACEHOLDER, " ")


def _answer_key(s: Sample, closed_only: bool = True) -> tuple[str, str] | None:
    """(normalised question text, normalised answer) of a closed question (of any question, open
    or closed, with ``closed_only=False``; a caption has no answer_type), else None."""
    if s.record.get("answer_type") != "CLOSED" and (closed_only or "answer_type" not in s.record):
        return None
    return normalize(_prompt_text(s.record)), normalize(s.record["conversations"][-1]["content"])


def _answer_index_groups(samples: list[Sample], closed_only: bool = True) -> dict[str, dict[str, list[int]]]:
    """Indices of the closed questions (of every question with ``closed_only=False``) grouped by
    normalised question text, then by normalised answer."""
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, s in enumerate(samples):
        key = _answer_key(s, closed_only)
        if key is not None:
            groups[key[0]][key[1]].append(i)
    return groups


def _closed_groups(samples: list[Sample]) -> dict[str, dict[str, list[Sample]]]:
    """Closed samples grouped by normalised question text, then by normalised answer."""
    return {text: {a: [samples[i] for i in idx] for a, idx in by_answer.items()}
            for text, by_answer in _answer_index_groups(samples).items()}


def _first_answer_token(input_ids: list[int], labels: list[int]) -> tuple[int, int] | None:
    for i, t in enumerate(labels):
        if t != IGNORE_INDEX:
            return i, input_ids[i]
    return None


def annotate_look(data: VQADataset, classes: list[str], targets: torch.Tensor, known: torch.Tensor) -> int:
    """Gives every single-image question that names box names of its image a target over the
    image's patches (``dataset.boxes.look_mask``, as a distribution). ``targets`` [n_images,
    patches, names] and ``known`` from dataset.boxes.patch_targets over the data's image table.
    Returns how many questions got one."""
    marked = 0
    for s in data.samples:
        if len(s.images) != 1 or not known[s.images[0]]:
            continue
        mask = look_mask(_prompt_text(s.record), classes, targets[s.images[0]])
        if mask is None:
            continue
        s.look = mask.float() / mask.sum()
        marked += 1
    return marked


def closed_text_prior(samples: list[Sample]) -> tuple[int, float | None]:
    """(closed samples, the share of them whose answer is the commonest answer of their
    question text). 0.5 for yes/no texts answered both ways equally often: the image must
    decide; near 1.0 the text alone predicts the answer, and a model can score well on closed
    questions without looking at the image."""
    groups = _closed_groups(samples)
    n = sum(len(v) for by_answer in groups.values() for v in by_answer.values())
    if not n:
        return 0, None
    return n, sum(max(len(v) for v in by_answer.values()) for by_answer in groups.values()) / n


class PackedQuestions:
    """Shared-prefix packing: up to ``k`` single-image questions about the same image in one
    training sequence, laid out as [header + image tokens][question 1 + answer 1][question 2 +
    answer 2]..., where each question attends only to the shared prefix and to itself, with
    the positions it would have alone. The loss and gradients equal those of the k separate
    samples, but the 196 image tokens are processed once instead of k times. Groups are
    re-drawn every epoch from (seed, epoch) alone, so runs stay reproducible and resumable;
    the number of sequences per epoch is fixed."""

    def __init__(self, data: VQADataset, image_id: int, k: int, seed: int):
        self.data, self.k, self.seed = data, k, seed
        by_image = defaultdict(list)
        self.singles = []
        self.prefix_len: dict[int, int] = {}
        for i, s in enumerate(data.samples):
            p = self._prefix_len(s, image_id)
            if p:
                self.prefix_len[i] = p
                by_image[s.images[0]].append(i)
            else:
                self.singles.append(i)
        self.by_image = [by_image[key] for key in sorted(by_image)]
        self.length = len(self.singles) + sum(-(-len(g) // k) for g in self.by_image)

    @staticmethod
    def _prefix_len(s: Sample, image_id: int) -> int:
        """Length of header + image tokens when the sample is one question opening with its
        only image (the SLAKE form); 0 when it cannot share a prefix."""
        conv = s.record["conversations"]
        if len(s.images) != 1 or len(conv) != 2 or not conv[0]["content"].startswith(IMAGE_PLACEHOLDER):
            return 0
        last = len(s.input_ids) - 1 - s.input_ids[::-1].index(image_id)
        return last + 1

    def __len__(self) -> int:
        return self.length

    def epoch_samples(self, epoch: int) -> list[Sample]:
        rng = random.Random(self.seed * 1000 + epoch)
        out = [self.data.samples[i] for i in self.singles]
        for group in self.by_image:
            order = list(group)
            rng.shuffle(order)
            for start in range(0, len(order), self.k):
                out.append(self._pack(order[start:start + self.k]))
        return out

    def _pack(self, idx: list[int]) -> Sample:
        first = self.data.samples[idx[0]]
        p = self.prefix_len[idx[0]]
        ids, labels = list(first.input_ids[:p]), [IGNORE_INDEX] * p
        segments, positions = [0] * p, list(range(p))
        looks = []
        for j, i in enumerate(idx, 1):
            s = self.data.samples[i]
            if s.input_ids[:p] != ids[:p]:
                raise DataError(f"{self.data.path}: samples of one image disagree on the image prefix")
            looks += [(len(ids) + pos - p, target) for pos, target in s.look_entries()]
            suffix = s.input_ids[p:]
            ids += suffix
            labels += s.labels[p:]
            segments += [j] * len(suffix)
            positions += range(p, p + len(suffix))
        return Sample(ids, labels, first.images, first.record, segments, positions, looks=looks)


@dataclass(frozen=True)
class StepShapes:
    """A few fixed batch shapes for a whole run (torch.compile and CUDA graphs compile once per
    shape): batch widths from ``widths`` (the smallest that fits), the answer-token list padded
    to ``targets`` entries and the --look_loss list to ``looks``. Padding targets are ignored
    by the loss (IGNORE_INDEX) and padding looks weigh 0, so a padded batch computes exactly
    the loss of the unpadded one. A batch that does not fit (a longer epoch of packed
    sequences) keeps its own shape."""
    widths: tuple[int, ...]
    targets: int
    looks: int
    look_patches: int = 0  # the patches per image of a look target

    def describe(self) -> str:
        return (f"widths {'/'.join(map(str, self.widths))}, {self.targets} answer-token slots"
                + (f", {self.looks} look slots" if self.looks else ""))


def plan_shapes(samples: list[Sample], batch_size: int, buckets: int = 4, multiple: int = 8) -> StepShapes:
    """At most ``buckets`` widths spread evenly between the shortest and the longest sequence
    (rounded up to ``multiple``), and answer-token and look slots for a batch of the
    ``batch_size`` samples with the most of them. Computed once from the training samples."""
    lengths = sorted(len(s.input_ids) for s in samples)
    lo, hi = lengths[0], lengths[-1]
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    widths = sorted({up(round(lo + (hi - lo) * (i + 1) / buckets)) for i in range(buckets)})  # the last is up(hi)
    per_target = sorted((sum(t != IGNORE_INDEX for t in s.labels) for s in samples), reverse=True)
    per_look = sorted((len(s.look_entries()) for s in samples), reverse=True)
    patches = next((t.shape[0] for s in samples for _, t in s.look_entries()), 0)
    return StepShapes(tuple(widths), up(sum(per_target[:batch_size])), sum(per_look[:batch_size]) if patches else 0,
                      patches)


class Batch(dict):
    """collate's tensors, plus ``n_targets``: the number of real answer tokens as a host int
    (padding slots excluded), so the trainer never asks the device for it."""
    n_targets: int = 0


def collate(samples: list[Sample], pad_id: int, image_id: int | None = None,
            pad_multiple: int = 1, shapes: StepShapes | None = None) -> Batch:
    """Right-pads to the longest sequence in the batch, rounded up to ``pad_multiple`` (few
    distinct shapes for torch.compile), never to a fixed max_seq_len; with ``shapes``, to the
    plan's width and slot counts instead (see StepShapes).

    Also builds, on the host, the flat indices the model would otherwise find with boolean
    masks on the device (each a sync): ``target_pos`` (positions whose next token is an
    answer token), ``targets`` (those tokens) and, with ``image_id``, ``image_slots`` (the
    image-token positions). ``Batch.n_targets`` is their count as a plain number."""
    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // pad_multiple) * pad_multiple
    if shapes is not None:
        width = next((w for w in shapes.widths if w >= longest), width)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, :len(s.labels)] = torch.tensor(s.labels)
    images = torch.tensor([j for s in samples for j in s.images], dtype=torch.long)
    nxt = torch.full_like(labels, IGNORE_INDEX)
    nxt[:, :-1] = labels[:, 1:]
    target_pos = (nxt.view(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    targets = nxt.view(-1)[target_pos]
    n_targets = target_pos.shape[0]
    if shapes is not None and shapes.targets > n_targets:  # slots at position 0, ignored by the loss
        target_pos = torch.cat([target_pos, target_pos.new_zeros(shapes.targets - n_targets)])
        targets = torch.cat([targets, targets.new_full((shapes.targets - n_targets,), IGNORE_INDEX)])
    batch = Batch({"input_ids": ids, "labels": labels, "image_index": images, "target_pos": target_pos,
                   "targets": targets})
    batch.n_targets = n_targets
    if image_id is not None:
        batch["image_slots"] = (ids.view(-1) == image_id).nonzero().squeeze(1)
    looking = [(i, pos, target) for i, s in enumerate(samples) for pos, target in s.look_entries()]
    # a fixed step shape pads the list with weight-0 slots: position 0 looking at the batch's first image
    extra = max(0, shapes.looks - len(looking)) if shapes is not None and images.numel() else 0
    if looking or extra:
        first_image = torch.tensor([0] + [len(s.images) for s in samples[:-1]]).cumsum(0)
        # the position that predicts the question's first answer token looks at the row's (first) image
        batch["look_pos"] = torch.tensor([i * width + pos - 1 for i, pos, _ in looking] + [0] * extra)
        batch["look_image"] = first_image[[i for i, _, _ in looking] + [0] * extra]
        batch["look_target"] = torch.stack([t for _, _, t in looking]
                                           + ([torch.zeros(shapes.look_patches)] * extra if extra else []))
        batch["look_weight"] = torch.tensor([1.0] * len(looking) + [0.0] * extra)
    if any(s.segments is not None for s in samples):
        # Shared-prefix packed rows: a question sees the image prefix and itself, never the
        # other questions. Unpacked rows are one segment (plain causal); padding is its own.
        seg = torch.full((len(samples), width), -1, dtype=torch.long)
        pos = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            seg[i, :n] = torch.tensor(s.segments) if s.segments is not None else 0
            pos[i, :n] = torch.tensor(s.positions) if s.positions is not None else torch.arange(n)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        visible = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
        batch["attn_mask"] = (causal & visible).unsqueeze(1)
        batch["position_ids"] = pos
    return batch


# batch entries the model takes as keyword arguments (all but the image table index)
MODEL_INPUTS = ("position_ids", "attn_mask", "image_slots", "target_pos", "targets")


CONTRAST_SHARE = 8  # a contrast look target is the top 1/8 of its image's patches
FEATURE_CHUNK = 256  # images whose features are read at once (bounded memory with CLIP's 196 x 768)
CONTRAST_BANK = 4096  # patches of the other answers' images each patch is compared with (a fixed sample)
CONTRAST_CHUNK = 16   # images compared with the bank at once ([16 x 196, 4096] distances: 50 MB)
CONTRAST_REACH = 7    # "the same place" is within side // 7 patches each way (2 on a 14 x 14 grid)


@dataclass
class PatchBank:
    """A fixed sample of patches of some images: features [M, D] and their places on the patch
    grid [M] (row * side + column)."""
    feats: torch.Tensor
    places: torch.Tensor


def _patch_bank(rows, images: list[int], size: int = CONTRAST_BANK) -> PatchBank:
    """A fixed random sample of about ``size`` patches of ``images`` (all of them when fewer),
    the same number from each image at random places (fixed grid places would make every other
    place look new to features that carry their position): what a contrast target measures
    novelty against, bounded in memory and time."""
    gen = torch.Generator().manual_seed(0)
    per = max(1, -(-size // len(images)))  # patches taken from each image
    parts, places = [], []
    for start in range(0, len(images), FEATURE_CHUNK):
        feats = rows(torch.tensor(images[start:start + FEATURE_CHUNK])).float()  # [n, P, D]
        n, p, d = feats.shape
        pick = torch.rand(n, p, generator=gen).argsort(dim=1)[:, :min(per, p)].to(feats.device)
        parts.append(feats.gather(1, pick[..., None].expand(-1, -1, d)).reshape(-1, d))
        places.append(pick.reshape(-1))
    return PatchBank(torch.cat(parts)[:size], torch.cat(places)[:size])


def _sq_distance_block(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[N, M] squared distances |x|^2 - 2 x.y + |y|^2 of rows of ``x`` [N, D] to rows of ``bank``
    [M, D], in one product updated in place: a single large block that is freed whole
    (torch.cdist's batched temporaries fragmented the CPU heap: stage 2 of a 300-image set grew by
    gigabytes)."""
    block = x @ bank.T
    return block.mul_(-2).add_((bank * bank).sum(dim=1)).add_((x * x).sum(dim=1)[:, None])


def _far_from_bank(bank: PatchBank, side: int, radius: int) -> torch.Tensor:
    """[P, M] True where bank patch m was taken more than ``radius`` patches (either way) from
    place p of a ``side`` x ``side`` grid: built once per bank, it serves every chunk of images."""
    grid = torch.arange(side * side, device=bank.places.device)
    return (((grid // side)[:, None] - (bank.places // side)[None]).abs() > radius) | \
           (((grid % side)[:, None] - (bank.places % side)[None]).abs() > radius)


def _two_way_sq_distance(feats: torch.Tensor, bank: PatchBank, far: torch.Tensor) -> torch.Tensor:
    """[n, P] novelty of each place of each image ``feats`` [n, P, D] against the bank, both ways
    and only near the same place (``far`` [P, M] from ``_far_from_bank``: anatomy that moves a
    little is no difference, while the other side of the body is another place): the squared
    distance of the image's patch there to the nearest bank patch near it
    (what this image has that the others lack), plus the mean over the bank patches taken there of
    their squared distance to the image's nearest patch near them (what the others have there that
    this image lacks: where a lesion-free image's answer is decided, and the place a lesion on the
    other side would be)."""
    n, p, _ = feats.shape
    block = _sq_distance_block(feats.reshape(-1, feats.shape[-1]), bank.feats).view(n, p, -1)
    block.masked_fill_(far, float("inf"))
    here = block.amin(dim=2)  # [n, P]; inf where no bank patch was taken near a place
    here = torch.where(here.isinf(), here.masked_fill(here.isinf(), 0).amax(dim=1, keepdim=True), here)
    there = block.amin(dim=1)  # [n, M]: every bank patch has the image's own patches near it
    missing = torch.zeros(n, p, device=feats.device).scatter_reduce_(
        1, bank.places[None].expand(n, -1), there, "mean", include_self=False)
    return here + missing


def annotate_contrast_look(data: VQADataset, rows, side: int, share: int = CONTRAST_SHARE) -> int:
    """Look targets without boxes (issue #26, lever f): for a question text (open or closed)
    answered more than one way in the training data, each of its single-image questions that has
    no box target is told to look at the top 1/``share`` of its image's patches (a ``side`` x
    ``side`` grid) by how new they are against a fixed sample of the patches of the images that
    text was answered otherwise on, near the same place and both ways (``_two_way_sq_distance``):
    the evidence that tells the answers apart (a lesion against lesion-free images, an organ
    against images without it), where a lesion-free image's answer is decided (where the others
    have theirs) and both places a side question is decided at. Anatomy that moves by a little is
    no difference. (Comparing each patch with the mean of those images at the same place lived
    until a9e8ae9; with the nearest of their patches anywhere until 88f56f9: docs/learning.md.)
    ``rows(index)``: frozen features [len(index), P, D] of image-table rows. Returns how many
    questions got one. Open questions too: giving only the closed ones targets lost (docs/learning.md)."""
    radius = max(1, side // CONTRAST_REACH)
    marked = 0
    for by_answer in _answer_index_groups(data.samples, closed_only=False).values():
        singles = {a: [i for i in idx if len(data.samples[i].images) == 1] for a, idx in by_answer.items()}
        images = {a: [data.samples[i].images[0] for i in v] for a, v in singles.items() if v}
        if len(images) < 2:
            continue
        for a in images:
            todo = [i for i in singles[a] if data.samples[i].look is None]
            if not todo:  # every question of this answer has a box target: no bank to build
                continue
            bank = _patch_bank(rows, sorted({j for b, w in images.items() if b != a for j in w}))
            far = _far_from_bank(bank, side, radius)
            for start in range(0, len(todo), CONTRAST_CHUNK):
                part = todo[start:start + CONTRAST_CHUNK]
                feats = rows(torch.tensor([data.samples[i].images[0] for i in part])).float()
                dist = _two_way_sq_distance(feats, bank, far)
                k = max(1, dist.shape[1] // share)
                target = torch.zeros_like(dist).scatter_(1, dist.topk(k, dim=1).indices, 1.0 / k).cpu()
                for i, t in zip(part, target):
                    data.samples[i].look = t
                marked += len(part)
    return marked
