"""A live worker process answers correct requests exactly like the local model, refuses every
malformed one with a clear message, and keeps serving afterwards."""

import asyncio

import pytest
import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from agora_server.models import PipelineStage, build_boundary_codec
from agora_server.pipeline.remote import StageCaller, StageRefused
from agora_server.telemetry import events as ev
from agora_server.tensor_stream import serialize
from agora_server.wire import RequestMeta, Rpc, answer_parts, handler_name, unpack_boundary
from tests.helpers.worker_rpc import find_worker, packed, send_raw, valid_inputs


@pytest.fixture
def body_worker(swarm_harness):
    swarm = swarm_harness.create(workers={"head": 0, "body1": 1, "tail": 0})
    swarm.start(trainer=False)
    assert swarm.wait_for("body1#0", ev.ServerStarted, timeout=120)
    dht = DHT(initial_peers=swarm.seed_maddrs, client_mode=True, start=True)
    try:
        yield swarm.config, dht
    finally:
        dht.shutdown()


def malformed_requests(config):
    tokens, values = valid_inputs(config)
    nan = values.clone()
    nan[0, 0, 0] = float("nan")
    big, d = config.server.max_batch_size + 1, config.model.hidden_size
    return {
        "wrong dtype": ([packed(values, tokens).to(torch.int32)], "int32"),
        "wrong rank": ([packed(values, tokens)[0]], "rank 2"),
        "wrong shape": ([packed(values[:, :, :-1], tokens)], "expected [2, 16, 129]"),
        "oversize batch": ([packed(torch.zeros(big, 16, d), torch.zeros(big, 16, dtype=torch.long))], f"batch size {big}"),
        "oversize sequence": ([packed(torch.zeros(1, 999, d), torch.zeros(1, 999, dtype=torch.long))], "sequence length 999"),
        "NaN": ([packed(nan, tokens)], "NaN or Inf"),
        "Inf": ([packed(values.masked_fill(values > 2, float("inf")), tokens)], "NaN or Inf"),
        "token out of range": ([packed(values, tokens + config.model.vocab_size)], "outside"),
        "extra tensor": ([packed(values, tokens), tokens], "takes 1 tensors"),
    }


def test_worker_validates_requests_and_keeps_serving(body_worker):
    config, dht = body_worker
    spec = config.stage("body1")
    local = PipelineStage(config.model, spec, build_boundary_codec(config.boundary, config.model, config.seed), config.seed)

    async def scenario():
        peer = await find_worker(dht, config)
        p2p = await dht.replicate_p2p()
        caller = StageCaller(p2p, config.run_name, torch.float32, config.boundary_width)
        tokens, values = valid_inputs(config)
        boundary = packed(values, tokens)
        call = lambda tensors, stage="body1": caller.call(peer, stage, spec.kind, Rpc.FORWARD, tensors, timeout=30)

        (remote,) = await call([boundary])
        remote_values, remote_ids = unpack_boundary(remote, config.boundary_width)
        with torch.no_grad():
            expected = local(tokens, values)
        assert torch.equal(remote_ids, tokens), "token ids must come back bit-exact"
        assert torch.allclose(remote_values, expected, atol=1e-5), "remote forward differs from the same stage run locally"

        refusals = {}
        for name, (tensors, message) in malformed_requests(config).items():
            with pytest.raises(StageRefused) as err:
                await call(tensors)
            refusals[name] = str(err.value)
            assert message in str(err.value), f"{name}: {err.value}"
            (again,) = await call([boundary])  # the worker is still serving
            assert torch.allclose(again, remote, atol=1e-5)

        with pytest.raises(StageRefused, match="serves stage 'body1', not 'tail'"):
            await call([boundary], stage="tail")

        parts = serialize([tokens, torch.randn(600, 1024)])
        forward = RequestMeta(config.run_name, "body1", Rpc.FORWARD).pack()
        truncated, _ = await send_raw(p2p, peer, config.run_name, "body1", Rpc.FORWARD, forward, parts[:-1])
        assert truncated is not None and "truncated" in truncated
        garbage, _ = await send_raw(p2p, peer, config.run_name, "body1", Rpc.FORWARD, forward, [runtime_pb2.Tensor(buffer=b"\x00" * 10, dtype="float32", size=[999, 999])])
        assert garbage is not None and "could not be decoded" in garbage

        (final,) = await call([boundary])
        assert torch.allclose(final, remote, atol=1e-5)
        await p2p.shutdown()
        return refusals

    refusals = asyncio.run(scenario())
    assert len(refusals) == len(malformed_requests(config))


def test_the_worker_leaves_closing_the_stream_to_its_caller(body_worker):
    """A stream the worker closed right after its answer sometimes lost the answer between the p2p daemons
    (the trainer saw "the connection closed before the worker answered"): the caller closes it instead."""
    config, dht = body_worker

    async def scenario():
        peer = await find_worker(dht, config)
        p2p = await dht.replicate_p2p()
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), handler_name(config.run_name, Rpc.FORWARD))
        tokens, values = valid_inputs(config)
        parts = serialize([packed(values, tokens)])
        meta = RequestMeta(config.run_name, "body1", Rpc.FORWARD).pack()
        await P2P.send_protobuf(runtime_pb2.ExpertRequest(uid="body1", tensors=parts[:1], metadata=meta), writer)
        for part in parts[1:]:
            await P2P.send_protobuf(runtime_pb2.ExpertRequest(tensors=[part]), writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        first, _ = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
        declared, received = answer_parts(first.metadata), len(first.tensors)
        while declared is not None and received < declared:
            message, _ = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
            received += len(message.tensors)
        try:  # the whole answer is in: nothing more comes, and the stream stays open until this side closes it
            await asyncio.wait_for(reader.readexactly(1), 2.0)
            after_answer = "more data"
        except asyncio.TimeoutError:
            after_answer = "open"
        except asyncio.IncompleteReadError:
            after_answer = "closed by the worker"
        writer.close()
        (again,) = await StageCaller(p2p, config.run_name, torch.float32, config.boundary_width).call(
            peer, "body1", config.stage("body1").kind, Rpc.FORWARD, [packed(values, tokens)], timeout=30)
        await p2p.shutdown()
        return declared, received, after_answer, again

    declared, received, after_answer, again = asyncio.run(scenario())
    assert declared == received == 1, (declared, received)
    assert after_answer == "open"
    assert again.shape[:2] == (2, 16), "the worker serves on"
