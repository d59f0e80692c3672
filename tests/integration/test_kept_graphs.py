"""A live body worker keeps the graph of a training forward for its caller and runs the backward on it
when sent the gradient alone; a backward whose graph it does not hold is answered "graph gone" (no
failure), and sent again with its inputs completes by recomputing the forward."""

import asyncio

import pytest
import torch
from hivemind import DHT

from agora_server.models import PipelineStage, build_boundary_codec
from agora_server.pipeline.remote import StageCaller, StageGraphGone, StageRefused
from agora_server.telemetry import events as ev
from agora_server.wire import BackwardGraph, GraphUse, Rpc
from tests.helpers.worker_rpc import find_worker, packed, valid_inputs


@pytest.fixture
def workers(swarm_harness):
    swarm = swarm_harness.create(workers={"head": 0, "body1": 1, "tail": 1})
    swarm.start(trainer=False)
    for name in ("body1#0", "tail#0"):
        assert swarm.wait_for(name, ev.ServerStarted, timeout=120)
    dht = DHT(initial_peers=swarm.seed_maddrs, client_mode=True, start=True)
    try:
        yield swarm, dht
    finally:
        dht.shutdown()


def test_a_backward_runs_on_the_kept_graph_or_is_sent_again_with_its_inputs(workers):
    swarm, dht = workers
    config = swarm.config
    spec = config.stage("body1")
    local = PipelineStage(config.model, spec, build_boundary_codec(config.boundary, config.model, config.seed), config.seed)
    tokens, values = valid_inputs(config)
    grad = torch.randn(*tokens.shape, config.boundary_width, generator=torch.Generator().manual_seed(7)) * 1e-2
    boundary = values.clone().requires_grad_(True)
    local(tokens, boundary).backward(grad)  # the worker's weights are the seed's until its first step

    async def scenario():
        peer = await find_worker(dht, config)
        tail = await find_worker(dht, config, "tail")
        p2p = await dht.replicate_p2p()
        caller = StageCaller(p2p, config.run_name, torch.float32, config.boundary_width)

        def call(rpc, tensors, microbatch, graph, session="s1", stage="body1", to=peer):
            return caller.request(to, stage, config.stage(stage).kind, rpc, tensors, timeout=60, microbatch=microbatch,
                                  graph=graph, session=session, batch_shape=tokens.shape)

        inputs = [packed(values, tokens)]
        assert (await call(Rpc.FORWARD, inputs, 1, GraphUse.KEEP)).kept, "the answer says the graph waits there"
        kept = await call(Rpc.BACKWARD, [grad], 1, GraphUse.KEPT)
        assert kept.graph is BackwardGraph.KEPT
        assert torch.allclose(kept.outputs[0], boundary.grad, atol=1e-5), "the kept graph's input gradient is the local one"

        with pytest.raises(StageGraphGone):  # taken by the backward above
            await call(Rpc.BACKWARD, [grad], 1, GraphUse.KEPT)
        assert not (await call(Rpc.FORWARD, inputs, 2, GraphUse.NONE)).kept  # an evaluation forward keeps nothing
        with pytest.raises(StageGraphGone):
            await call(Rpc.BACKWARD, [grad], 2, GraphUse.KEPT)
        await call(Rpc.FORWARD, inputs, 3, GraphUse.KEEP)
        with pytest.raises(StageGraphGone):  # a restarted trainer's session does not reach the old one's graphs
            await call(Rpc.BACKWARD, [grad], 3, GraphUse.KEPT, session="s2")
        resent = await call(Rpc.BACKWARD, [*inputs, grad], 2, GraphUse.NONE)
        assert resent.graph is BackwardGraph.RECOMPUTED
        on_kept = await call(Rpc.BACKWARD, [*inputs, grad], 3, GraphUse.NONE)  # sent with inputs, the graph is still used
        assert on_kept.graph is BackwardGraph.KEPT

        with pytest.raises(StageRefused, match="tail keeps no graph"):
            await call(Rpc.FORWARD, [inputs[0], tokens], 4, GraphUse.KEEP, stage="tail", to=tail)
        with pytest.raises(StageRefused, match="for a forward, not a backward"):
            await call(Rpc.BACKWARD, [*inputs, grad], 4, GraphUse.KEEP)
        await p2p.shutdown()

    asyncio.run(scenario())
    stats = swarm.wait_for("body1#0", ev.WorkerStats, lambda e: e.kept_graph_backwards == 2, timeout=60)
    assert stats is not None and stats.recomputed_backwards == 1 and stats.graphs_held == 0
