"""Validation during training: loss and teacher-forced exact match per answer type, the
question-text prior beside it, and the advice printed at the end of a run."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dataset.contract import own_answers
from dataset.features import FeatureStore
from dataset.vqa_dataset import MODEL_INPUTS, StepShapes, VQADataset, collate
from evaluation.metrics import baselines
from infra.runtime import unwrap
from model.tokenization import IGNORE_INDEX
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.step import PAD_MULTIPLE, to_device


@dataclass
class Validation:
    """One pass over the validation set: mean loss per answer token, and exact match per
    answer type. Exact match is teacher-forced (every answer token, end of turn included, is
    the arg-max prediction), which is what greedy decoding would answer, at no generation cost;
    it can keep rising while the loss rises too (confident mistakes cost more loss)."""
    loss: float
    closed: float | None
    open: float | None

    def exact_match_text(self) -> str:
        return ", ".join(f"{k} {100 * v:.1f}%" for k, v in (("closed", self.closed), ("open", self.open))
                         if v is not None)

    def line(self) -> str:
        acc = self.exact_match_text()
        return f"validation loss {self.loss:.4f}" + (f", exact match {acc}" if acc else "")

    def row(self) -> dict:
        return {"val_loss": round(self.loss, 6),
                **{f"val_{k}_acc": round(v, 4) for k, v in (("closed", self.closed), ("open", self.open))
                   if v is not None}}

    @property
    def accuracy(self) -> float | None:
        known = [v for v in (self.closed, self.open) if v is not None]
        return sum(known) / len(known) if known else None


def validation_prior(data: VQADataset, val: VQADataset | None) -> Validation | None:
    """What answering every validation question with the commonest training answer for the same
    question text scores (the per-question prior; loss unknown). A model whose closed exact match
    stays there answers closed questions from the text alone."""
    if val is None:
        return None
    train_items, val_items = (own_answers([s.record for s in d.samples]) for d in (data, val))
    if not train_items or not val_items:
        return None
    b = baselines(train_items, val_items)["majority_per_question"]
    return Validation(float("nan"), b["closed_accuracy"], b["open_accuracy"])


PRIOR_MARGIN = 0.05  # closed exact match within this of the text prior counts as "near the prior"


def prior_advice(last: Validation | None, prior: Validation | None, epochs: int) -> str | None:
    """A warning when closed questions end near the per-question prior: the image is not used for them."""
    if last is None or prior is None or last.closed is None or prior.closed is None:
        return None
    if last.closed >= prior.closed + PRIOR_MARGIN:
        return None
    return (f"closed questions end near the question-text prior (validation exact match {100 * last.closed:.1f}% vs "
            f"{100 * prior.closed:.1f}% for the commonest training answer of each question; less than "
            f"{100 * PRIOR_MARGIN:.0f} points above it): "
            f"the model does not use the image for them yet. Small models trained from scratch learn closed questions "
            f"late (after about 12 epochs on the hard demo set): train longer, e.g. --epochs {max(4 * epochs, 32)}")


def more_epochs_advice(history: list[Validation], epochs: int) -> str | None:
    """A hint when validation was still clearly improving at the end of training: the loss
    falling, or the exact match rising (it often keeps rising after the loss has turned up)."""
    if len(history) < 2:
        return None
    before, last = history[-2], history[-1]
    losses = [v.loss for v in history]
    more = f"more epochs would likely help (e.g. --epochs {2 * epochs})"
    drop = (before.loss - last.loss) / max(abs(before.loss), 1e-9)
    if last.loss <= min(losses) and drop >= 0.01:
        return (f"validation loss still falling ({before.loss:.4f} -> {last.loss:.4f} in the last epoch, "
                f"-{100 * drop:.1f}%): {more}")
    accuracies = [v.accuracy for v in history if v.accuracy is not None]
    if last.accuracy is not None and before.accuracy is not None and last.accuracy >= max(accuracies) \
            and last.accuracy - before.accuracy >= 0.01:
        return (f"validation exact match still rising ({100 * before.accuracy:.1f}% -> {100 * last.accuracy:.1f}% "
                f"in the last epoch): {more}")
    return None


@torch.no_grad()
def evaluate(model, data: VQADataset, features: FeatureStore, cfg: TrainConfig, dist: Dist, device, amp,
             shapes: StepShapes | None = None, graphs: bool = False) -> Validation:
    """``shapes``: fixed batch shapes for a compiled model (trainer.step.StepRunner); padding
    answer-token slots count as neither loss nor misses."""
    config = unwrap(model).config  # model may be the compiled wrapper
    model.eval()
    # loss sum, tokens, then (exact, count) for closed and open questions; summed on the device
    total = torch.zeros(6, device=device, dtype=torch.float64)
    idx = list(range(dist.rank, len(data), dist.world))
    for i in range(0, len(idx), cfg.batch_size):
        samples = [data.samples[j] for j in idx[i:i + cfg.batch_size]]
        batch = collate(samples, config.pad_token_id, config.image_token_id, PAD_MULTIPLE,
                        shapes)
        n_targets = float(batch.n_targets)
        closed = torch.tensor([s.record.get("answer_type") == "CLOSED" for s in samples], dtype=torch.float64)
        rows = batch["target_pos"] // batch["input_ids"].shape[1]  # the sample each answer token belongs to
        feats = features.get(batch["image_index"])
        batch = to_device({**batch, "closed": closed, "rows": rows}, device)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            out = model(batch["input_ids"], feats, with_hits=True, **{k: batch[k] for k in MODEL_INPUTS if k in batch})
            loss_sum, hits = out.loss_sum, out.hits
        misses = torch.zeros(len(samples), device=device, dtype=torch.float64).index_add_(
            0, batch["rows"], (~(hits | (batch["targets"] == IGNORE_INDEX))).double())
        exact = (misses == 0).double()
        closed = batch["closed"]
        total += torch.stack([loss_sum.double(), torch.tensor(n_targets, device=device, dtype=torch.float64),
                              (exact * closed).sum(), closed.sum(), (exact * (1 - closed)).sum(), (1 - closed).sum()])
    dist.all_sum(total)
    model.train()
    t = total.tolist()
    return Validation(t[0] / max(t[1], 1), t[2] / t[3] if t[3] else None, t[4] / t[5] if t[5] else None)
