"""The split model is the unsplit model: same weights, same loss, same gradients, bit for bit."""

import pytest
import torch

from agora_server.models import (
    BoundaryConfig,
    DecoderLM,
    ModelConfig,
    PipelineStage,
    StageKind,
    build_boundary_codec,
    split_into_stages,
)

CONFIG = ModelConfig(
    vocab_size=300, hidden_size=64, num_layers=5, num_heads=4, num_kv_heads=2, intermediate_size=96, max_seq_len=32
)
SEED = 7


def build_stages(layers_per_stage):
    codec = build_boundary_codec(BoundaryConfig(), CONFIG, SEED)
    return [PipelineStage(CONFIG, spec, codec, SEED) for spec in split_into_stages(CONFIG.num_layers, layers_per_stage)]


def run_pipeline_like_the_swarm(stages, tokens, labels):
    """Forward stage by stage with detached boundaries, then backward stage by stage, as RPCs do."""
    inputs, boundary = [], None
    for stage in stages[:-1]:
        x = None if boundary is None else boundary.detach().requires_grad_(True)
        inputs.append(x)
        boundary = stage(tokens, x)
    x = boundary.detach().requires_grad_(True)
    loss = stages[-1](tokens, x, labels)
    loss.mean().backward()
    grad = x.grad
    outputs = []
    for stage, x in zip(reversed(stages[:-1]), reversed(inputs)):
        out = stage(tokens, x)  # backward re-runs the forward, like a worker does
        out.backward(grad)
        grad = None if x is None else x.grad
        outputs.append(out)
    return loss


@pytest.mark.parametrize("layers_per_stage", [[1, 3, 1], [2, 3], [1, 1, 1, 1, 1], [0, 5, 0]])
def test_composed_stages_match_unsplit_model_exactly(layers_per_stage):
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, CONFIG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = -100  # ignored positions must behave the same too

    full = DecoderLM(CONFIG, SEED)
    reference = full(tokens, labels)
    reference.mean().backward()

    stages = build_stages(layers_per_stage)
    loss = run_pipeline_like_the_swarm(stages, tokens, labels)

    assert torch.equal(loss, reference)
    full_params = dict(full.named_parameters())
    seen = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            assert torch.equal(param, full_params[name]), name
            assert torch.equal(param.grad, full_params[name].grad), f"gradient of {name}"
            seen.add(name)
    assert seen == set(full_params), "stages together must own exactly the unsplit model's parameters"


def test_stage_kinds_and_names():
    specs = split_into_stages(6, [2, 1, 1, 2])
    assert [s.name for s in specs] == ["head", "body1", "body2", "tail"]
    assert [s.kind for s in specs] == [StageKind.HEAD, StageKind.BODY, StageKind.BODY, StageKind.TAIL]
    assert [list(s.layer_indices) for s in specs] == [[0, 1], [2], [3], [4, 5]]


def test_tail_returns_per_token_loss_with_ignored_positions_zero():
    tail = build_stages([2, 3])[-1]
    boundary = torch.randn(2, 8, CONFIG.hidden_size)
    labels = torch.randint(0, CONFIG.vocab_size, (2, 8))
    labels[1, 5:] = -100
    loss = tail(torch.zeros(2, 8, dtype=torch.long), boundary, labels)
    assert loss.shape == (2, 8)
    assert torch.all(loss[1, 5:] == 0) and torch.all(loss[0] > 0)


@pytest.mark.parametrize(
    "layers, message",
    [([2, 2], "add up to 4"), ([5], "at least two stages"), ([2, 0, 3], "body stage needs at least one layer")],
)
def test_bad_stage_split_is_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        split_into_stages(5, layers)


def test_bad_head_layout_is_refused():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=3)
