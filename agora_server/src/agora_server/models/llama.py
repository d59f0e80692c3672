"""Llama-style decoder blocks: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Parameter names follow Llama's (q_proj, o_proj, down_proj, ...) so that checkpoints and
equivalence checks map one to one. Every layer is initialised from its own generator,
seeded by (run seed, layer index), and so are the token embedding and the LM head: a stage built
alone gets exactly the weights the same modules have in the unsplit model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from agora_server.models.config import ModelConfig

# on CUDA only fused kernels may run: SDPA's math fallback builds a T x T matrix per head, 1.3 GB per
# layer at 4096 tokens and 40 heads, and would run a 24 GB GPU out of memory instead of failing clearly
_FUSED_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 so bf16 activations do not lose the small variances
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # Llama's rotate-half layout
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(causal_attention(q, k, v).transpose(1, 2).reshape(batch, seq, -1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention [B, heads, T, head_dim] through a kernel that never builds the
    T x T score matrix: it keeps the output and one log-sum-exp per row for the backward."""
    groups = q.shape[1] // k.shape[1]
    if q.device.type == "cpu":  # the CPU flash kernel takes grouped K/V as they are
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    if groups > 1:
        # the memory-efficient kernel needs one K/V head per query head (flash's own grouped path
        # depends on the build and GPU); the copies cost 2 x T x hidden per layer, counted by the plan
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.device.type == "meta":
        # the memory planner runs stages on the meta device, where SDPA would take the math path and
        # count a T x T matrix; the flash kernel's meta function has the fused kernels' shapes
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)[0]
    with sdpa_kernel(_FUSED_KERNELS):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual branches end in a plain projection (o_proj, down_proj),
    which is what the subspace boundary codec relies on."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


_EMBED_SALT, _LM_HEAD_SALT = 1_000_000, 1_000_001


def seeded_generator(seed: int, *salt: int) -> torch.Generator:
    """A generator whose stream depends only on the run seed and where a module sits in the model."""
    value = seed
    for part in salt:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def init_decoder_layer(layer: DecoderLayer, config: ModelConfig, seed: int, layer_index: int) -> None:
    gen = seeded_generator(seed, layer_index)
    # scale the residual-branch outputs down with depth so the stream's variance stays bounded (GPT-2)
    out_std = config.init_std / math.sqrt(2 * config.num_layers)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, out_std, generator=gen)
            else:
                param.normal_(0.0, config.init_std, generator=gen)


def seeded_embedding(config: ModelConfig, seed: int) -> nn.Embedding:
    embedding = nn.Embedding(config.vocab_size, config.hidden_size)
    with torch.no_grad():
        embedding.weight.normal_(0.0, config.init_std, generator=seeded_generator(seed, _EMBED_SALT))
    return embedding


def seeded_lm_head(config: ModelConfig, seed: int) -> nn.Linear:
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    with torch.no_grad():
        lm_head.weight.normal_(0.0, config.init_std, generator=seeded_generator(seed, _LM_HEAD_SALT))
    return lm_head
