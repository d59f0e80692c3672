"""How much GPU and host memory a worker of a stage needs, read off the stage built on the meta device.

Weights, gradients, optimizer state and constants are counted from the built stage under the run's
precision policy; activations are measured by running one micro-batch's forward and backward on the
meta device (``models.memory.ActivationMeter``), with the same code a worker runs. The preflight
chooses a GPU's micro-batch size from this plan, and ``agora_cli.py memory-plan`` prints it.
"""

from __future__ import annotations

import dataclasses

import torch

from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, StageKind, StageSpec, build_boundary_codec
from agora_server.models.memory import ActivationMeter
from agora_server.optim.sparta import slice_count
from agora_server.server.config import ServerConfig

GIB = 2**30
DEVICE_RESERVE_BYTES = 2 * GIB
"""GPU memory outside the tensors' peak: the CUDA context, cuBLAS and attention workspaces, and the
caching allocator's fragmentation. A card's usable memory is its total minus this."""
HOST_RUNTIME_BYTES = 4 * GIB
"""Host memory of the worker process itself and its DHT and averager processes (Python, torch, hivemind,
the CUDA host context), measured at about 2-3 GB; the rest is headroom."""
OPTIMIZER_STATE_BYTES = 8
"""Per trained parameter: AdamW's (and the Nesterov variant's) two float32 moments."""
MAX_PLANNED_BATCH = 64
MASTER_WEIGHT_BYTES = 4
"""Per trained parameter: the float32 master copy a checkpoint keeps, whatever the compute dtype."""


def checkpoint_bytes(params: int) -> int:
    """Size of a stage's checkpoint on disk: float32 master weights and the optimizer's two moments
    (the counters beside them are a few hundred bytes)."""
    return params * (MASTER_WEIGHT_BYTES + OPTIMIZER_STATE_BYTES)


@dataclasses.dataclass(frozen=True)
class DeviceBytes:
    weights: int
    """The weights the model computes with, in the compute dtype."""
    gradients: int
    """One micro-batch's gradient (compute dtype) and the epoch's float32 sums."""
    optimizer: int
    """Float32 master weights and optimizer state, when the policy keeps them on the device."""
    constants: int
    """Buffers that are not trained: the subspace basis and fixed token embedding, rotary tables."""
    activations: int
    """Peak of one micro-batch's forward and backward beyond the above (inputs, saved activations,
    recomputed layers, the loss's logits, temporaries)."""

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.constants + self.activations


@dataclasses.dataclass(frozen=True)
class HostBytes:
    master: int
    """Float32 master weights, when offloaded to the CPU."""
    gradients: int
    """The float32 copy of the epoch's gradient the optimizer steps with, when offloaded."""
    optimizer: int
    """Optimizer state, when offloaded."""
    averaging: int
    """SPARTA: the fixed permutations (int32 per parameter) and the averager's buffers."""
    state_sharing: int
    """A float32 copy of the weights while a newcomer downloads them from this worker."""
    checkpoint: int
    """The snapshot of the stage's state (float32 weights and optimizer moments) while a periodic checkpoint
    is written in the background: the compute thread goes on with the live state meanwhile."""
    transient: int
    """The largest tensor's temporaries while stepping and copying the masters to the device."""
    runtime: int = HOST_RUNTIME_BYTES

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class StagePlan:
    name: str
    layers: range
    params: int
    batch: int
    seq_len: int
    checkpointing: bool
    """Whether the layers' activations are recomputed in the backward (decided here under "auto")."""
    device: DeviceBytes
    host: HostBytes
    max_batch: int | None = None
    """The largest micro-batch whose peak fits the planned VRAM (None when no VRAM was given)."""
    kept_graph: int = 0
    """Bytes one micro-batch's graph holds from its forward to its backward when the worker keeps it
    (0 for the tail, which keeps none). Beside ``device.peak``: the plan leaves the rest of the card to them."""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "params": self.params,
            "gpu_gib": round(self.device.peak / GIB, 2),
            "host_gib": round(self.host.total / GIB, 2),
            "max_batch": self.max_batch,
            "activation_checkpointing": self.checkpointing,
            "kept_graph_gib": round(self.kept_graph / GIB, 3),
            "gpu_breakdown_gib": {k: round(v / GIB, 3) for k, v in dataclasses.asdict(self.device).items()},
            "host_breakdown_gib": {k: round(v / GIB, 3) for k, v in dataclasses.asdict(self.host).items()},
        }


def meta_stage(model: ModelConfig, spec: StageSpec, boundary: BoundaryConfig, server: ServerConfig, seed: int) -> PipelineStage:
    """The stage as a worker builds it, on the meta device, its trained weights in the compute dtype."""
    with torch.device("meta"):
        stage = PipelineStage(model, spec, build_boundary_codec(boundary, model, seed), seed, server.precision)
    for p in stage.parameters():
        p.data = p.data.to(server.precision.torch_dtype)
    return stage


def _forward_with_autograd(stage: PipelineStage, batch: int, seq_len: int, boundary_width: int, dtype: torch.dtype) -> torch.Tensor:
    device = next(stage.parameters()).device
    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    boundary = None
    if stage.kind is not StageKind.HEAD:
        boundary = torch.zeros(batch, seq_len, boundary_width, dtype=dtype, device=device, requires_grad=True)
    return stage(tokens, boundary, tokens if stage.kind is StageKind.TAIL else None)


