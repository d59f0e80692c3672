"""What a caller can make a live worker hold is bounded before its access is checked: the first
message's metadata is checked before more is read, and every message counts with its whole size and
as a part, so empty parts cost the caller as much as the worker. Measured as the growth of the worker
processes' peak resident memory (VmHWM), which no later release can hide."""

from __future__ import annotations

import asyncio
import contextlib

import psutil
import pytest
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from agora_server.telemetry import events as ev
from agora_server.tensor_stream import CHUNK_BYTES, serialize
from agora_server.server.handler import MAX_STREAMS_PER_PEER, MAX_UNCHECKED_REQUESTS
from agora_server.wire import SERVICE_NAME, RequestMeta, Rpc, handler_name
from tests.helpers.worker_rpc import find_worker, packed, send_raw, valid_inputs

MiB = 2**20
GROWTH_LIMIT = 64 * MiB


@pytest.fixture
def lone_worker(swarm_harness):
    swarm = swarm_harness.create(workers={"head": 0, "body1": 1, "tail": 0})
    swarm.start(trainer=False)
    assert swarm.wait_for("body1#0", ev.ServerStarted, timeout=120)
    dht = DHT(initial_peers=swarm.seed_maddrs, client_mode=True, start=True)
    try:
        yield swarm, dht
    finally:
        dht.shutdown()


def peak_memory(swarm, name: str) -> int:
    """Sum of the peak resident memory of the worker's processes (its p2p daemon included)."""
    root = psutil.Process(swarm.process(name).popen.pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error, OSError):
            for line in open(f"/proc/{process.pid}/status"):
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


async def stream_at(p2p, peer: str, run: str, meta: RequestMeta, first_parts, more_parts) -> None:
    """Send metadata and ``first_parts``, then ``more_parts`` one message each, as fast as the worker
    takes them; the worker may close the stream at any point (that is the refusal)."""
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), handler_name(run, meta.rpc))
    with contextlib.suppress(ConnectionError, RuntimeError, asyncio.IncompleteReadError):
        await P2P.send_protobuf(runtime_pb2.ExpertRequest(uid=meta.stage, tensors=first_parts, metadata=meta.pack()), writer)
        for part in more_parts:
            await P2P.send_protobuf(runtime_pb2.ExpertRequest(tensors=[part]), writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
    writer.close()


def refusal(swarm, name: str, since: int, says: str) -> ev.RequestRefused | None:
    return swarm.wait_for(name, ev.RequestRefused, lambda e: says in e.reason, timeout=60, since=since)


def test_a_stream_with_wrong_metadata_is_refused_before_its_tensors_are_read(lone_worker):
    swarm, dht = lone_worker
    tokens, values = valid_inputs(swarm.config)
    before, seen = peak_memory(swarm, "body1#0"), swarm.events_sent("body1#0")

    async def attack():
        peer = await find_worker(dht, swarm.config)
        p2p = await dht.replicate_p2p()
        meta = RequestMeta(run="another-run", stage="body1", rpc=Rpc.FORWARD, microbatch=0)
        block = runtime_pb2.Tensor(buffer=bytes(CHUNK_BYTES))
        await stream_at(p2p, peer, swarm.config.run_name, meta, serialize([packed(values, tokens)])[:1],
                        (block for _ in range(512)))  # 512 MiB behind metadata that names another run

    asyncio.run(attack())
    assert refusal(swarm, "body1#0", seen, "another-run"), "the worker never refused the stream"
    grown = peak_memory(swarm, "body1#0") - before
    assert grown < GROWTH_LIMIT, f"the worker's peak memory grew by {grown / MiB:.0f} MiB"


def test_empty_parts_count_and_their_number_is_capped(lone_worker):
    swarm, dht = lone_worker
    tokens, values = valid_inputs(swarm.config)
    before, seen = peak_memory(swarm, "body1#0"), swarm.events_sent("body1#0")

    async def attack():
        peer = await find_worker(dht, swarm.config)
        p2p = await dht.replicate_p2p()
        meta = RequestMeta(run=swarm.config.run_name, stage="body1", rpc=Rpc.FORWARD, microbatch=0)
        empty = runtime_pb2.Tensor()
        await stream_at(p2p, peer, swarm.config.run_name, meta, serialize([packed(values, tokens)]),
                        (empty for _ in range(300_000)))
        # its cheap RPC still answers at once
        started = asyncio.get_running_loop().time()
        info = await p2p.call_protobuf_handler(PeerID.from_base58(peer), f"{swarm.config.run_name}::{SERVICE_NAME}.rpc_info",
                                               runtime_pb2.ExpertUID(uid="body1"), runtime_pb2.ExpertInfo)
        return asyncio.get_running_loop().time() - started, info

    info_seconds, info = asyncio.run(attack())
    assert refusal(swarm, "body1#0", seen, "parts"), "the worker never refused the stream of empty parts"
    assert info.serialized_info and info_seconds < 2.0, info_seconds
    grown = peak_memory(swarm, "body1#0") - before
    assert grown < GROWTH_LIMIT, f"the worker's peak memory grew by {grown / MiB:.0f} MiB"


def test_a_frame_declaring_more_than_the_stated_maximum_is_not_read(lone_worker):
    swarm, dht = lone_worker
    before = peak_memory(swarm, "body1#0")

    async def attack():
        peer = await find_worker(dht, swarm.config)
        p2p = await dht.replicate_p2p()
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer),
                                                                 handler_name(swarm.config.run_name, Rpc.FORWARD))
        # a frame that declares 2 GiB, then 256 MiB of it: hivemind's framing used to read it all
        writer.write(P2P.MESSAGE_MARKER + (2 * 2**30).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        block, sent = bytes(MiB), 0
        with contextlib.suppress(ConnectionError, RuntimeError):
            for _ in range(256):
                writer.write(block)
                await writer.drain()
                sent += 1
        writer.close()
        # the worker dropped that stream and serves on
        info = await p2p.call_protobuf_handler(PeerID.from_base58(peer), f"{swarm.config.run_name}::{SERVICE_NAME}.rpc_info",
                                               runtime_pb2.ExpertUID(uid="body1"), runtime_pb2.ExpertInfo)
        return sent, info

    sent, info = asyncio.run(attack())
    assert info.serialized_info
    grown = peak_memory(swarm, "body1#0") - before
    assert grown < GROWTH_LIMIT, f"the worker's peak memory grew by {grown / MiB:.0f} MiB after {sent} MiB of one frame"
    assert swarm.process("body1#0").popen.poll() is None


def test_one_peer_gets_only_so_many_open_requests(lone_worker):
    swarm, dht = lone_worker
    tokens, values = valid_inputs(swarm.config)
    opened, seen = MAX_STREAMS_PER_PEER + 8, swarm.events_sent("body1#0")

    def over_the_limit(event: ev.RequestRefused) -> bool:
        return "open at once" in event.reason

    def refused_over_the_limit() -> int:
        return len([e for e in swarm.events_of("body1#0", ev.RequestRefused, since=seen) if over_the_limit(e)])

    async def attack():
        peer = await find_worker(dht, swarm.config)
        p2p = await dht.replicate_p2p()
        meta = RequestMeta(run=swarm.config.run_name, stage="body1", rpc=Rpc.FORWARD, microbatch=0)
        first = runtime_pb2.ExpertRequest(uid="body1", metadata=meta.pack(), tensors=serialize([packed(values, tokens)])[:1])
        writers = []
        for _ in range(opened):  # each sends its first message and never ends its request
            _, _reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer),
                                                                      handler_name(swarm.config.run_name, Rpc.FORWARD))
            with contextlib.suppress(ConnectionError):  # one over the limit may be refused and closed already
                await P2P.send_protobuf(first, writer)
            writers.append(writer)
        # the requests over the limit are refused at once, while the others are still open (one of
        # those may have been dropped meanwhile on a loaded machine, which frees its place)
        refused = await asyncio.get_running_loop().run_in_executor(
            None, lambda: swarm.wait_for("body1#0", ev.RequestRefused, over_the_limit, timeout=60, since=seen, count=6))
        for writer in writers:
            writer.close()
        return refused

    assert asyncio.run(attack()) is not None, f"refused over the limit: {refused_over_the_limit()} of 8"
    assert 6 <= refused_over_the_limit() <= 8
    assert swarm.process("body1#0").popen.poll() is None


