"""The memory plan counts what a worker really holds: its activation figure against what torch allocates
on the CPU for the same stage and micro-batch, its static parts against the built stage."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, PrecisionConfig, StageKind, build_boundary_codec, split_into_stages
from agora_server.server import ServerConfig
from agora_server.server.memory_plan import DEVICE_RESERVE_BYTES, GIB, measure_micro_batch, meta_stage, plan_stage, with_checkpointing

MODEL = ModelConfig(vocab_size=4096, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=688, max_seq_len=512)
BATCH, SEQ = 2, 512


def allocated_on_cpu(stage: PipelineStage, width: int, dtype: torch.dtype, tmp_path) -> int:
    """Peak bytes torch's CPU allocator handed out during one backward request (forward with autograd,
    then backward), read from the profiler's allocation records; the weights' gradients left out."""
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        boundary = None if stage.kind is StageKind.HEAD else torch.randn(BATCH, SEQ, width, dtype=dtype, requires_grad=True)
        out = stage(tokens, boundary, tokens if stage.kind is StageKind.TAIL else None)
        out.backward(torch.ones_like(out))
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    records = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    latest = {r["Addr"]: i for i, r in enumerate(records) if r["Bytes"] > 0}
    gradients = {latest[p.grad.data_ptr()] for p in stage.parameters() if p.grad is not None and p.grad.data_ptr() in latest}
    alive = peak = 0
    for i, record in enumerate(records):
        if i not in gradients:
            alive += record["Bytes"]
            peak = max(peak, alive)
    return peak


@pytest.mark.parametrize("codec", ["dense", "subspace"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", [0, 2], ids=["head", "tail"])
def test_planned_activations_match_what_torch_allocates_on_the_cpu(codec, checkpointing, dtype, which, tmp_path):
    boundary = BoundaryConfig(codec=codec, compression_rate=16)
    server = ServerConfig(precision=PrecisionConfig(dtype=dtype, activation_checkpointing=checkpointing, loss_chunk_tokens=256))
    spec = split_into_stages(MODEL.num_layers, [2, 2, 2])[which]
    width, torch_dtype = boundary.width(MODEL.hidden_size), server.precision.torch_dtype
    planned = measure_micro_batch(meta_stage(MODEL, spec, boundary, server, 0), BATCH, SEQ, width, torch_dtype)

    stage = PipelineStage(MODEL, spec, build_boundary_codec(boundary, MODEL, 0), 0, server.precision)
    for p in stage.parameters():
        p.data = p.data.to(torch_dtype)
    measured = allocated_on_cpu(stage, width, torch_dtype, tmp_path)
    assert abs(planned - measured) <= 0.15 * measured, f"planned {planned} bytes, torch allocated {measured}"


def test_checkpointing_and_chunked_loss_lower_the_planned_peak():
    spec = split_into_stages(MODEL.num_layers, [2, 2, 2])[2]
    dense = BoundaryConfig()

    def activations(**precision) -> int:
        server = ServerConfig(precision=PrecisionConfig(dtype="bfloat16", **precision))
        return plan_stage(MODEL, spec, dense, server, 0, SEQ, BATCH).device.activations

    keep_all = activations()
    assert activations(activation_checkpointing=True) < 0.7 * keep_all
    assert activations(activation_checkpointing=True, loss_chunk_tokens=128) < activations(activation_checkpointing=True)


def test_static_parts_are_the_built_stage_under_the_policy():
    spec = split_into_stages(MODEL.num_layers, [2, 2, 2])[1]
    boundary = BoundaryConfig(codec="subspace", compression_rate=16)
    offloaded = ServerConfig(precision=PrecisionConfig(dtype="bfloat16", master_weights="cpu"))
    plan = plan_stage(MODEL, spec, boundary, offloaded, 0, SEQ, BATCH, vram_bytes=24 * GIB)
    stage = PipelineStage(MODEL, spec, build_boundary_codec(boundary, MODEL, 0), 0)
    params = sum(p.numel() for p in stage.parameters())
    assert plan.params == params
    assert plan.device.weights == 2 * params and plan.device.gradients == (2 + 4) * params
    assert plan.device.optimizer == 0, "offloaded: no master weights or moments on the GPU"
    assert (plan.host.master, plan.host.optimizer) == (4 * params, 8 * params)
    # the fixed token embedding is bfloat16, the basis and the rotary tables float32
    assert plan.device.constants == MODEL.vocab_size * MODEL.hidden_size * 2 + MODEL.hidden_size * 16 * 4 + 2 * MODEL.max_seq_len * MODEL.head_dim * 4
    assert plan.max_batch == 64, "a 2.9M-parameter stage fits the most the planner looks for"

    on_device = ServerConfig(precision=PrecisionConfig())
    plan = plan_stage(MODEL, spec, boundary, on_device, 0, SEQ, BATCH)
    assert plan.device.weights == 4 * params and plan.device.optimizer == 8 * params, "float32 weights are their own masters"
    assert plan.host.master == plan.host.optimizer == 0 and plan.max_batch is None


def test_the_largest_batch_is_the_largest_that_fits():
    spec = split_into_stages(MODEL.num_layers, [2, 2, 2])[2]
    server = ServerConfig(precision=PrecisionConfig(dtype="bfloat16"))
    one = plan_stage(MODEL, spec, BoundaryConfig(), server, 0, SEQ, 1)
    three = plan_stage(MODEL, spec, BoundaryConfig(), server, 0, SEQ, 3)
    # a GPU whose usable memory ends just above three sequences' peak
    vram = DEVICE_RESERVE_BYTES + three.device.peak + (three.device.peak - one.device.peak) // 4
    assert plan_stage(MODEL, spec, BoundaryConfig(), server, 0, SEQ, 1, vram).max_batch == 3
    assert plan_stage(MODEL, spec, BoundaryConfig(), server, 0, SEQ, 1, DEVICE_RESERVE_BYTES + one.device.peak - 1).max_batch == 0


def test_auto_checkpointing_keeps_the_activations_only_where_they_fit():
    spec = split_into_stages(MODEL.num_layers, [2, 2, 2])[2]
    auto = ServerConfig(precision=PrecisionConfig(dtype="bfloat16", activation_checkpointing="auto"))
    keep = plan_stage(MODEL, spec, BoundaryConfig(), with_checkpointing(auto, False), 0, SEQ, BATCH)
    roomy = DEVICE_RESERVE_BYTES + keep.device.peak
    chosen = plan_stage(MODEL, spec, BoundaryConfig(), auto, 0, SEQ, BATCH, roomy)
    assert not chosen.checkpointing and chosen.device == keep.device
    tight = plan_stage(MODEL, spec, BoundaryConfig(), auto, 0, SEQ, BATCH, roomy - 1)
    assert tight.checkpointing and tight.device.activations < keep.device.activations
    assert chosen.max_batch == tight.max_batch, "the largest batch is the checkpointed one either way"
