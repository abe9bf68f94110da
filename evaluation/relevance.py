"""Where the model looked: a relevance map over the image patches for an answer.

Four methods, compared by the pointing game (docs/evaluation.md; eval_vlm.py --relevance all):

* ``look``: the attention of head 0 of the last layer from the position that starts the answer
  (the head ``--look_loss`` trains to point at the named organ or finding). One forward pass.
* ``rollout``: attention rollout (Abnar & Zuidema 2020): every layer's attention averaged over
  heads, mixed half-and-half with the identity for the residual stream and multiplied through
  the layers, read at the answer's first position.
* ``grad_x_input``: the gradient of the answer's log-likelihood with respect to each image
  token's input embedding, times that embedding, summed over the width (absolute value).
* ``attn_grad``: every layer's attention weighted by its gradient (positive part, mean over
  heads; Chefer et al. 2021), summed over layers, read at the answer's first position.

The explicit attention (``model.language_model.AttentionProbe``, per call, so concurrent
explanations on one model never mix) and the gradients cost one forward (and one
backward) pass of the prompt plus the answer; evaluation and generation never take this path
unless asked, so an explanation costs nothing when it is not requested.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dataset.vqa_dataset import Sample, collate
from model.language_model import AttentionProbe
from model.tokenization import IGNORE_INDEX

METHODS = ("look", "rollout", "grad_x_input", "attn_grad")
DEFAULT_RELEVANCE = "look"  # chosen by the pointing game (docs/evaluation.md)


def _batch(model, prompts: list[list[int]], answers: list[list[int]] | None):
    """Right-padded prompt (+ answer) rows: ids [B, T], the answer-start position of each row
    (its prompt's last token), the first image's token positions [B, P], and the answer tokens'
    flat positions and targets (teacher-forced)."""
    answers = answers or [[] for _ in prompts]
    cfg = model.config
    samples = [Sample(list(p) + list(a), [IGNORE_INDEX] * len(p) + list(a), [], {}) for p, a in zip(prompts, answers)]
    batch = collate(samples, cfg.pad_token_id, cfg.image_token_id)
    ids = batch["input_ids"]
    n = cfg.image_tokens
    first = (ids == cfg.image_token_id).long().argmax(1)
    slots = first[:, None] + torch.arange(n)
    start = torch.tensor([len(p) - 1 for p in prompts])
    return ids, start, slots, batch["target_pos"], batch["targets"]


def relevance_maps(model, prompts: list[list[int]], image_features: torch.Tensor, method: str = "look",
                   answers: list[list[int]] | None = None) -> torch.Tensor:
    """[B, image tokens], each row summing to 1: where the answer to each prompt came from in
    the prompt's (first) image. ``answers`` (token ids ending with the end-of-turn token; the
    gradient methods need them, the attention methods ignore them) are the answers being
    explained. ``image_features`` [n_images, tokens, width] in prompt order, one per prompt."""
    if method not in METHODS:
        raise ValueError(f"relevance method must be one of {', '.join(METHODS)}, got {method!r}")
    device = next(model.parameters()).device
    grads = method in ("grad_x_input", "attn_grad")
    if grads and not answers:
        raise ValueError(f"relevance method {method!r} needs the answers being explained")
    ids, start, slots, target_pos, targets = (x.to(device) for x in _batch(model, prompts, answers if grads else None))
    n_layers = len(model.llm.layers)
    # per call, never on the modules: concurrent explanations on one model stay apart
    probe = AttentionProbe(frozenset([n_layers - 1] if method == "look" else range(n_layers)))
    was_training = model.training
    if was_training:  # only a model in training is switched (and back): the API's and the demo's stay untouched
        model.eval()
    try:
        return _relevance(model, probe, method, grads, ids, start, slots, target_pos, targets, image_features)
    finally:
        if was_training:
            model.train()


def _relevance(model, probe, method, grads, ids, start, slots, target_pos, targets, image_features) -> torch.Tensor:
    b, t = ids.shape
    device = ids.device
    with torch.enable_grad() if grads else torch.no_grad():
        embeds = model.embed(ids, image_features)
        if grads:
            embeds = embeds.detach().requires_grad_(True)
        h = model.llm(embeds, probe=probe)
        weights = [probe.weights[i] for i in sorted(probe.weights)]
        if grads:  # gradients of the answers' log-likelihood, never accumulated into the weights
            logits = model.llm.lm_head(h.reshape(-1, h.shape[-1]).index_select(0, target_pos)).float()
            score = torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum()
            found = torch.autograd.grad(score, [embeds] + (weights if method == "attn_grad" else []))
            embeds_grad, weight_grads = found[0], found[1:]
        rows = torch.arange(b, device=device)
        if method == "look":
            rel = weights[-1][:, 0][rows, start]  # head 0, [B, T]
        elif method == "rollout":
            eye = torch.eye(t, device=device)
            v = torch.zeros(b, t, device=device)
            v[rows, start] = 1.0
            for w in reversed(weights):
                a = 0.5 * w.float().mean(1) + 0.5 * eye
                v = torch.bmm(v.unsqueeze(1), a / a.sum(-1, keepdim=True)).squeeze(1)
            rel = v
        elif method == "attn_grad":
            rel = sum((g * w).clamp(min=0).mean(1)[rows, start] for g, w in zip(weight_grads, weights))
        else:
            rel = (embeds_grad * embeds).sum(-1).abs()
        rel = rel.detach().float().gather(1, slots)
    return rel / rel.sum(-1, keepdim=True).clamp(min=1e-12)


def model_view(tower, image: Image.Image) -> Image.Image:
    """The image as the tower sees it (resized, cropped; normalisation undone): the frame the
    patch grid, and so a relevance map, refers to."""
    pixels = tower.preprocess([image])[0].float()
    mean = torch.tensor(tower.processor.image_mean).view(3, 1, 1)
    std = torch.tensor(tower.processor.image_std).view(3, 1, 1)
    rgb = ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb, "RGB")


def overlay(view: Image.Image, relevance, alpha: float = 0.6) -> Image.Image:
    """A relevance map ([grid * grid] patches, any scale) laid over ``view`` as a red heat map,
    scaled between the map's least and most relevant patch (what it looked at *most*): the top
    patch at ``alpha`` opacity, the least relevant clear."""
    rel = torch.as_tensor(relevance, dtype=torch.float32).flatten()
    grid = int(round(rel.numel() ** 0.5))
    if grid * grid != rel.numel():
        raise ValueError(f"a relevance map needs a square patch grid, got {rel.numel()} values")
    heat = ((rel - rel.min()) / (rel.max() - rel.min()).clamp(min=1e-12)).view(grid, grid).numpy()
    heat = Image.fromarray((heat * 255).astype(np.uint8), "L").resize(view.size, Image.BILINEAR)
    h = np.asarray(heat, dtype=np.float32)[..., None] / 255 * alpha
    base = np.asarray(view.convert("RGB"), dtype=np.float32)
    red = np.zeros_like(base)
    red[..., 0] = 255
    return Image.fromarray((base * (1 - h) + red * h).round().astype(np.uint8), "RGB")
