"""How sure the model is: the probability of each candidate answer, scored in one batched,
teacher-forced pass (no generation). For closed questions and --constrain the candidates are a
fixed set (Yes / No), so their sequence log-likelihoods, normalised over the set, are a proper
distribution: the model's confidence, its alternatives, and what calibration is measured on."""
from __future__ import annotations

import torch

from dataset.vqa_dataset import MODEL_INPUTS, Sample, collate
from model.tokenization import IGNORE_INDEX


@torch.inference_mode()
def pair_log_likelihoods(model, prompts: list[list[int]], image_features: torch.Tensor | None,
                         pairs: list[tuple[int, list[int]]]) -> torch.Tensor:
    """[len(pairs)]: log p(answer tokens | prompts[i], image i) for every (i, answer tokens) pair,
    all in one teacher-forced pass. ``image_features`` [n_images, tokens, width] in prompt order
    (one image per prompt, as in evaluation); every answer ends with the end-of-turn token."""
    device = next(model.parameters()).device
    samples = []
    for i, c in pairs:
        p = prompts[i]
        n_img = p.count(model.config.image_token_id) // max(model.config.image_tokens, 1)
        samples.append(Sample(list(p) + list(c), [IGNORE_INDEX] * len(p) + list(c), [i] * n_img, {}))
    batch = collate(samples, model.config.pad_token_id, model.config.image_token_id)
    feats = None
    if image_features is not None and len(batch["image_index"]):
        feats = image_features.index_select(0, batch["image_index"].to(image_features.device))
    b = {key: v.to(device) for key, v in batch.items()}
    logits = model(b["input_ids"], feats, **{key: b[key] for key in MODEL_INPUTS if key in b},
                   return_logits=True).logits
    token_lp = torch.log_softmax(logits.float(), -1).gather(1, b["targets"][:, None]).squeeze(1)
    rows = b["target_pos"] // b["input_ids"].shape[1]
    return torch.zeros(len(samples), device=device).index_add_(0, rows, token_lp)


def candidate_log_likelihoods(model, prompts: list[list[int]], image_features: torch.Tensor | None,
                              candidates: list[list[int]]) -> torch.Tensor:
    """[len(prompts), len(candidates)]: log p(candidate tokens | prompt, image) for every pair."""
    pairs = [(i, c) for i in range(len(prompts)) for c in candidates]
    return pair_log_likelihoods(model, prompts, image_features, pairs).view(len(prompts), len(candidates))


@torch.inference_mode()
def next_token_log_probs(model, prompts: list[list[int]], image_features: torch.Tensor | None) -> torch.Tensor:
    """[len(prompts), vocab]: the log-probabilities of each prompt's next token (right-padded
    batch; causal attention keeps the padding out of every real position)."""
    device = next(model.parameters()).device
    samples = [Sample(list(p), [IGNORE_INDEX] * len(p), [i] * (p.count(model.config.image_token_id)
                                                             // max(model.config.image_tokens, 1)), {})
               for i, p in enumerate(prompts)]
    batch = collate(samples, model.config.pad_token_id, model.config.image_token_id)
    feats = None
    if image_features is not None and len(batch["image_index"]):
        feats = image_features.index_select(0, batch["image_index"].to(image_features.device))
    ids = batch["input_ids"].to(device)
    h = model.llm(model.embed(ids, feats, batch["image_slots"].to(device)))
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    return torch.log_softmax(model.llm.lm_head(h[torch.arange(len(prompts), device=device), last]).float(), -1)


ABSTAIN_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def abstention(probs: list[float], correct: list[bool], threshold: float) -> dict:
    """Answering only when the top probability is at least ``threshold`` ('not sure' below it):
    the share of questions still answered (coverage) and the accuracy on those."""
    kept = [c for p, c in zip(probs, correct) if p >= threshold]
    return {"threshold": threshold, "coverage": len(kept) / len(probs) if probs else 0.0,
            "accuracy": sum(kept) / len(kept) if kept else None}


def calibration(probs: list[float], correct: list[bool], bins: int = 10,
                thresholds: tuple[float, ...] = ABSTAIN_THRESHOLDS) -> dict:
    """Expected calibration error (equal-width bins of the top probability), the Brier score
    of the top answer, the reliability table, accuracy at the most confident 25/50/75/100 %, and
    coverage and accuracy when abstaining below each of ``thresholds``."""
    n = len(probs)
    if not n:
        return {}
    table = []
    ece = 0.0
    for j in range(bins):
        lo, hi = j / bins, (j + 1) / bins
        members = [i for i, p in enumerate(probs) if lo <= p < hi or (j == bins - 1 and p == 1.0)]
        if members:
            conf = sum(probs[i] for i in members) / len(members)
            acc = sum(correct[i] for i in members) / len(members)
            ece += len(members) / n * abs(acc - conf)
            table.append({"bin": [lo, hi], "count": len(members), "confidence": conf, "accuracy": acc})
    order = sorted(range(n), key=lambda i: -probs[i])
    coverage = {}
    for share in (0.25, 0.5, 0.75, 1.0):
        top = order[:max(1, round(share * n))]
        coverage[f"{int(share * 100)}%"] = sum(correct[i] for i in top) / len(top)
    brier = sum((p - float(c)) ** 2 for p, c in zip(probs, correct)) / n
    return {"count": n, "accuracy": sum(correct) / n, "ece": ece, "brier": brier, "reliability": table,
            "accuracy_at_coverage": coverage,
            "abstain": [abstention(probs, correct, t) for t in sorted(set(thresholds))]}
