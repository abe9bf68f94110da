"""Start the language model from MiniMind2 LLM weights (``llm_512.pth`` / ``llm_768.pth``).

Two published namings are understood:
* the original one (``tok_embeddings``, ``layers.N.attention.wq``, ``feed_forward.w1``,
  ``attention_norm``, ``ffn_norm``, ``output``), whose rotary embedding rotates
  interleaved pairs: q/k rows are permuted here to our half-split rotation, which gives
  identical attention scores;
* the newer transformers-style one (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``,
  ``mlp.gate_proj``, ``lm_head``), which already uses the half-split rotation.
"""
from __future__ import annotations

import logging
import re

import torch

from model.checkpoint import CheckpointError, ensure_finite, safe_load
from model.vlm import MedicalVLM

log = logging.getLogger(__name__)

_OLD = [
    (r"^tok_embeddings\.weight$", "embed_tokens.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^norm\.weight$", "norm.weight"),
    (r"^layers\.(\d+)\.attention\.wq\.weight$", r"layers.\1.self_attn.q_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wk\.weight$", r"layers.\1.self_attn.k_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wv\.weight$", r"layers.\1.self_attn.v_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"layers.\1.self_attn.o_proj.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.feed_forward\.gate\.weight$", r"layers.\1.mlp.gate.weight"),
    (r"^layers\.(\d+)\.feed_forward\.(experts\.\d+\.|shared_experts\.(?:\d+\.)?)?w1\.weight$",
     r"layers.\1.mlp.\2gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.(experts\.\d+\.|shared_experts\.(?:\d+\.)?)?w2\.weight$",
     r"layers.\1.mlp.\2down_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.(experts\.\d+\.|shared_experts\.(?:\d+\.)?)?w3\.weight$",
     r"layers.\1.mlp.\2up_proj.weight"),
]
_NEW = [
    (r"^model\.embed_tokens\.weight$", "embed_tokens.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.layers\.(.+)$", r"layers.\1"),
]


def _rename(key: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders each head's output rows (0,1,2,3,...) -> (0,2,4,...,1,3,5,...) so that a
    half-split rotation acts on the same pairs an interleaved rotation did."""
    out_dim, in_dim = weight.shape
    hd = out_dim // n_heads
    w = weight.view(n_heads, hd // 2, 2, in_dim)
    return w.transpose(1, 2).reshape(out_dim, in_dim)


def convert_minimind_state_dict(sd: dict, n_heads: int, n_kv_heads: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Returns the weights under this model's names and whether the original naming was used."""
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    old = any(k.startswith("tok_embeddings") or ".attention.wq." in k for k in sd)
    new = any(k.startswith("model.embed_tokens") for k in sd)
    if not (old or new):
        raise CheckpointError("no MiniMind language-model weights found (expected 'tok_embeddings.weight' or "
                              "'model.embed_tokens.weight')")
    rules = _OLD if old else _NEW
    out, ignored = {}, []
    for key, value in sd.items():
        name = _rename(key, rules)
        if name is None:
            ignored.append(key)
            continue
        # MiniMind's 2025-02 MoE keeps its one shared expert as a single module
        # (feed_forward.shared_experts.w1); here shared experts are a list
        name = re.sub(r"\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.", r".mlp.shared_experts.0.\1.", name)
        if old and name.endswith("self_attn.q_proj.weight"):
            value = interleaved_to_half(value, n_heads)
        elif old and name.endswith("self_attn.k_proj.weight"):
            value = interleaved_to_half(value, n_kv_heads)
        out[name] = value
    if ignored:
        log.info("--from_llm: ignored %d tensor(s) not part of the language model (e.g. %s)",
                 len(ignored), ignored[0])
    return out, old


def load_minimind_llm(model: MedicalVLM, path: str) -> None:
    """Loads MiniMind LLM weights into ``model.llm``. Extra tokens the tokenizer gained (the
    image token) start at the mean embedding; any other mismatch is an error."""
    sd = safe_load(path, "MiniMind weights", "download llm_512.pth / llm_768.pth from the MiniMind release")
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    try:
        ensure_finite(sd, str(path))
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: the download is damaged; fetch it again") from None
    cfg = model.config
    weights, original_naming = convert_minimind_state_dict(sd, cfg.num_attention_heads, cfg.num_key_value_heads)
    emb = weights.get("embed_tokens.weight")
    if emb is None:
        raise CheckpointError(f"{path}: no token embedding found")
    vocab, hidden = emb.shape
    n_layers = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"layers\.(\d+)\.", k)))
    if hidden != cfg.hidden_size or n_layers != cfg.num_hidden_layers:
        raise CheckpointError(f"{path} holds a {hidden}-wide, {n_layers}-layer model; pass --hidden_size {hidden} "
                              f"--num_hidden_layers {n_layers} (this run is {cfg.hidden_size} x "
                              f"{cfg.num_hidden_layers})")
    if vocab > cfg.vocab_size or cfg.vocab_size - vocab > 8:
        raise CheckpointError(f"{path} has a {vocab}-token vocabulary but the tokenizer has {cfg.vocab_size}: "
                              "pass --tokenizer_path to the tokenizer these weights were trained with "
                              "(MiniMind's model/ folder)")
    if vocab < cfg.vocab_size:
        extra = cfg.vocab_size - vocab
        emb = torch.cat([emb, emb.float().mean(0, keepdim=True).to(emb.dtype).expand(extra, -1)])
        log.info("--from_llm: %d new token(s) (image token) start at the mean embedding", extra)
    weights["embed_tokens.weight"] = emb
    weights.pop("lm_head.weight", None)  # tied to the embedding
    target = model.llm.state_dict()
    bad = [k for k, v in weights.items() if k in target and target[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[:3]} (e.g. {weights[bad[0]].shape} vs "
                              f"{target[bad[0]].shape}); check --use_moe and the head counts")
    missing, unexpected = model.llm.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}); check --use_moe")
    log.info("language model initialised from %s (%s naming)", path,
             "original MiniMind" if original_naming else "transformers-style")