def measure_micro_batch(stage: PipelineStage, batch: int, seq_len: int, boundary_width: int, dtype: torch.dtype) -> int:
    """Peak bytes of one backward request on ``stage`` (its forward with autograd, then its backward),
    inputs included, gradients of the weights excluded. Runs wherever the stage's tensors are."""
    meter = ActivationMeter()
    with meter:
        out = _forward_with_autograd(stage, batch, seq_len, boundary_width, dtype)
        out.backward(torch.ones_like(out))
    trained = [p for p in stage.parameters() if p.requires_grad]
    peak = meter.peak(p.grad for p in trained if p.grad is not None)
    for p in trained:
        p.grad = None
    return peak


def measure_kept_graph(stage: PipelineStage, batch: int, seq_len: int, boundary_width: int, dtype: torch.dtype) -> int:
    """Bytes one micro-batch's graph holds between its forward and its backward on a head or body
    worker that keeps it (``server.kept_graphs``): the input, what autograd saved, the output."""
    meter = ActivationMeter()
    with meter:
        out = _forward_with_autograd(stage, batch, seq_len, boundary_width, dtype)
        held = meter.alive()
    del out
    return held


def kept_graph_bytes_per_token(model: ModelConfig, spec: StageSpec, boundary: BoundaryConfig, server: ServerConfig, seed: int) -> float:
    """What a kept graph holds per token of its micro-batch (measured at one sequence of ``max_seq_len``
    on the meta device; the activations grow linearly with the tokens)."""
    stage = meta_stage(model, spec, boundary, server, seed)
    width = boundary.width(model.hidden_size)
    return measure_kept_graph(stage, 1, model.max_seq_len, width, server.precision.torch_dtype) / model.max_seq_len


def kept_graphs_budget(plan: "StagePlan", vram_bytes: int) -> int:
    """Device bytes the kept graphs may hold: what the card leaves beside the stage's planned peak (one
    micro-batch's forward and backward at its largest batch, on top of weights and optimizer)."""
    return max(0, vram_bytes - DEVICE_RESERVE_BYTES - plan.device.peak)


def plan_stage(
    model: ModelConfig,
    spec: StageSpec,
    boundary: BoundaryConfig,
    server: ServerConfig,
    seed: int,
    seq_len: int,
    batch: int = 1,
    vram_bytes: int | None = None,
) -> StagePlan:
    """The stage's memory at ``batch`` x ``seq_len``, and the largest batch ``vram_bytes`` holds.
    With activation checkpointing "auto", the stage keeps its activations when that fits ``vram_bytes``
    (or no VRAM is given), and checkpoints otherwise; its largest batch is the checkpointed one."""
    if server.precision.activation_checkpointing == "auto":
        # the largest batch is the checkpointed plan's either way: the kept one needs no search of its own
        keep = plan_stage(model, spec, boundary, with_checkpointing(server, False), seed, seq_len, batch)
        recompute = plan_stage(model, spec, boundary, with_checkpointing(server, True), seed, seq_len, batch, vram_bytes)
        if vram_bytes is None or keep.device.peak + DEVICE_RESERVE_BYTES <= vram_bytes:
            return dataclasses.replace(keep, max_batch=recompute.max_batch)
        return recompute
    precision = server.precision
    stage = meta_stage(model, spec, boundary, server, seed)
    trained = [p for p in stage.parameters() if p.requires_grad]
    params = sum(p.numel() for p in trained)
    largest = max((p.numel() for p in trained), default=0)
    compute_bytes = precision.torch_dtype.itemsize
    offloaded = precision.master_weights == "cpu"
    master_bytes = 4 * params if precision.separate_master else 0
    width = boundary.width(model.hidden_size)

    def activations(b: int) -> int:
        return measure_micro_batch(stage, b, seq_len, width, precision.torch_dtype)

    device = DeviceBytes(
        weights=params * compute_bytes,
        gradients=params * (compute_bytes + 4),
        optimizer=0 if offloaded else master_bytes + OPTIMIZER_STATE_BYTES * params,
        constants=sum(b.numel() * b.element_size() for b in stage.buffers()),
        activations=activations(batch),
    )
    averaging = server.averaging
    host = HostBytes(
        master=master_bytes if offloaded else 0,
        gradients=4 * params if offloaded else 0,
        optimizer=OPTIMIZER_STATE_BYTES * params if offloaded else 0,
        averaging=(4 * params + 2 * 4 * -(-params // slice_count(averaging.fraction))) if averaging.enabled else 0,
        state_sharing=4 * params if averaging.enabled else 0,
        checkpoint=checkpoint_bytes(params),
        transient=4 * largest if offloaded else 0,
    )
    max_batch = None
    if vram_bytes is not None:
        max_batch = _largest_batch(device, vram_bytes - DEVICE_RESERVE_BYTES, activations)
    kept = 0 if spec.kind is StageKind.TAIL else measure_kept_graph(stage, batch, seq_len, width, precision.torch_dtype)
    return StagePlan(spec.name, spec.layer_indices, params, batch, seq_len, precision.activation_checkpointing, device, host, max_batch, kept)


def with_checkpointing(server: ServerConfig, checkpointing: bool) -> ServerConfig:
    precision = server.precision.model_copy(update={"activation_checkpointing": checkpointing})
    return server.model_copy(update={"precision": precision})


def _largest_batch(at_batch: DeviceBytes, usable: int, activations) -> int:
    """Activations grow linearly with the micro-batch: extrapolate from two sizes, then check."""
    fixed = at_batch.peak - at_batch.activations
    first, second = activations(1), activations(2)
    if fixed + first > usable:
        return 0
    per_sample = max(second - first, 1)
    best = min(MAX_PLANNED_BATCH, 1 + (usable - fixed - first) // per_sample)
    while best > 1 and fixed + activations(best) > usable:
        best -= 1
    return best
