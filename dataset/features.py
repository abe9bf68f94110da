"""Frozen vision features, computed once per image and reused across epochs and stages.

The cache file is named by the vision tower's weight fingerprint and indexed by each
image's content hash: another tower means another file, a changed image means a new
row. When the features would exceed a memory budget the store falls back to computing
them per batch. Both paths round features to the same dtype, so they agree.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from dataset.contract import DataError
from dataset.images import load_image
from infra.atomic import remove_stale_temps
from model.checkpoint import atomic_save, safe_load
from model.vision import VisionTower, preprocess
from infra.runtime import progress as show_progress

log = logging.getLogger(__name__)

FEATURE_DTYPE = torch.float16


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Images(torch.utils.data.Dataset):
    """Decoding and preprocessing for DataLoader workers: holds the image processor only,
    never the tower (whose weights may live on the GPU)."""

    def __init__(self, paths: list[Path], processor):
        self.paths, self.processor = paths, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return preprocess(self.processor, [load_image(self.paths[i])])[0]


def run_tower(tower: VisionTower, pixels: torch.Tensor, device) -> torch.Tensor:
    """Tower features in the cache's dtype, always computed outside any autocast so the
    cached path, the per-batch path and single questions give the same numbers."""
    with torch.autocast(torch.device(device).type, enabled=False):
        return tower(pixels.to(device)).to(FEATURE_DTYPE)


def compute_features(tower: VisionTower, paths: list[Path], device, batch_size: int = 32,
                     num_workers: int = 0, progress: bool = True) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(_Images(paths, tower.processor), batch_size=batch_size,
                                         num_workers=num_workers)
    out = []
    for pixels in show_progress(loader, desc="vision features", unit="batch", enabled=progress):
        out.append(run_tower(tower, pixels, device))
    return torch.cat(out) if out else torch.zeros(0, tower.num_patches, tower.hidden_size, dtype=FEATURE_DTYPE)


class FeatureStore:
    def __init__(self, tower: VisionTower, image_paths: list[Path], device, cache_dir: str | Path | None,
                 budget_gb: float = 4.0, num_workers: int = 0, build: bool = True, progress: bool = True):
        """``build=False``: only load an existing cache file (non-zero ranks under DDP, after
        rank 0 built it)."""
        self.tower, self.paths, self.device = tower, list(image_paths), device
        self.num_workers, self.progress = num_workers, progress
        need = len(self.paths) * tower.num_patches * tower.hidden_size * FEATURE_DTYPE.itemsize
        self.cached = need <= budget_gb * 1024**3
        self.features: torch.Tensor | None = None
        self.cache_file = None
        if not self.cached:
            log.warning("vision features would need %.1f GB > --feature_cache_gb %.1f: computing them per "
                        "batch instead (slower)", need / 1024**3, budget_gb)
            return
        self.cache_file = Path(cache_dir) / f"vision_{tower.fingerprint()}.pt" if cache_dir else None
        if self.cache_file is not None and build:
            remove_stale_temps(self.cache_file)  # left by a build that was killed
        self._load_or_build(build)

    def _load_or_build(self, build: bool):
        hashes = [file_hash(p) for p in self.paths]
        rows: dict[str, torch.Tensor] = {}
        stored_keys, stored = [], None
        if self.cache_file is not None and self.cache_file.is_file():
            obj = safe_load(self.cache_file, "feature cache")
            if obj.get("fingerprint") == self.tower.fingerprint():
                stored_keys, stored = obj["keys"], obj["features"]
                if not torch.is_tensor(stored) or not bool(stored.isfinite().all()):  # once, at load
                    raise DataError(f"feature cache {self.cache_file} holds NaN/Inf values (damaged): delete it and "
                                    "run again to rebuild it")
                rows = {k: stored[i] for i, k in enumerate(stored_keys)}
        missing = [i for i, h in enumerate(hashes) if h not in rows]
        if missing and not build:
            raise RuntimeError(f"feature cache {self.cache_file} lacks {len(missing)} image(s) after rank 0 "
                               "built it; is --cache_dir on a shared filesystem?")
        if missing:
            log.info("computing vision features for %d of %d image(s) with %s", len(missing), len(self.paths),
                     self.tower.name)
            new = compute_features(self.tower, [self.paths[i] for i in missing], self.device,
                                   num_workers=self.num_workers, progress=self.progress).cpu()
            for j, i in enumerate(missing):
                rows[hashes[i]] = new[j]
            if self.cache_file is not None:
                keys = list(dict.fromkeys([*stored_keys, *(hashes[i] for i in missing)]))
                atomic_save({"fingerprint": self.tower.fingerprint(), "tower": self.tower.name, "keys": keys,
                             "features": torch.stack([rows[k] for k in keys])}, self.cache_file)
        else:
            log.info("vision features: all %d image(s) found in %s", len(self.paths), self.cache_file)
        # text-only data (allowed by the contract) has no images: an empty table, not None
        self.features = torch.stack([rows[h] for h in hashes]).to(self.device) if hashes else self._empty()

    def _empty(self) -> torch.Tensor:
        return torch.zeros(0, self.tower.num_patches, self.tower.hidden_size,
                           dtype=FEATURE_DTYPE, device=self.device)

    def get(self, index: torch.Tensor) -> torch.Tensor:
        """Features [len(index), tokens, width] for image-table rows ``index``."""
        if self.cached:
            if torch.device(self.device).type == "cuda":
                index = index.pin_memory()  # asynchronous copy
            return self.features.index_select(0, index.to(self.device, non_blocking=True))
        if index.numel() == 0:
            return self._empty()
        pixels = self.tower.preprocess([load_image(self.paths[i]) for i in index.tolist()])
        return run_tower(self.tower, pixels, self.device)
