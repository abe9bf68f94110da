"""MiniMind2-family decoder language model.

Pre-norm decoder blocks: RMSNorm, rotary position embeddings, grouped-query attention
through ``scaled_dot_product_attention``, SwiGLU (or a MiniMind-style mixture of
experts) feed-forward, tied input/output embeddings. Sizes match the published
MiniMind2 models (512 x 8 layers ~ 26M parameters, 768 x 16 layers ~ 104M).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 sums of squares lose too much precision. F.rms_norm is one
        # fused kernel forward and one backward on CUDA (PyTorch >= 2.9; ten ops written out).
        # Return in the dtype the next matmuls run in: under autocast every projection would
        # otherwise cast the same float32 activation again (q, k, v: three casts each way).
        y = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        return y.to(matmul_dtype(x))


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's when it is on (bf16/fp16), else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin: [B, 1, T, D] (already gathered at the positions)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Pre-allocated key/value cache: decoding writes in place instead of re-concatenating."""

    def __init__(self, config: VLMConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > {self.max_len} allocated")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class FusedLinear(nn.Linear):
    """Several bias-free projections of the same input as one matrix product (one kernel
    forward, two backward, instead of three or two each): q/k/v in attention, gate/up in the
    feed-forward. Checkpoints keep MiniMind's split names (``q_proj.weight``, ...): the state
    dict is split on the way out and fused on the way in, so every file, ``--from_llm`` and
    ``from_pretrained`` see the usual layout."""

    def __init__(self, in_features: int, parts: dict[str, int]):
        super().__init__(in_features, sum(parts.values()), bias=False)
        self.parts = parts


def _split_fused(module: nn.Module, state: dict, prefix: str, local_metadata=None):
    """state_dict post-hook: ``<fused>.weight`` -> one ``<part>.weight`` per part (copies:
    safetensors refuses tensors that share memory)."""
    for name, child in module.named_children():
        if isinstance(child, FusedLinear):
            weight = state.pop(f"{prefix}{name}.weight")
            for part, rows in zip(child.parts, weight.split(list(child.parts.values()))):
                state[f"{prefix}{part}.weight"] = rows.clone()


def _fuse_split(module: nn.Module, state: dict, prefix: str, *args):
    """load_state_dict pre-hook: the split parts -> the fused weight (left alone when any part
    is missing, so the strict loaders report the split names a user knows)."""
    for name, child in module.named_children():
        if isinstance(child, FusedLinear):
            keys = [f"{prefix}{part}.weight" for part in child.parts]
            if all(k in state for k in keys):
                state[f"{prefix}{name}.weight"] = torch.cat([state.pop(k) for k in keys])


def fused_state_dict_hooks(module: nn.Module):
    module.register_state_dict_post_hook(_split_fused)
    module.register_load_state_dict_pre_hook(_fuse_split)


@dataclass
class AttentionProbe:
    """Per-call request for explicit attention (evaluation.relevance): the layers listed in
    ``layers`` compute softmax(q k^T) v written out and leave their weights [B, heads, T, T] in
    ``weights`` (gradients flow through them). It lives in the call, not on the module, so
    concurrent explanations on one model never see each other's weights."""
    layers: frozenset
    weights: dict = field(default_factory=dict)


class Attention(nn.Module):
    def __init__(self, config: VLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = FusedLinear(config.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv})
        fused_state_dict_hooks(self)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout
        # --look_loss (training only): the rotated queries/keys of head 0 are kept for one forward
        self.keep_qk = False
        self.kept_qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None, probe: AttentionProbe | None = None):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(list(self.qkv_proj.parts.values()), dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.keep_qk:
            self.kept_qk = (q[:, 0], k[:, 0])
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # No mask: training on right-padded rows, where the fused causal kernel (flash) is
        # exact. ``cache is None`` rather than ``t > 1`` keeps this a Python bool when the
        # length is symbolic under torch.compile (a symbolic bool breaks the graph).
        is_causal = attn_mask is None and cache is None
        if probe is not None and self.layer_idx in probe.layers:  # evaluation.relevance only (SDPA keeps no weights)
            out, probe.weights[self.layer_idx] = self._explicit(q, k, v, attn_mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        gqa = self.n_kv != self.n_heads
        if attn_mask is not None and gqa:
            # With a mask flash is out, and the memory-efficient kernel refuses enable_gqa
            # (torch < 2.12): give it K/V for every head instead of the slow math kernel.
            k, v = self._all_heads(k), self._all_heads(v)
            gqa = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _explicit(self, q, k, v, attn_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax(q k^T / sqrt(d) + mask) v, the weights), written out (evaluation.relevance): the
        same result as SDPA, with the weights returned (gradients flow through them)."""
        k, v = self._all_heads(k), self._all_heads(v)
        t, s = q.shape[2], k.shape[2]
        if attn_mask is None:  # causal, the last t of s positions querying
            attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = (q @ k.transpose(-1, -2)).float() / self.head_dim ** 0.5
        weights = torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1)
        return weights.to(v.dtype) @ v, weights

    def _all_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, kv_heads, T, D] -> [B, heads, T, D], each K/V head shared by its query group."""
        b, n_kv, t, d = x.shape
        return x[:, :, None].expand(b, n_kv, self.n_heads // n_kv, t, d).reshape(b, self.n_heads, t, d)


class FeedForward(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.gate_up_proj = FusedLinear(config.hidden_size, {"gate_proj": config.intermediate_size,
                                                             "up_proj": config.intermediate_size})
        fused_state_dict_hooks(self)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """MiniMind's MoE: routed experts chosen top-k per token plus always-on shared experts,
    with MiniMind's load-balancing auxiliary loss (``seq_aux``): per sequence,
    sum_i (E * f_i) * P_i, where f_i is the share of the sequence's top-k choices that went
    to expert i and P_i its mean routing probability; averaged over sequences, times alpha.

    Every routed expert runs on every token and is weighted by its routing weight (zero
    when not chosen): with 4 experts and top-2 that is 2x the routed FLOPs, but it needs no
    per-expert token lists, whose sizes the host would have to wait for on every layer."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.gate = nn.Linear(config.hidden_size, self.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores = F.softmax(self.gate(flat).float(), dim=-1)
        top_w, top_i = scores.topk(self.top_k, dim=-1)
        if self.top_k > 1:  # MiniMind renormalises the chosen weights only when it picks several
            top_w = top_w / top_w.sum(-1, keepdim=True)
        # [tokens, experts]: the normalised weight of each chosen expert, 0 elsewhere
        weights = torch.zeros_like(scores).scatter(-1, top_i, top_w).to(flat.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + expert(flat) * weights[:, e:e + 1]
        if self.training and self.alpha > 0:
            b, t = shape[0], flat.shape[0] // shape[0]
            picks = top_i.view(b, t * self.top_k)
            # scatter_add, not one_hot: one_hot checks its indices on the host (a sync)
            share = torch.zeros(b, self.n_experts, device=x.device).scatter_add_(
                1, picks, torch.ones(picks.shape, device=x.device)) / (t * self.top_k / self.n_experts)
            self.aux_loss = self.alpha * (share * scores.view(b, t, -1).mean(1)).sum(1).mean()
        else:
            self.aux_loss = flat.new_zeros(())
        out = out.view(shape)
        for shared in self.shared_experts:
            out = out + shared(x)
        return out


class Block(nn.Module):
    def __init__(self, config: VLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, probe: AttentionProbe | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, probe)
        return x + self.mlp(self.post_attention_layernorm(x))


class MiniMindLM(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as in MiniMind
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                probe: AttentionProbe | None = None) -> torch.Tensor:
        """Returns the final normed hidden states [B, T, H]; callers apply ``lm_head`` only
        where logits are needed (training needs them at answer tokens alone). ``probe``: explicit
        attention weights for evaluation.relevance, kept in the probe."""
        b, t, _ = inputs_embeds.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + t, device=inputs_embeds.device).expand(b, t)
        # in the dtype q and k come out of their projections: the rotation then needs no
        # float32 intermediate and no cast back (forward and backward), as in HF's Llama
        dtype = matmul_dtype(inputs_embeds)
        cos = self.rope_cos[position_ids].unsqueeze(1).to(dtype)
        sin = self.rope_sin[position_ids].unsqueeze(1).to(dtype)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache, probe) if probe is not None else layer(h, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.length += t
        return self.norm(h)

    def aux_loss(self) -> torch.Tensor:
        losses = [layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoEFeedForward)]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.lm_head.weight.device)
