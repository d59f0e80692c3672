"""Pipeline stages and the unsplit reference model.

A stage owns a contiguous run of decoder layers; the head also owns the token embedding,
the tail the final norm, LM head and loss. Parameter names are the unsplit model's
(``layers.7.mlp.down_proj.weight``), so a stage's state is a slice of the full state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agora_server.models.boundary import BoundaryCodec
from agora_server.models.config import ModelConfig, StageKind, StageSpec
from agora_server.models.llama import DecoderLayer, RMSNorm, init_decoder_layer, rotary_tables, seeded_generator

IGNORE_INDEX = -100
_EMBED_SALT, _LM_HEAD_SALT = 1_000_000, 1_000_001


def _build_layers(config: ModelConfig, indices: range, seed: int) -> nn.ModuleDict:
    layers = nn.ModuleDict()
    for index in indices:
        layer = DecoderLayer(config)
        init_decoder_layer(layer, config, seed, index)
        layers[str(index)] = layer
    return layers


def _build_embedding(config: ModelConfig, seed: int) -> nn.Embedding:
    embedding = nn.Embedding(config.vocab_size, config.hidden_size)
    with torch.no_grad():
        embedding.weight.normal_(0.0, config.init_std, generator=seeded_generator(seed, _EMBED_SALT))
    return embedding


def _build_lm_head(config: ModelConfig, seed: int) -> nn.Linear:
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    with torch.no_grad():
        lm_head.weight.normal_(0.0, config.init_std, generator=seeded_generator(seed, _LM_HEAD_SALT))
    return lm_head


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for every position, shape [B, T]; ignored positions give 0."""
    batch, seq, vocab = logits.shape
    losses = F.cross_entropy(
        logits.float().reshape(batch * seq, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view(batch, seq)


class _RotaryMixin(nn.Module):
    def _register_rotary(self, config: ModelConfig) -> None:
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def run_layers(self, h: torch.Tensor) -> torch.Tensor:
        seq = h.shape[1]
        cos, sin = self.rope_cos[:seq].to(h.dtype), self.rope_sin[:seq].to(h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return h


class PipelineStage(_RotaryMixin):
    """One stage of the pipeline.

    forward(tokens, boundary=None, labels=None):
      head  → boundary tensor of the next stage   (``boundary`` must be None)
      body  → boundary tensor of the next stage
      tail  → per-token cross-entropy [B, T]       (``labels`` required)
    """

    def __init__(self, config: ModelConfig, spec: StageSpec, codec: BoundaryCodec, seed: int):
        super().__init__()
        self.config, self.spec, self.codec = config, spec, codec
        self.embed_tokens = _build_embedding(config, seed) if spec.kind is StageKind.HEAD else None
        self.layers = _build_layers(config, spec.layer_indices, seed)
        if spec.kind is StageKind.TAIL:
            self.norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.lm_head = _build_lm_head(config, seed)
        self._register_rotary(config)
        codec.adapt_stage(self, seed)

    @property
    def kind(self) -> StageKind:
        return self.spec.kind

    def forward(
        self, tokens: torch.Tensor, boundary: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.exit(self.run_layers(self.enter(tokens, boundary)), tokens, labels)

    def enter(self, tokens: torch.Tensor, boundary: torch.Tensor | None) -> torch.Tensor:
        """The residual stream this stage starts from: embedded tokens, or the decoded boundary."""
        if self.kind is StageKind.HEAD:
            return self.embed_tokens(tokens)
        return self.codec.decode(boundary, tokens)

    def exit(self, h: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """What leaves the stage: the encoded boundary, or (tail) the per-token loss."""
        if self.kind is not StageKind.TAIL:
            return self.codec.encode(h, tokens)
        if labels is None:
            raise ValueError("the tail stage needs labels to compute the loss")
        return per_token_cross_entropy(self.lm_head(self.norm(h)), labels)


class DecoderLM(_RotaryMixin):
    """The unsplit model: the reference that composed stages must reproduce exactly."""

    def __init__(self, config: ModelConfig, seed: int):
        super().__init__()
        self.config = config
        self.embed_tokens = _build_embedding(config, seed)
        self.layers = _build_layers(config, range(config.num_layers), seed)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = _build_lm_head(config, seed)
        self._register_rotary(config)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.run_layers(self.embed_tokens(tokens))
        return per_token_cross_entropy(self.lm_head(self.norm(h)), labels)
