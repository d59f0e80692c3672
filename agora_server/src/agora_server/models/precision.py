"""How a stage computes and where its state lives: the precision and memory policy of a run.

The defaults keep a small CPU run bit-comparable with a single process (float32 everywhere, master
weights are the weights). ``llama-8b.yaml`` sets the policy a 24 GB GPU needs; ``memory-plan`` shows
what each choice costs per stage.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PrecisionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights, per-micro-batch gradients and activations on the device. bfloat16 halves weights and
    activations and runs on tensor cores; float32 keeps a swarm bit-comparable with one process (tests,
    small CPU runs). Norms, softmax and the loss are computed in float32 either way, and gradients are
    summed over an epoch in float32."""
    master_weights: Literal["device", "cpu"] = "device"
    """Where the float32 master weights and the optimizer state (two AdamW moments) live. "cpu" keeps
    only the compute-dtype weights and the float32 gradient sums on the GPU and steps the optimizer on
    the CPU once per epoch: AdamW state is 12 bytes per parameter, more than a 24 GB GPU holds for a
    1.9B-parameter stage. "device" keeps everything on the device (float32 on a CPU-only run is that)."""
    activation_checkpointing: bool | Literal["auto"] = False
    """Keep only each layer's input during the forward and recompute the layer in the backward: about
    one layer's activations alive at a time instead of all of them, for a quarter more compute per
    backward request. "auto": a worker checkpoints only when its stage does not fit its GPU otherwise
    (the memory plan decides at start-up, per stage and GPU; a CPU worker never checkpoints)."""
    loss_chunk_tokens: int = Field(0, ge=0)
    """The tail computes logits and cross-entropy this many tokens at a time (recomputed in the
    backward), so float32 logits of a whole micro-batch (tokens x vocab) never exist at once.
    0 computes them in one piece."""
    tf32: bool = True
    """Let float32 matrix multiplications on CUDA use TF32 tensor cores (10-bit mantissa inputs,
    float32 accumulation)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.dtype]

    @property
    def separate_master(self) -> bool:
        """Whether float32 master weights exist apart from the weights the model computes with."""
        return self.master_weights == "cpu" or self.dtype != "float32"
