"""Text generation with a KV cache: greedy or temperature/top-p sampling, batched with
left padding (evaluation) or streamed token by token (single questions, the web demo)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.language_model import KVCache
from model.vlm import MedicalVLM


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    use_cache: bool = True
    seed: int | None = None


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def _attention_mask(key_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean [B, 1, q_len, K] mask: causal over the last q_len positions and blind to
    left padding. A padded query may still see itself, so its row is never fully masked
    (a fully masked softmax row gives NaN that would leak through the values)."""
    b, k_len = key_mask.shape
    q_pos = torch.arange(k_len - q_len, k_len, device=key_mask.device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=key_mask.device).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0) & key_mask.unsqueeze(1)
    allowed = allowed | (k_pos == q_pos).unsqueeze(0)
    return allowed.unsqueeze(1)


def _sample(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate_steps(model: MedicalVLM, prompts: list[list[int]], image_features: torch.Tensor | None,
                   cfg: GenerationConfig, eos_id: int, pad_id: int, check_every: int = 1,
                   trie=None, trie_state: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every prompt ([B], on the device) per step until all rows hit
    ``eos_id`` or ``max_new_tokens``. ``image_features``: raw vision features of every image
    of the batch in prompt order ([n_images, tokens, width]). Whether every row has finished
    is asked of the device (a sync) only every ``check_every`` steps: batched evaluation
    checks every 8 tokens and the decode steps in between never wait."""
    device = next(model.parameters()).device
    ids, key_mask = _left_pad(prompts, pad_id, device)
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    b, t = ids.shape
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    limit = model.config.max_position_embeddings
    if t + cfg.max_new_tokens > limit:
        raise ValueError(f"the prompt has {t} tokens and {cfg.max_new_tokens} new ones were asked for, more "
                         f"than the model's {limit} positions: shorten the question or lower max_new_tokens")
    embeds = model.embed(ids, image_features)
    if cfg.use_cache:
        # K/V are stored in the dtype attention computes in (bf16 under autocast), so no
        # decode step re-casts the whole cache
        kv_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else embeds.dtype
        cache = KVCache(model.config, b, t + cfg.max_new_tokens, device, kv_dtype)
        h = model.llm(embeds, positions, _attention_mask(key_mask, t), cache)
    else:
        h = model.llm(embeds, positions, _attention_mask(key_mask, t))
    for step in range(cfg.max_new_tokens):
        logits = model.llm.lm_head(h[:, -1])
        if trie is not None:  # answer-constrained decoding (model/constrain.py)
            logits = trie.mask(logits, trie_state)
        nxt = _sample(logits, cfg, gen)
        if trie is not None:
            trie_state = trie.advance(trie_state, nxt)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        yield nxt
        finished |= nxt == eos_id
        if step == cfg.max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
            return
        key_mask = torch.cat([key_mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        new_pos = positions[:, -1:] + 1
        positions = torch.cat([positions, new_pos], dim=1)
        new_embed = model.llm.embed_tokens(nxt.unsqueeze(1))
        if cfg.use_cache:
            h = model.llm(new_embed, new_pos, _attention_mask(key_mask, 1), cache)
        else:
            embeds = torch.cat([embeds, new_embed], dim=1)
            h = model.llm(embeds, positions, _attention_mask(key_mask, embeds.shape[1]))


def generate(model: MedicalVLM, prompts: list[list[int]], image_features: torch.Tensor | None,
             cfg: GenerationConfig, eos_id: int, pad_id: int, trie=None,
             answer_sets: list[str | None] | None = None) -> list[list[int]]:
    """Batched generation; returns each row's new tokens without the end token. With
    ``trie`` (model/constrain.py), row i spells an answer of set ``answer_sets[i]``."""
    state = None
    if trie is not None:
        device = next(model.parameters()).device
        trie.to(device)
        state = trie.start(answer_sets, device)
    steps = list(generate_steps(model, prompts, image_features, cfg, eos_id, pad_id, check_every=8,
                                trie=trie, trie_state=state))
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]  # one copy to the host
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


def stream_generate(model: MedicalVLM, prompt: list[int], image_features: torch.Tensor | None,
                    cfg: GenerationConfig, eos_id: int, pad_id: int) -> Iterator[int]:
    """One prompt, one token id at a time (the end token is not yielded)."""
    for nxt in generate_steps(model, [prompt], image_features, cfg, eos_id, pad_id):
        tok = int(nxt[0])
        if tok == eos_id:
            return
        yield tok
