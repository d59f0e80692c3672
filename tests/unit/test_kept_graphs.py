"""A head or body worker keeps the graph of a training forward and runs the backward on it: the same
gradients as a backward that recomputes the forward, in bounded memory, freed on time, and a backward
whose graph is gone still completes from its inputs."""

from __future__ import annotations

import pytest
import torch

from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, build_boundary_codec, split_into_stages
from agora_server.server import ServerConfig, StageBackend
from agora_server.server.backend import GraphGone
from agora_server.server.config import KeptGraphsConfig
from agora_server.server.kept_graphs import GraphKey, KeptGraphs
from agora_server.server.memory_plan import kept_graph_bytes_per_token, measure_micro_batch, meta_stage
from agora_server.wire import BackwardGraph
from tests.helpers.clock import ManualClock

MODEL = ModelConfig(vocab_size=96, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=16)
SEED = 3
BATCH, SEQ = 2, 16
HEAD, BODY, TAIL = split_into_stages(MODEL.num_layers, [1, 2, 1])


def backend(spec, graphs: KeptGraphs | None = None, target_batch: int = 1000) -> StageBackend:
    server = ServerConfig(target_batch_size=target_batch)
    stage = PipelineStage(MODEL, spec, build_boundary_codec(BoundaryConfig(), MODEL, SEED), SEED)
    return StageBackend(stage, server, torch.device("cpu"), graphs=graphs)


def store(clock=None, max_graphs: int = 4, timeout: float = 30.0, max_bytes: int | None = None) -> KeptGraphs:
    """Graphs estimated at 100 bytes per token."""
    return KeptGraphs(KeptGraphsConfig(max_graphs=max_graphs, timeout=timeout), max_bytes, bytes_per_token=100.0,
                      clock=clock or ManualClock())


def request(step: int, spec) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A stage's inputs and the gradient of its output, as the trainer would send them."""
    gen = torch.Generator().manual_seed(step)
    inputs = {"tokens": torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=gen)}
    if spec is not HEAD:
        inputs["boundary"] = torch.randn(BATCH, SEQ, MODEL.hidden_size, generator=gen)
    return inputs, torch.randn(BATCH, SEQ, MODEL.hidden_size, generator=gen) * 1e-2


@pytest.mark.parametrize("spec", [HEAD, BODY], ids=["head", "body"])
def test_a_backward_on_the_kept_graph_gives_exactly_the_recomputed_gradients(spec):
    keeping, recomputing = backend(spec, store()), backend(spec)
    inputs, grad = request(0, spec)
    key = GraphKey("trainer", "session", 1)

    (kept_out,) = keeping.forward(inputs, keep=key)
    (plain_out,) = recomputing.forward(inputs)
    assert torch.allclose(kept_out, plain_out, atol=1e-6), "keeping the graph must not change the forward's answer"
    assert keeping.graphs.snapshot().held == 1

    kept, how_kept = keeping.backward_graph({"grad": grad}, key)
    recomputed, how_recomputed = recomputing.backward_graph({**inputs, "grad": grad}, None)
    assert (how_kept, how_recomputed) == (BackwardGraph.KEPT, BackwardGraph.RECOMPUTED)
    assert len(kept) == len(recomputed) == (0 if spec is HEAD else 1)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b), "the boundary gradient differs"
    # each backward's parameter gradients land in the epoch's float32 sums
    assert any(bool(a.any()) for a in keeping.weights.sums), "the backward reached the weights"
    for name, a, b in zip(keeping.weights.names, keeping.weights.sums, recomputing.weights.sums):
        assert torch.equal(a, b), f"gradient of {name} differs"
    assert keeping.graphs.snapshot().held == 0, "the backward frees the graph it ran on"
    assert (keeping.counters.kept_graph_backwards, keeping.counters.recomputed_backwards) == (1, 0)
    assert (recomputing.counters.kept_graph_backwards, recomputing.counters.recomputed_backwards) == (0, 1)


def test_evaluation_forwards_keep_nothing_and_the_tail_never_keeps():
    head = backend(HEAD, store())
    head.forward(request(0, HEAD)[0])
    assert head.graphs.snapshot().held == 0
    assert backend(TAIL, store()).graphs is None


def test_the_store_is_bounded_by_count_a_forward_beyond_it_keeps_none_and_its_backward_recomputes():
    body = backend(BODY, store(max_graphs=2))
    requests = [request(i, BODY) for i in range(3)]
    keys = [GraphKey("trainer", "s", i) for i in range(3)]
    kept = [body.forward_keeping(inputs, key)[1] for (inputs, _), key in zip(requests, keys)]
    assert kept == [True, True, False], "the answer tells the trainer where a graph waits"
    snapshot = body.graphs.snapshot()
    assert (snapshot.held, snapshot.not_kept) == (2, 1), "the third forward found the store full"

    inputs, grad = requests[2]
    with pytest.raises(GraphGone, match="graph gone"):
        body.backward_graph({"grad": grad}, keys[2])
    _, how = body.backward_graph({**inputs, "grad": grad}, keys[2])
    assert how is BackwardGraph.RECOMPUTED, "sent with its inputs, it completes without the graph"
    for (inputs, grad), key in zip(requests[:2], keys[:2]):  # the first two were not evicted for it
        assert body.backward_graph({"grad": grad}, key)[1] is BackwardGraph.KEPT
    assert body.graphs.snapshot().held == 0


