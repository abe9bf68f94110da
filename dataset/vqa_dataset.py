"""Tokenised training data and the batch collator.

Samples are tokenised once up front (a few thousand short conversations) and refer to
images by index into a table of unique image files, so frozen vision features are
computed once per image and gathered per batch.
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset.contract import DataError, answer_of, images_of, question_of, read_jsonl
from model.config import IMAGE_PLACEHOLDER
from model.tokenization import IGNORE_INDEX, ChatEncoder

log = logging.getLogger(__name__)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    images: list[int]  # indices into VQADataset.image_paths
    record: dict


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
                p = (self.images_root / rel).resolve()
                if not p.is_relative_to(self.images_root.resolve()):
                    raise DataError(f"{where}: image path {rel!r} escapes {self.images_root}")
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


class PackedQuestions:
    """Training sequences that pack up to ``k`` single-image questions about the same image
    into one multi-turn conversation: the image's 196 tokens are processed once for k
    answers, and the model learns follow-up questions (the web demo's chat). Groups and
    their order are re-drawn every epoch from (seed, epoch) alone, so runs stay exactly
    reproducible and resumable; the number of sequences per epoch is fixed."""

    def __init__(self, data: VQADataset, encoder: ChatEncoder, k: int, max_seq_len: int, seed: int):
        self.data, self.encoder, self.k, self.max_seq_len, self.seed = data, encoder, k, max_seq_len, seed
        by_image = defaultdict(list)
        self.singles = []
        for i, s in enumerate(data.samples):
            conv = s.record["conversations"]
            single_turn = len(s.images) == 1 and len(conv) == 2 and conv[0]["content"].startswith(IMAGE_PLACEHOLDER)
            (by_image[s.images[0]] if single_turn else self.singles).append(i)
        self.by_image = [by_image[k_] for k_ in sorted(by_image)]
        self.length = len(self.singles) + sum(-(-len(g) // k) for g in self.by_image)

    def __len__(self) -> int:
        return self.length

    def epoch_samples(self, epoch: int) -> list[Sample]:
        rng = random.Random(self.seed * 1000 + epoch)
        out = [self.data.samples[i] for i in self.singles]
        for group in self.by_image:
            order = list(group)
            rng.shuffle(order)
            for start in range(0, len(order), self.k):
                out.append(self._pack([self.data.samples[i] for i in order[start:start + self.k]]))
        return out

    def _pack(self, members: list[Sample]) -> Sample:
        if len(members) == 1:
            return members[0]
        conv = list(members[0].record["conversations"])
        for m in members[1:]:
            conv += [{"role": "user", "content": question_of(m.record)},
                     {"role": "assistant", "content": answer_of(m.record)}]
        try:
            enc = self.encoder.encode(conv, self.max_seq_len)
        except ValueError:  # too long together: keep the first question alone
            return members[0]
        return Sample(enc.input_ids, enc.labels, members[0].images, members[0].record)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads to the longest sequence in the batch (not to a fixed max_seq_len)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, :len(s.labels)] = torch.tensor(s.labels)
    images = torch.tensor([j for s in samples for j in s.images], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "image_index": images}
