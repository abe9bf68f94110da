"""Single-question inference: the prompt of a chat turn, the image features, the answer as a
stream, and the one generation precision. Used by eval_vlm.py --image, the web demo, the Python
API and the batch evaluator (which shares the precision), so one question is answered the same
way everywhere.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from dataset.features import run_tower
from infra.runtime import autocast, compute_dtype
from model.checkpoint import LoadedCheckpoint
from model.config import IMAGE_PLACEHOLDER
from model.generation import GenerationConfig, stream_generate
from model.tokenization import ChatEncoder, clean_question


def generation_autocast(device) -> torch.autocast:
    """One precision for every generation path (batched evaluation, single questions, the
    web demo): the training policy's compute dtype for this device."""
    device = torch.device(device)
    return autocast(device, compute_dtype("auto", device))


def chat_prompt(ckpt: LoadedCheckpoint, images: list, history: list[dict], question: str) -> list[int]:
    """The token ids a chat turn generates from: earlier turns, then ``question`` (with the
    image placeholder(s) when it opens the conversation)."""
    question = clean_question(question)
    msgs = list(history)
    if not msgs:
        question = IMAGE_PLACEHOLDER * len(images) + "\n" + question if images else question
    msgs.append({"role": "user", "content": question})
    return ChatEncoder(ckpt.tokenizer, ckpt.model.config.image_tokens).encode(msgs, add_generation_prompt=True).input_ids


def image_features(ckpt: LoadedCheckpoint, images: list) -> torch.Tensor | None:
    """The tower's features of ``images`` (PIL), computed and rounded like the cached features
    the model was trained on; None without images."""
    model = ckpt.model
    if not images:
        return None
    return run_tower(model.vision_tower, model.vision_tower.preprocess(images), next(model.parameters()).device)


def answer_stream(ckpt: LoadedCheckpoint, images: list, history: list[dict], question: str,
                  gen_cfg: GenerationConfig, features: torch.Tensor | None = None) -> Iterator[str]:
    """Streams the answer text (growing string) to ``question`` about ``images`` (PIL), with
    earlier turns in ``history`` ([{"role", "content"}], the first user turn holding the
    image placeholder(s)). ``features``: the images' ``image_features`` when the caller already
    has them. Used by eval_vlm.py's single-question mode and the web demo."""
    model, tok = ckpt.model, ckpt.tokenizer
    prompt = chat_prompt(ckpt, images, history, question)
    device = next(model.parameters()).device
    feats = features if features is not None else image_features(ckpt, images)
    ids: list[int] = []
    shown = text = ""
    with generation_autocast(device):  # the same precision as batched evaluation
        for tok_id in stream_generate(model, prompt, feats, gen_cfg, model.config.eos_token_id,
                                      model.config.pad_token_id):
            ids.append(tok_id)
            text = tok.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
                shown = text
                yield text
    if text != shown:  # the answer ended inside a character: show what there is
        yield text