def test_the_store_is_bounded_by_bytes():
    graphs = store(max_bytes=int(1.5 * 100.0 * BATCH * SEQ))  # room for one graph of BATCH x SEQ tokens
    body = backend(BODY, graphs)
    body.forward(request(0, BODY)[0], keep=GraphKey("t", "s", 0))
    body.forward(request(1, BODY)[0], keep=GraphKey("t", "s", 1))
    snapshot = graphs.snapshot()
    assert (snapshot.held, snapshot.bytes, snapshot.not_kept) == (1, 100 * BATCH * SEQ, 1)


def test_a_graph_waiting_past_the_timeout_is_freed_and_its_backward_recomputes():
    clock = ManualClock()
    body = backend(BODY, store(clock, timeout=30.0))
    inputs, grad = request(0, BODY)
    key = GraphKey("trainer", "s", 7)
    body.forward(inputs, keep=key)
    clock.advance(29.0)
    body.free_unusable_graphs()
    assert body.graphs.snapshot().held == 1, "not yet timed out"
    clock.advance(2.0)
    body.free_unusable_graphs()  # what the worker runs between requests
    snapshot = body.graphs.snapshot()
    assert (snapshot.held, snapshot.bytes, snapshot.expired) == (0, 0, 1)
    with pytest.raises(GraphGone):
        body.backward_graph({"grad": grad}, key)
    (recomputed,), how = body.backward_graph({**inputs, "grad": grad}, key)
    assert how is BackwardGraph.RECOMPUTED

    fresh = backend(BODY)  # the same weights, nothing kept
    (expected,) = fresh.backward({**inputs, "grad": grad})
    assert torch.equal(recomputed, expected)


def test_a_change_of_the_weights_between_forward_and_backward_frees_the_graph_and_the_backward_recomputes():
    body = backend(BODY, store())
    inputs, grad = request(0, BODY)
    assert body.forward_keeping(inputs, GraphKey("t", "s", 0))[1]
    body.weights.push()  # what an optimizer step or an averaging round ends with
    # autograd could not run the graph on the weights it was computed with: it is freed, the forward recomputed
    assert body.backward_graph({**inputs, "grad": grad}, GraphKey("t", "s", 0))[1] is BackwardGraph.RECOMPUTED
    assert body.graphs.snapshot().outdated == 1


def test_a_forward_whose_backward_comes_after_the_next_step_keeps_nothing():
    body = backend(BODY, store(), target_batch=2 * BATCH)  # an epoch is two micro-batches
    requests = [request(i, BODY) for i in range(3)]
    kept = [body.forward_keeping(inputs, GraphKey("t", "s", i))[1] for i, (inputs, _) in enumerate(requests)]
    assert kept == [True, True, False], "the third backward comes after the step the first two complete"
    for i, (inputs, grad) in enumerate(requests[:2]):
        assert body.backward_graph({"grad": grad}, GraphKey("t", "s", i))[1] is BackwardGraph.KEPT
    assert body.counters.optimizer_steps == 1
    inputs, grad = requests[2]
    assert body.backward_graph({**inputs, "grad": grad}, GraphKey("t", "s", 2))[1] is BackwardGraph.RECOMPUTED
    assert body.forward_keeping(request(3, BODY)[0], GraphKey("t", "s", 3))[1], "a new epoch has room again"


def test_graphs_are_kept_per_caller_and_session():
    body = backend(BODY, store())
    inputs, grad = request(0, BODY)
    body.forward(inputs, keep=GraphKey("trainer", "s", 0))
    for other in (GraphKey("someone-else", "s", 0), GraphKey("trainer", "restarted", 0)):
        with pytest.raises(GraphGone):
            body.backward_graph({"grad": grad}, other)
    assert body.backward_graph({"grad": grad}, GraphKey("trainer", "s", 0))[1] is BackwardGraph.KEPT


def test_the_memory_plan_estimates_what_a_kept_graph_holds():
    server = ServerConfig()
    per_token = kept_graph_bytes_per_token(MODEL, BODY, BoundaryConfig(), server, SEED)
    stage = meta_stage(MODEL, BODY, BoundaryConfig(), server, SEED)
    peak_per_token = measure_micro_batch(stage, 1, MODEL.max_seq_len, MODEL.hidden_size, torch.float32) / MODEL.max_seq_len
    # more than the input and output of the stage in float32, and what the forward and backward hold at their peak
    assert 2 * MODEL.hidden_size * 4 < per_token <= peak_per_token
