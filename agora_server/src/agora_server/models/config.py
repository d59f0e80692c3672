"""Typed configuration of the Llama-style decoder and of its split into pipeline stages."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Shape of the whole decoder. Every stage of a run is built from the same ModelConfig."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(8192, gt=0)
    """Must match the tokenizer's vocabulary; change together with ``data.tokenizer``."""
    hidden_size: int = Field(256, gt=0)
    """Residual stream width d. Dense stage boundaries carry d numbers per token."""
    num_layers: int = Field(6, gt=0)
    """Total decoder layers over all stages; the run config's stage layout must add up to it."""
    num_heads: int = Field(8, gt=0)
    """Query heads; hidden_size must divide evenly."""
    num_kv_heads: int = Field(4, gt=0)
    """Key/value heads for grouped-query attention; must divide num_heads. Lower saves memory."""
    intermediate_size: int = Field(688, gt=0)
    """SwiGLU inner width, usually about 8/3 of hidden_size rounded to a multiple of 8 or 64."""
    max_seq_len: int = Field(256, gt=0)
    """Longest sequence a stage accepts; rotary tables are built up to this length."""
    rope_theta: float = Field(10000.0, gt=0)
    """Rotary base frequency. Llama 3 uses 500000 for long contexts."""
    norm_eps: float = Field(1e-5, gt=0)
    """RMSNorm epsilon."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal initialisation of embeddings and projections."""

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dimension (hidden_size / num_heads) must be even for rotary embeddings")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class StageKind(str, Enum):
    HEAD = "head"
    """Token embedding and the first layers; receives token ids."""
    BODY = "body"
    """Layers only; receives and returns boundary activations."""
    TAIL = "tail"
    """Last layers, final norm, LM head and per-token cross-entropy."""


class StageSpec(BaseModel):
    """One pipeline stage: which layers of the model it owns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: StageKind
    first_layer: int = Field(ge=0)
    num_layers: int = Field(ge=0)

    @property
    def layer_indices(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


def split_into_stages(num_layers: int, layers_per_stage: list[int]) -> list[StageSpec]:
    """Name and place stages: ``head``, ``body1`` … ``bodyK``, ``tail`` in pipeline order."""
    if len(layers_per_stage) < 2:
        raise ValueError("a pipeline needs at least two stages (head and tail)")
    if sum(layers_per_stage) != num_layers:
        raise ValueError(f"stage layers {layers_per_stage} add up to {sum(layers_per_stage)}, model has {num_layers}")
    if any(n < 1 for n in layers_per_stage[1:-1]):
        raise ValueError("every body stage needs at least one layer")
    specs, first = [], 0
    for index, count in enumerate(layers_per_stage):
        if index == 0:
            name, kind = "head", StageKind.HEAD
        elif index == len(layers_per_stage) - 1:
            name, kind = "tail", StageKind.TAIL
        else:
            name, kind = f"body{index}", StageKind.BODY
        specs.append(StageSpec(name=name, kind=kind, first_layer=first, num_layers=count))
        first += count
    return specs
