"""The subspace boundary is exact by construction: after training, for all upstream gradients,
and it visibly breaks when a layer writes outside the subspace."""

import pytest
import torch
from torch import nn

from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, build_boundary_codec, split_into_stages
from agora_server.optim import OptimizerConfig, build_optimizer

CONFIG = ModelConfig(vocab_size=200, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=96, max_seq_len=32)
SEED = 3
RATE = 8  # k = 8


def build(layers=(1, 2, 1)):
    codec = build_boundary_codec(BoundaryConfig(codec="subspace", compression_rate=RATE), CONFIG, SEED)
    return codec, [PipelineStage(CONFIG, spec, codec, SEED) for spec in split_into_stages(CONFIG.num_layers, list(layers))]


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (4, 16), generator=gen), torch.randint(0, CONFIG.vocab_size, (4, 16), generator=gen)


def through_boundaries(stages, tokens, labels):
    boundary = None
    for stage in stages[:-1]:
        boundary = stage(tokens, boundary)
    return stages[-1](tokens, boundary, labels).mean()


def without_boundaries(stages, tokens, labels):
    """The same stages glued at the residual stream itself: no encode, no decode."""
    h = stages[0].run_layers(stages[0].enter(tokens, None))
    for stage in stages[1:]:
        h = stage.run_layers(h)
    return stages[-1].exit(h, tokens, labels).mean()


def train(stages, steps):
    modules = nn.ModuleList(stages)
    optimizer, _ = build_optimizer(modules, OptimizerConfig(lr=3e-3, weight_decay=0.1))
    first = last = None
    for step in range(steps):
        tokens, labels = batch(100 + step % 3)
        loss = through_boundaries(stages, tokens, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first, last = first if first is not None else float(loss), float(loss)
    return first, last


def test_boundary_round_trip_is_exact_after_training():
    codec, stages = build()
    first, last = train(stages, 30)
    assert last < first - 0.5, "the weights must really have moved"
    tokens, _ = batch(7)
    with torch.no_grad():
        h = stages[0].run_layers(stages[0].enter(tokens, None))
        after_body = stages[1].run_layers(codec.decode(codec.encode(h, tokens), tokens))
    scale = float(h.abs().max())
    assert codec.round_trip_error(h, tokens) < 1e-5 * max(scale, 1.0)
    assert codec.round_trip_error(after_body, tokens) < 1e-5 * max(float(after_body.abs().max()), 1.0)


def test_upstream_gradients_are_unchanged_by_the_boundary():
    _, stages = build()
    train(stages, 5)
    tokens, labels = batch(11)

    def gradients(forward):
        for stage in stages:
            stage.zero_grad()
        loss = forward(stages, tokens, labels)
        loss.backward()
        return loss, {f"{i}.{n}": p.grad.clone() for i, s in enumerate(stages) for n, p in s.named_parameters()}

    loss_c, compressed = gradients(through_boundaries)
    loss_d, direct = gradients(without_boundaries)
    assert torch.allclose(loss_c, loss_d, atol=1e-6)
    assert compressed.keys() == direct.keys()
    for name in direct:
        assert torch.allclose(compressed[name], direct[name], rtol=1e-4, atol=1e-7), name


def test_out_of_subspace_bias_breaks_the_round_trip_and_is_detected():
    codec, stages = build()
    tokens, _ = batch(5)
    layer = stages[1].layers["1"]
    leaky = nn.Linear(layer.mlp.down_proj.in_features, CONFIG.hidden_size, bias=True)
    with torch.no_grad():
        leaky.weight.zero_()
        leaky.bias.normal_(0, 0.02)  # a per-channel bias in the full space, as a careless change might add
    layer.mlp.down_proj = leaky
    with torch.no_grad():
        h = stages[1].run_layers(codec.decode(stages[0](tokens), tokens))
    assert codec.round_trip_error(h, tokens) > 1e-3


def test_tail_stays_full_rank_and_boundary_width_is_k():
    codec, stages = build()
    assert codec.width == CONFIG.hidden_size // RATE
    head, body, tail = stages
    assert head.embed_tokens.weight.shape == (CONFIG.vocab_size, codec.width)
    assert body.layers["1"].self_attn.o_proj.weight.shape == (codec.width, CONFIG.hidden_size)
    assert tail.layers["3"].mlp.down_proj.weight.shape == (CONFIG.hidden_size, CONFIG.intermediate_size)
    assert "basis" not in body.state_dict() and "codec.fixed_embedding" not in body.state_dict()


def test_every_stage_derives_the_same_constants():
    a = build_boundary_codec(BoundaryConfig(codec="subspace", compression_rate=RATE), CONFIG, SEED)
    b = build_boundary_codec(BoundaryConfig(codec="subspace", compression_rate=RATE), CONFIG, SEED)
    assert torch.equal(a.basis, b.basis) and torch.equal(a.fixed_embedding, b.fixed_embedding)
    assert torch.allclose(a.basis.T @ a.basis, torch.eye(a.width), atol=1e-5)


def test_rate_too_high_is_refused():
    with pytest.raises(ValueError, match="leaves no dimension"):
        BoundaryConfig(codec="subspace", compression_rate=128).subspace_rank(64)