def test_many_peer_ids_get_only_so_many_unchecked_requests_at_once(lone_worker):
    swarm, dht = lone_worker
    tokens, values = valid_inputs(swarm.config)
    per_peer, seen = 24, swarm.events_sent("body1#0")  # under the per-peer limit: only the limit over all peers bites
    strangers = [DHT(initial_peers=swarm.seed_maddrs, client_mode=True, start=True) for _ in range(3)]
    over = len(strangers) * per_peer - MAX_UNCHECKED_REQUESTS

    def not_yet_checked(event: ev.RequestRefused) -> bool:
        return "not yet checked" in event.reason

    async def attack():
        peer = await find_worker(dht, swarm.config)
        writers = []
        for stranger in strangers:
            p2p = await stranger.replicate_p2p()
            for _ in range(per_peer):  # each begins a first message of 4 MiB and sends 1 KiB of it
                _, _reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer),
                                                                          handler_name(swarm.config.run_name, Rpc.FORWARD))
                writer.write(P2P.MESSAGE_MARKER + (4 * MiB).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + bytes(1024))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                writers.append(writer)
        refused = await asyncio.get_running_loop().run_in_executor(
            None, lambda: swarm.wait_for("body1#0", ev.RequestRefused, not_yet_checked, timeout=60, since=seen, count=over))
        for writer in writers:
            writer.close()
        # the places free up as the worker sees the streams closed: then a valid request is served again
        p2p = await dht.replicate_p2p()
        meta = RequestMeta(run=swarm.config.run_name, stage="body1", rpc=Rpc.FORWARD, microbatch=0).pack()
        for _ in range(50):
            error, parts = await send_raw(p2p, peer, swarm.config.run_name, "body1", Rpc.FORWARD, meta, serialize([packed(values, tokens)]))
            if error is None or "not yet checked" not in error:
                break
            await asyncio.sleep(0.2)
        return refused, error, parts

    try:
        refused, error, parts = asyncio.run(attack())
    finally:
        for stranger in strangers:
            stranger.shutdown()
    assert refused is not None, "no request over the limit of unchecked requests was refused"
    assert len([e for e in swarm.events_of("body1#0", ev.RequestRefused, since=seen) if not_yet_checked(e)]) == over
    assert error is None and parts, f"the worker did not serve a valid request after the strangers left: {error}"
