"""Subspace boundary compression (Protocol Models, Ramasinghe et al. 2025).

Every stage derives the same two frozen constants from the run seed: an orthonormal basis
U (d × k) and a fixed token embedding E_f (V × d). The head's learned embedding and every
residual-branch output projection of the head and body stages write only into span(U):

    embedding        h₀ = E_f[t] + U · emb[t]            emb ∈ R^{V×k}
    o_proj, down     y  = U · (Z x + b)                  Z ∈ R^{k×in}

so the residual stream is always h = E_f[t] + U c, and a stage boundary needs only c (k numbers)
and the token id: encode c = Uᵀ(h − E_f[t]), decode h = U c + E_f[t]. Both are exact, and the
gradient that crosses the wire backwards is ∂L/∂c = Uᵀ ∂L/∂h. The tail's layers never feed a
boundary and stay full rank. Neither constant is trained, sent or checkpointed.
"""

from __future__ import annotations

import torch
from torch import nn

from agora_server.models.boundary import BoundaryCodec
from agora_server.models.config import ModelConfig
from agora_server.models.llama import seeded_generator

_BASIS_SALT, _FIXED_EMBEDDING_SALT, _PROJECTION_SALT = 2_000_000, 2_000_001, 2_000_002
_FIXED_EMBEDDING_BLOCK_ROWS = 4096
"""Rows of E_f drawn at a time: 80 MB of float32 on the CPU at hidden 5120, never the whole table."""


def fixed_token_embedding(config: ModelConfig, seed: int, device: torch.device) -> torch.Tensor:
    """E_f (V × d) in bfloat16 on ``device``. Drawn on the CPU from one seeded stream per block of
    rows, so every device of every peer holds the same numbers (CUDA's generators give other streams),
    and written block by block: at 128k × 5120 the float32 table would be a 2.6 GB spike."""
    fixed = torch.empty(config.vocab_size, config.hidden_size, dtype=torch.bfloat16, device=device)
    if fixed.is_meta:
        return fixed
    for block, start in enumerate(range(0, config.vocab_size, _FIXED_EMBEDDING_BLOCK_ROWS)):
        rows = min(_FIXED_EMBEDDING_BLOCK_ROWS, config.vocab_size - start)
        values = torch.randn(rows, config.hidden_size, generator=seeded_generator(seed, _FIXED_EMBEDDING_SALT, block), device="cpu")
        fixed[start : start + rows].copy_(values.mul_(config.init_std))
    return fixed


class SubspaceBoundary(BoundaryCodec):
    def __init__(self, config: ModelConfig, rank: int, seed: int, device: torch.device | None = None):
        """The constants are built on ``device`` (default: the current default device)."""
        super().__init__()
        if not 1 <= rank <= config.hidden_size:
            raise ValueError(f"subspace rank {rank} must be within 1..{config.hidden_size}")
        self.config, self.width = config, rank
        device = torch.device(device) if device is not None else torch.get_default_device()
        gaussian = torch.randn(config.hidden_size, rank, generator=seeded_generator(seed, _BASIS_SALT), device="cpu")
        basis, _ = torch.linalg.qr(gaussian)  # orthonormal columns: UᵀU = I
        # derived from the seed on every stage, so never saved with the stage's state
        self.register_buffer("basis", basis.to(device), persistent=False)
        self.register_buffer("fixed_embedding", fixed_token_embedding(config, seed, device), persistent=False)

    def lift(self, coefficients: torch.Tensor) -> torch.Tensor:
        """U · c for a batch of coefficient vectors [..., k] → [..., d]."""
        return coefficients @ self.basis.T.to(coefficients.dtype)

    # encode and decode work in float32 whatever the compute dtype: h − E_f[t] cancels most of h, and
    # bfloat16 would keep only its top 8 bits before the subtraction
    def encode(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return ((hidden.float() - self.fixed_embedding[tokens].float()) @ self.basis).to(hidden.dtype)

    def decode(self, boundary: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return (boundary.float() @ self.basis.T + self.fixed_embedding[tokens].float()).to(boundary.dtype)

    def round_trip_error(self, hidden: torch.Tensor, tokens: torch.Tensor) -> float:
        """Largest |h − decode(encode(h))|: zero (to rounding) for any stream that obeys the invariant."""
        return float((hidden - self.decode(self.encode(hidden, tokens), tokens)).abs().max())

    def head_embedding(self, model: ModelConfig, seed: int) -> nn.Module:
        return SubspaceEmbedding(self, seed)

    def branch_output(self, projection: nn.Linear, seed: int, layer_index: int, which: int) -> nn.Module:
        return SubspaceLinear(projection.in_features, self, seed, layer_index, which)


class SubspaceLinear(nn.Linear):
    """y = U (Z x + b): a residual-branch output projection confined to span(U)."""

    def __init__(self, in_features: int, codec: SubspaceBoundary, seed: int, layer_index: int, which: int):
        super().__init__(in_features, codec.width, bias=True)
        self.__dict__["codec"] = codec  # shared, not a child: the stage owns the codec's buffers once
        config = codec.config
        # as the dense projection's scale, corrected so U·(Zx) has the same per-coordinate variance
        std = config.init_std / (2 * config.num_layers) ** 0.5 * (config.hidden_size / codec.width) ** 0.5
        with torch.no_grad():
            self.weight.normal_(0.0, std, generator=seeded_generator(seed, _PROJECTION_SALT, layer_index, which))
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.lift(super().forward(x))


class SubspaceEmbedding(nn.Embedding):
    """h₀ = E_f[t] + U · emb[t]: the learned part of the embedding lives in span(U)."""

    def __init__(self, codec: SubspaceBoundary, seed: int):
        config = codec.config
        super().__init__(config.vocab_size, codec.width)
        self.__dict__["codec"] = codec
        with torch.no_grad():
            self.weight.normal_(0.0, config.init_std, generator=seeded_generator(seed, _PROJECTION_SALT, -1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(super().forward(tokens), tokens)
