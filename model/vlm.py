"""The vision-language model: frozen vision tower -> projector -> MiniMind language model."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VLMConfig
from model.language_model import KVCache, MiniMindLM
from model.tokenization import IGNORE_INDEX
from model.pretrained import save_pretrained
from model.vision import VisionTower

log = logging.getLogger(__name__)


class Projector(nn.Module):
    """Vision width -> LM width. ``mlp``: Linear-GELU-Linear (LLaVA-1.5); ``linear``: MiniMind2-V."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        if config.projector == "mlp":
            self.net = nn.Sequential(nn.Linear(config.vision_hidden_size, config.hidden_size), nn.GELU(),
                                     nn.Linear(config.hidden_size, config.hidden_size))
        else:
            self.net = nn.Linear(config.vision_hidden_size, config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` [n_images, tokens, vision width] -> [n_images, tokens, hidden]."""
        return self.net(features)


def merge_image_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor,
                         image_embeds: torch.Tensor | None, image_token_id: int,
                         image_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Replaces every image-token embedding with the projected patch features, in order.

    ``image_embeds``: [n_images, tokens_per_image, H] for all images of the batch in
    reading order (sample by sample, left to right), so multi-image samples just work.
    ``image_slots``: the flat positions (into B*T) of the image tokens, built by ``collate``
    on the host; with them the merge is an ``index_copy`` whose sizes are known without
    asking the device (no sync). Without them they are found here (one sync: generation's
    prefill, tests).
    """
    n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
    if image_slots is None:
        image_slots = (input_ids.reshape(-1) == image_token_id).nonzero().squeeze(1)
    n_slots = image_slots.shape[0]
    if n_slots != n_feats:
        per = image_embeds.shape[1] if image_embeds is not None and image_embeds.ndim == 3 else "?"
        raise ValueError(f"image token count mismatch: the text has {n_slots} image tokens but "
                         f"{0 if image_embeds is None else image_embeds.shape[0]} image(s) x {per} "
                         f"features = {n_feats}; each <image> must expand to exactly one image's tokens")
    if n_slots == 0:
        return inputs_embeds
    b, t, h = inputs_embeds.shape
    flat = inputs_embeds.reshape(b * t, h).index_copy(0, image_slots, image_embeds.reshape(-1, h)
                                                      .to(inputs_embeds.dtype))
    return flat.view(b, t, h)


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions (into B*T) whose next token is a target, and those targets. Host-side
    in ``collate`` for training; here as the fallback (a sync) for direct calls."""
    b, t = labels.shape
    nxt = torch.full_like(labels, IGNORE_INDEX)
    nxt[:, :-1] = labels[:, 1:]
    pos = (nxt.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return pos, nxt.reshape(-1)[pos]


@dataclass
class VLMOutput:
    """What ``MedicalVLM.forward`` returns when it is given targets. ``n_targets`` is a host int
    (known from the batch's shapes, no device sync); ``hits``, ``logits`` and ``hidden`` are only
    filled when asked for (validation's exact match; scoring and the look loss)."""
    loss_sum: torch.Tensor          # summed cross-entropy over the target tokens
    n_targets: int
    aux_loss: torch.Tensor          # the MoE balance loss (0 for a dense model)
    hits: torch.Tensor | None = None    # [n_targets] bool: the arg-max is the target
    logits: torch.Tensor | None = None  # [n_targets, vocab] at the target positions
    hidden: torch.Tensor | None = None  # [B, T, hidden] last hidden states


class MedicalVLM(nn.Module):
    def __init__(self, config: VLMConfig, vision_tower: VisionTower | None = None):
        super().__init__()
        if config.image_token_id < 0:
            raise ValueError("config.image_token_id is unset: build the config from the tokenizer "
                             "(model.checkpoint.build_config)")
        self.config = config
        self.llm = MiniMindLM(config)
        self.projector = Projector(config)
        self.vision_tower = vision_tower
        if vision_tower is not None:
            self.check_vision_tower(vision_tower)

    def check_vision_tower(self, tower: VisionTower):
        if tower.hidden_size != self.config.vision_hidden_size or tower.num_patches != self.config.image_tokens:
            raise ValueError(f"vision tower '{tower.name}' gives {tower.num_patches} tokens of width "
                             f"{tower.hidden_size}; the model expects {self.config.image_tokens} x "
                             f"{self.config.vision_hidden_size}")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.vision_tower is None:
            raise RuntimeError("this model was built without a vision tower; pass image_features")
        return self.vision_tower(pixel_values)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
              image_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the projected image features merged in."""
        embeds = self.llm.embed_tokens(input_ids)
        projected = None
        if image_features is not None and image_features.numel():
            projected = self.projector(image_features.to(self.projector_dtype()))
        elif self.training and torch.is_grad_enabled():
            # A batch without images still touches the projector (times zero), so DDP finds a
            # gradient for every parameter and never fails on an "unused" projector.
            zeros = embeds.new_zeros(1, 1, self.config.vision_hidden_size)
            embeds = embeds + 0.0 * self.projector(zeros).sum()
        return merge_image_features(embeds, input_ids, projected, self.config.image_token_id, image_slots)

    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                position_ids=None, attn_mask=None, cache: KVCache | None = None, logits_to_keep: int = 0,
                image_slots: torch.Tensor | None = None, target_pos: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, with_hits: bool = False, return_logits: bool = False):
        """With ``labels`` (or ``target_pos`` + ``targets`` from ``collate``): a ``VLMOutput``; logits
        are computed only at target positions, which are a few percent of the sequence in VQA.
        ``with_hits`` fills its ``hits`` (validation's exact match), ``return_logits`` its ``logits``
        and ``hidden``. Without targets: the logits of the last ``logits_to_keep`` positions
        (0 = all), as a tensor (generation)."""
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        look = self.llm.layers[-1].self_attn
        look.keep_qk = return_logits and self.training  # --look_loss reads head 0 of the last layer
        h = self.llm(self.embed(input_ids, image_features, image_slots), position_ids, attn_mask, cache)
        look.keep_qk = False
        if labels is None and target_pos is None:
            return self.llm.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        if target_pos is None:
            target_pos, targets = target_positions(labels)
        logits = self.llm.lm_head(h.reshape(-1, h.shape[-1]).index_select(0, target_pos))
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        return VLMOutput(loss_sum, target_pos.shape[0], self.llm.aux_loss(),
                         hits=(logits.argmax(-1) == targets) if with_hits else None,
                         logits=logits if return_logits else None, hidden=h if return_logits else None)

    def save_pretrained(self, folder, tokenizer, stage: str = "sft", step: int = 0, extra: dict | None = None,
                        metrics: dict | None = None, dtype: str = "float32", vision: dict | None = None):
        """A Hugging Face-style folder: config.json, model.safetensors, the tokenizer and a model
        card (see model/pretrained.py). The frozen vision tower is not saved, only its id and
        weight fingerprint. Loading one: ``model.checkpoint.from_pretrained`` (the loader owns
        loading, so this module never imports it back)."""
        return save_pretrained(folder, self, tokenizer, stage, step, extra, metrics, dtype, vision)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen vision tower (its weights come from its own source)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision_tower.")}

    def parameter_summary(self) -> dict[str, int]:
        def count(module, trainable_only=False):
            if module is None:
                return 0
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
        return {"llm": count(self.llm), "projector": count(self.projector),
                "vision_frozen": count(self.vision_tower),
                "trainable": count(self.llm, True) + count(self.projector, True)}

    def parameter_line(self) -> str:
        s = self.parameter_summary()
        tower = self.vision_tower.name if self.vision_tower is not None else self.config.vision_model
        return (f"parameters: language model {s['llm'] / 1e6:.2f}M | projector {s['projector'] / 1e6:.2f}M | "
                f"vision tower {s['vision_frozen'] / 1e6:.2f}M frozen ({tower}) | "
                f"trainable {s['trainable'] / 1e6:.2f}M")
