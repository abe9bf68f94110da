"""Frozen CLIP vision tower (ViT-B/16) and its deterministic random stand-ins.

``load_vision_tower(name)`` accepts
  * a local HF directory (default ``model/vision_model/clip-vit-base-patch16``),
  * a hub id such as ``openai/clip-vit-base-patch16`` (needs network),
  * ``random``: the ViT-B/16 shape with seeded random weights (offline smoke tests),
  * ``random-tiny``: same 224 px / 16 px patches -> 196 tokens, narrow and shallow, for CPU.
The random towers are built from a fixed seed per parameter name, independent of
transformers' own initialisers, so every stage and every run sees identical features.
"""
from __future__ import annotations

import hashlib
import logging
import zlib
from pathlib import Path

import torch
import transformers
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from model.config import DEFAULT_VISION_MODEL, resolve_path
from infra.errors import UserError

log = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RANDOM_SEED = 20240101
RANDOM_TOWERS = {
    "random": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "random-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
}
CLONE_HINT = ("git clone https://huggingface.co/openai/clip-vit-base-patch16 "
              "model/vision_model/clip-vit-base-patch16")

# transformers 5 defaults CLIPImageProcessor to a torchvision backend; the PIL one gives
# the same preprocessing without pulling torchvision (a multi-GB CUDA build here).
_ImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class VisionTowerNotFound(UserError, FileNotFoundError):
    pass


class VisionTower(nn.Module):
    """Wraps a CLIPVisionModel; returns patch tokens (CLS dropped), never trained."""

    def __init__(self, name: str, model: CLIPVisionModel, processor, is_random: bool):
        super().__init__()
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.is_random = is_random
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self._fingerprint: str | None = None

    def train(self, mode: bool = True):
        # Frozen: dropout and the like stay off whatever the parent module does.
        return super().train(False)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return preprocess(self.processor, images)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last layer (CLS dropped)."""
        param = next(self.model.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 1:, :]

    def fingerprint(self) -> str:
        """Hash of the weights: stored in checkpoints and feature-cache names so features
        from one tower are never silently mixed with a model trained on another."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.name.encode() if self.is_random else b"")
            for key, tensor in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def preprocess(processor, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> the tower's pixel tensor (resize, crop, normalise)."""
    rgb = [im.convert("RGB") for im in images]
    return processor(images=rgb, return_tensors="pt")["pixel_values"]


def _grid_position_embedding(grid: int, dim: int, rms: float) -> torch.Tensor:
    """2-D sine/cosine position embeddings (row in one half of the channels, column in the
    other; CLS at position 0 gets zeros), scaled to root-mean-square ``rms``. Trained CLIP
    towers learn smooth embeddings of this kind, where "left half" or "top row" is a linear
    function of a patch's features; random vectors per patch would hide it from a linear
    projector, which makes the random stand-in harder to learn from than a real tower."""
    quarter = dim // 4
    freqs = 1.0 / (grid ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * freqs[None] * torch.pi / 2

    def axis(p):  # (grid, 2 * quarter)
        return torch.cat([p.sin(), p.cos()], dim=1)

    rows = axis(pos)[:, None, :].expand(grid, grid, -1)
    cols = axis(pos)[None, :, :].expand(grid, grid, -1)
    emb = torch.zeros(grid * grid + 1, dim, dtype=torch.float64)
    emb[1:, :4 * quarter] = torch.cat([rows, cols], dim=2).reshape(grid * grid, -1)
    emb[1:] -= emb[1:].mean(0)
    emb *= rms / emb[1:].pow(2).mean().sqrt()
    return emb.float()


def _random_tower(name: str) -> VisionTower:
    cfg = CLIPVisionConfig(image_size=224, patch_size=16, **RANDOM_TOWERS[name])
    model = CLIPVisionModel(cfg)
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            # transformers 4 prefixes "vision_model."; seed by the bare name so versions agree
            bare = key.removeprefix("vision_model.")
            gen = torch.Generator().manual_seed(RANDOM_SEED ^ zlib.crc32(bare.encode()))
            if "norm" in key:
                param.fill_(1.0 if key.endswith("weight") else 0.0)
            elif key.endswith("bias"):
                param.zero_()
            elif "position_embedding" in key:
                param.copy_(_grid_position_embedding(cfg.image_size // cfg.patch_size, cfg.hidden_size, 0.3))
            else:
                # Position/class embeddings comparable to the patch term: the pre-LayerNorm would
                # otherwise reduce a flat patch to the sign of its brightness.
                std = 0.3 if "position_embedding" in key or "class_embedding" in key else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    processor = _ImageProcessor(
        do_resize=True, size={"shortest_edge": 224}, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    log.warning("\n" + "!" * 78 + f"\n!! Vision tower '{name}' has RANDOM weights: image features carry no "
                "learned\n!! semantics. Fine for tests and the offline demo; use CLIP ViT-B/16 for real "
                "training.\n" + "!" * 78)
    return VisionTower(name, model, processor, is_random=True)


def load_vision_tower(name: str = DEFAULT_VISION_MODEL) -> VisionTower:
    if name in RANDOM_TOWERS:
        return _random_tower(name)
    path = resolve_path(name)
    if path.is_dir():
        source = str(path)
    elif name == DEFAULT_VISION_MODEL or Path(name).is_absolute() or name.startswith((".", "model/")):
        raise VisionTowerNotFound(
            f"Vision tower not found at {path}.\nDownload CLIP ViT-B/16 once (about 600 MB):\n  {CLONE_HINT}\n"
            "or pass --vision_model openai/clip-vit-base-patch16 to fetch it from the hub, or "
            "--vision_model random for an offline smoke test (random features: nothing real is learned).")
    else:
        source = name  # a hub id
    try:
        model = CLIPVisionModel.from_pretrained(source)
        processor = _ImageProcessor.from_pretrained(source)
    except OSError as exc:
        raise VisionTowerNotFound(
            f"Could not load the vision tower '{name}' ({exc.__class__.__name__}: {exc}).\n"
            f"Without network access, download it where you have one:\n  {CLONE_HINT}\n"
            "or use --vision_model random for an offline smoke test.") from exc
    tower = VisionTower(name, model, processor, is_random=False)
    log.info("vision tower %s: %d patch tokens of width %d", name, tower.num_patches, tower.hidden_size)
    return tower
