"""Python API for notebooks: load a model once, ask about images.

    from evaluation.api import MedicalVQA
    vqa = MedicalVQA.load("out/medical_vlm_768.pth")          # or a model folder / hub id
    vqa.answer("scan.dcm", "Which organ is abnormal?")
    vqa.answer_many([("a.png", "Is this normal?"), ("b.jpg", "What modality is this?")])

Same precision and decoding as ``eval_vlm.py``: features computed and rounded as in the
cache, the device's generation dtype, greedy decoding, batched with left padding.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dataset.features import run_tower
from dataset.images import load_image
from evaluation.runner import generation_autocast
from model.checkpoint import LoadedCheckpoint, load_model
from model.config import IMAGE_PLACEHOLDER
from model.generation import GenerationConfig, generate
from model.runtime import pick_device
from model.tokenization import ChatEncoder, clean_question


class MedicalVQA:
    def __init__(self, checkpoint: LoadedCheckpoint, max_new_tokens: int = 32):
        self.ckpt = checkpoint
        self.model, self.tokenizer = checkpoint.model, checkpoint.tokenizer
        self.device = next(self.model.parameters()).device
        self.encoder = ChatEncoder(self.tokenizer, self.model.config.image_tokens)
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(cls, source: str | Path = "out/medical_vlm_768.pth", device: str = "auto",
             vision_model: str | None = None, max_new_tokens: int = 32) -> "MedicalVQA":
        """``source``: a .pth checkpoint, a model folder (scripts/export_hf.py) or a hub id."""
        return cls(load_model(source, pick_device(device), vision_model=vision_model), max_new_tokens)

    def answer(self, image: str | Path | Image.Image, question: str) -> str:
        """The answer to one question about one image (a path to PNG/JPEG/DICOM, or a PIL image)."""
        return self.answer_many([(image, question)])[0]

    @torch.no_grad()
    def answer_many(self, items: list[tuple[str | Path | Image.Image, str]], batch_size: int = 64) -> list[str]:
        """Answers for (image, question) pairs, generated in batches."""
        answers: list[str] = []
        tower = self.model.vision_tower
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = [im if isinstance(im, Image.Image) else load_image(im) for im, _ in chunk]
            prompts = [self.encoder.encode([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{clean_question(q)}"}],
                                           add_generation_prompt=True).input_ids for _, q in chunk]
            feats = run_tower(tower, tower.preprocess(images), self.device)
            with generation_autocast(self.device):
                outs = generate(self.model, prompts, feats, GenerationConfig(max_new_tokens=self.max_new_tokens),
                                self.model.config.eos_token_id, self.model.config.pad_token_id)
            answers += [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outs]
        return answers
