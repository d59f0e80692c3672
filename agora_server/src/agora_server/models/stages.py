"""Pipeline stages and the unsplit reference model.

A stage owns a contiguous run of decoder layers; the head also owns the token embedding,
the tail the final norm, LM head and loss. Parameter names are the unsplit model's
(``layers.7.mlp.down_proj.weight``), so a stage's state is a slice of the full state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from agora_server.models.boundary import BoundaryCodec
from agora_server.models.config import ModelConfig, StageKind, StageSpec
from agora_server.models.llama import DecoderLayer, RMSNorm, init_decoder_layer, rotary_tables, seeded_embedding, seeded_lm_head
from agora_server.models.precision import PrecisionConfig

IGNORE_INDEX = -100


def _build_layers(config: ModelConfig, indices: range, seed: int, boundary: BoundaryCodec | None = None) -> nn.ModuleDict:
    """``boundary``: the codec of the boundary the layers' stream crosses, which chooses the projections
    that end their residual branches (the tail's stream and the unsplit model's cross none)."""
    layers = nn.ModuleDict()
    for index in indices:
        layer = DecoderLayer(config)
        # the dense projections are drawn even where the codec replaces them: the layer's weights come
        # from one stream, and those drawn after them must stay the unsplit model's
        init_decoder_layer(layer, config, seed, index)
        if boundary is not None:
            attention, mlp = layer.self_attn, layer.mlp
            attention.o_proj = boundary.branch_output(attention.o_proj, seed, index, 0)
            mlp.down_proj = boundary.branch_output(mlp.down_proj, seed, index, 1)
        layers[str(index)] = layer
    return layers


def per_token_cross_entropy(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Cross-entropy of the LM head's logits over ``hidden`` [B, T, d] for every position, shape [B, T]
    (ignored positions give 0). Logits are float32; with ``chunk_tokens`` they exist for that many
    tokens at a time, and the backward recomputes each chunk's instead of keeping them."""
    batch, seq, _ = hidden.shape
    flat_hidden, flat_labels = hidden.reshape(batch * seq, -1), labels.reshape(-1)
    if not chunk_tokens or flat_hidden.shape[0] <= chunk_tokens:
        return _token_losses(flat_hidden, lm_head.weight, flat_labels).view(batch, seq)
    losses = []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        part = (flat_hidden[start : start + chunk_tokens], lm_head.weight, flat_labels[start : start + chunk_tokens])
        losses.append(checkpoint(_token_losses, *part, use_reentrant=False) if torch.is_grad_enabled() else _token_losses(*part))
    return torch.cat(losses).view(batch, seq)


def _token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


class _Decoder(nn.Module):
    """What the stages and the unsplit model share: rotary tables, the layer loop, the loss."""

    precision: PrecisionConfig

    def _set_precision(self, precision: PrecisionConfig) -> None:
        if precision.activation_checkpointing == "auto":
            # the memory plan decides it per stage and GPU (``server.memory_plan``) before a stage is built
            raise ValueError("activation_checkpointing 'auto' must be decided (true or false) before the model is built")
        self.precision = precision

    def _register_rotary(self, config: ModelConfig) -> None:
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def run_layers(self, h: torch.Tensor) -> torch.Tensor:
        seq = h.shape[1]
        cos, sin = self.rope_cos[:seq].to(h.dtype), self.rope_sin[:seq].to(h.dtype)
        recompute = self.precision.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers.values():
            h = checkpoint(layer, h, cos, sin, use_reentrant=False) if recompute else layer(h, cos, sin)
        return h

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_token_cross_entropy(self.norm(h), self.lm_head, labels, self.precision.loss_chunk_tokens)


class PipelineStage(_Decoder):
    """One stage of the pipeline.

    forward(tokens, boundary=None, labels=None):
      head  → boundary tensor of the next stage   (``boundary`` must be None)
      body  → boundary tensor of the next stage
      tail  → per-token cross-entropy [B, T]       (``labels`` required)
    """

    def __init__(
        self, config: ModelConfig, spec: StageSpec, codec: BoundaryCodec, seed: int, precision: PrecisionConfig = PrecisionConfig()
    ):
        """Built on the current default device (``with torch.device("meta")`` builds it without memory).
        ``precision``: activation checkpointing and the loss's chunking; the dtype and the weights'
        placement are the optimizer side's (``optim.master``)."""
        super().__init__()
        self.config, self.spec, self.codec = config, spec, codec
        self._set_precision(precision)
        self.embed_tokens = codec.head_embedding(config, seed) if spec.kind is StageKind.HEAD else None
        # the tail's output is a loss, not a boundary: its layers are the unsplit model's
        self.layers = _build_layers(config, spec.layer_indices, seed, None if spec.kind is StageKind.TAIL else codec)
        if spec.kind is StageKind.TAIL:
            self.norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.lm_head = seeded_lm_head(config, seed)
        self._register_rotary(config)

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
        return self.loss(h, labels)


class DecoderLM(_Decoder):
    """The unsplit model: the reference that composed stages must reproduce exactly."""

    def __init__(self, config: ModelConfig, seed: int, precision: PrecisionConfig = PrecisionConfig()):
        super().__init__()
        self.config = config
        self._set_precision(precision)
        self.embed_tokens = seeded_embedding(config, seed)
        self.layers = _build_layers(config, range(config.num_layers), seed)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = seeded_lm_head(config, seed)
        self._register_rotary(config)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.run_layers(self.embed_tokens(tokens)), labels)
