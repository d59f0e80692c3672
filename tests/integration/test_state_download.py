"""A newcomer downloads its stage's weights from real peers (hivemind DHTs and averagers on 127.0.0.1,
each in a process of its own): progress as the bytes arrive, bfloat16 on the wire when the run says so,
the shapes checked, and a dropped download continued from the parts already received."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind import DHT

from agora_server.optim.averaging import AveragingConfig, SpartaAverager
from agora_server.optim.state_download import state_digest

CONFIG = AveragingConfig(fraction=0.5, average_every=4, matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=1.0)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_a_newcomer_downloads_the_stage_weights_with_progress(dhts, rpc_loop, state_dtype):
    config = CONFIG.model_copy(update={"state_dtype": state_dtype})
    weights = [torch.randn(1024, 1024), torch.randn(3000)]
    compute = ThreadPoolExecutor(max_workers=1)
    serving = SpartaAverager(dhts[0], "test.body1", weights, config, seed=7, on_compute=compute.submit)
    newcomer = SpartaAverager(dhts[1], "test.body1", [torch.zeros_like(w) for w in weights], config, seed=7, on_compute=compute.submit)
    try:
        serving.share_state(lambda: ({"epoch": 12}, [w.clone() for w in weights]))
        p2p = asyncio.run_coroutine_threadsafe(dhts[1].replicate_p2p(), rpc_loop).result(30)
        progress = []
        try:
            state = newcomer.download_state(p2p, rpc_loop, progress.append, attempts=10, pause=0.5, progress_every=0.0)
        finally:
            asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)
    finally:
        newcomer.shutdown()
        serving.shutdown()
        compute.shutdown()

    assert state is not None
    metadata, tensors = state
    wire = torch.float32 if state_dtype == "float32" else torch.bfloat16
    assert metadata["epoch"] == 12 and metadata["digest"] == state_digest([w.to(wire) for w in weights])
    assert [t.dtype for t in tensors] == [wire, wire]
    assert all(torch.equal(t, w.to(wire)) for t, w in zip(tensors, weights))
    total = sum(w.numel() for w in weights) * wire.itemsize
    assert progress and all(p.bytes_total == total for p in progress)
    done = [p.bytes_done for p in progress]
    assert done == sorted(done) and done[-1] >= 0.9 * total


def _serving(dht, weights, epoch, compute):
    averager = SpartaAverager(dht, "test.body1", weights, CONFIG, seed=7, on_compute=compute.submit)
    averager.share_state(lambda: ({"epoch": epoch}, [w.clone() for w in weights]))
    return averager


def _fetch(p2p, loop, peers, weights, partial, on_progress):
    from agora_server.optim.averaging import _StageStateAverager, averager_prefix
    from agora_server.optim.state_download import fetch_state

    stub_of = lambda p2p, peer: _StageStateAverager.get_stub(p2p, peer, namespace=averager_prefix("test.body1"))  # noqa: E731
    total = sum(w.numel() for w in weights) * 4
    fetch = fetch_state(p2p, stub_of, peers, [w.shape for w in weights], total, deadline=60.0, chunk_timeout=2.0,
                        on_progress=on_progress, progress_every=0.0, partial=partial)
    return asyncio.run_coroutine_threadsafe(fetch, loop).result(90)


@pytest.fixture
def three_dhts(dhts):
    third = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(m) for m in dhts[0].get_visible_maddrs()])
    yield (*dhts, third)
    third.shutdown()


def test_a_dropped_download_continues_from_the_parts_received_at_another_peer_of_the_same_epoch(three_dhts, rpc_loop):
    from agora_server.optim.state_download import PartialState

    first, second, newcomer_dht = three_dhts
    weights = [torch.randn(1024, 1024), torch.randn(2048, 1024), torch.randn(3000)]
    total = sum(w.numel() for w in weights) * 4
    compute = ThreadPoolExecutor(max_workers=1)
    peers = [_serving(first, weights, 12, compute), _serving(second, weights, 12, compute)]
    partial, progress = PartialState(), []
    try:
        p2p = asyncio.run_coroutine_threadsafe(newcomer_dht.replicate_p2p(), rpc_loop).result(30)
        try:
            def cut_after_five_mib(update):
                progress.append(update)
                if update.bytes_done >= 5 * 2**20:
                    raise ConnectionResetError("the link dropped")  # as a broken stream would, mid-tensor

            assert _fetch(p2p, rpc_loop, [peers[0].averager.peer_id], weights, partial, cut_after_five_mib) is None
            kept = partial.received
            assert 5 * 2**20 <= kept < total and len(partial.tensors) == 1, "the first tensor whole, the second begun"
            progress.clear()
            state = _fetch(p2p, rpc_loop, [peers[1].averager.peer_id], weights, partial, progress.append)
        finally:
            asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)
    finally:
        for averager in peers:
            averager.shutdown()
        compute.shutdown()

    assert state is not None
    metadata, tensors = state
    assert metadata["epoch"] == 12
    assert all(torch.equal(t, w) for t, w in zip(tensors, weights)), "the joined parts are the weights, bit for bit"
    assert partial.resumes == 1
    assert progress[0].resumed_at == kept and progress[0].peer_id == str(peers[1].averager.peer_id)
    assert all(p.resumed_at == kept for p in progress)


@pytest.mark.parametrize("other_epoch", [13, 12], ids=["moved-on", "same-epoch-averaged-apart"])
def test_a_peer_holding_another_state_sends_it_from_the_start(three_dhts, rpc_loop, other_epoch):
    """At another epoch, or at the same one with other weights (SPARTA workers of one epoch never hold
    the same weights): the state's metadata (its digest) differs, so nothing of the first is continued."""
    from agora_server.optim.state_download import PartialState

    first, second, newcomer_dht = three_dhts
    weights = [torch.randn(1024, 1024), torch.randn(2048, 1024)]
    other = [w + 0.5 for w in weights]
    compute = ThreadPoolExecutor(max_workers=1)
    peers = [_serving(first, weights, 12, compute), _serving(second, other, other_epoch, compute)]
    partial = PartialState()
    try:
        p2p = asyncio.run_coroutine_threadsafe(newcomer_dht.replicate_p2p(), rpc_loop).result(30)
        try:
            def cut_after_two_mib(update):
                if update.bytes_done >= 2 * 2**20:
                    raise ConnectionResetError("the link dropped")

            assert _fetch(p2p, rpc_loop, [peers[0].averager.peer_id], weights, partial, cut_after_two_mib) is None
            assert partial.received >= 2 * 2**20
            state = _fetch(p2p, rpc_loop, [peers[1].averager.peer_id], weights, partial, lambda update: None)
        finally:
            asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)
    finally:
        for averager in peers:
            averager.shutdown()
        compute.shutdown()

    assert state is not None and state[0]["epoch"] == other_epoch
    assert all(torch.equal(t, w) for t, w in zip(state[1], other)), "no parts of the first peer's state mixed in"
    assert partial.resumes == 0


def test_parts_of_two_different_states_are_caught_by_the_digest_and_the_download_starts_again(three_dhts, rpc_loop, monkeypatch, caplog):
    """A peer that answers a resume as if it held the newcomer's state (same metadata, digest included)
    while it sends other weights: the whole state is checked after its last part."""
    from agora_server.optim import averaging
    from agora_server.optim.state_download import DIGEST_KEY, PartialState

    first, second, newcomer_dht = three_dhts
    weights = [torch.randn(1024, 1024), torch.randn(2048, 1024), torch.randn(3000)]
    other = [w * 2 for w in weights]

    def claims_another_state(self):
        claimed = {"epoch": 12, DIGEST_KEY: state_digest(weights)}
        return claimed, [t.clone() for t in other], [averaging.CompressionInfo.from_tensor(t) for t in other]

    compute = ThreadPoolExecutor(max_workers=1)
    honest = _serving(first, weights, 12, compute)
    with monkeypatch.context() as patched:  # an averager binds the state it serves when it is made
        patched.setattr(averaging._StageStateAverager, "get_current_state", claims_another_state)
        liar = _serving(second, other, 12, compute)
    partial = PartialState()
    try:
        p2p = asyncio.run_coroutine_threadsafe(newcomer_dht.replicate_p2p(), rpc_loop).result(30)
        try:
            def cut_after_five_mib(update):
                if update.bytes_done >= 5 * 2**20:
                    raise ConnectionResetError("the link dropped")

            assert _fetch(p2p, rpc_loop, [honest.averager.peer_id], weights, partial, cut_after_five_mib) is None
            with caplog.at_level("WARNING", logger="agora_server.optim.state_download"):
                state = _fetch(p2p, rpc_loop, [liar.averager.peer_id, honest.averager.peer_id], weights, partial, lambda update: None)
        finally:
            asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)
    finally:
        liar.shutdown()
        honest.shutdown()
        compute.shutdown()

    assert partial.resumes == 1, "the second peer continued the download (its metadata matched)"
    assert any("do not match the checksum" in r.getMessage() and "again from the start" in r.getMessage() for r in caplog.records)
    assert state is not None and state[0]["epoch"] == 12
    assert all(torch.equal(t, w) for t, w in zip(state[1], weights)), "the download started again and took the honest state whole"


def test_downloads_open_at_the_same_time_share_one_copy_of_the_state(dhts, rpc_loop):
    from agora_server.optim.averaging import _StageStateAverager, averager_prefix
    from agora_server.optim.state_download import ResumePoint

    weights = [torch.randn(1024, 1024), torch.randn(3000)]
    copies = []

    def provider():
        copies.append(len(copies))
        return {"epoch": 12}, [w.clone() for w in weights]

    compute = ThreadPoolExecutor(max_workers=1)
    serving = SpartaAverager(dhts[0], "test.body1", weights, CONFIG, seed=7, on_compute=compute.submit)
    serving.share_state(provider)
    p2p = asyncio.run_coroutine_threadsafe(dhts[1].replicate_p2p(), rpc_loop).result(30)
    stub = _StageStateAverager.get_stub(p2p, serving.averager.peer_id, namespace=averager_prefix("test.body1"))

    async def download():
        return await stub.rpc_download_state_from(ResumePoint().to_message())

    async def two_at_once():
        first = (await download()).__aiter__()
        opening = await first.__anext__()  # the first download is open, its copy of the state taken
        second = [message async for message in await download()]
        return [opening, *[message async for message in first]], second

    async def one_more():
        return [message async for message in await download()]

    try:
        first, second = asyncio.run_coroutine_threadsafe(two_at_once(), rpc_loop).result(60)
        assert len(copies) == 1, "the second download, open while the first was, made a copy of its own"
        later = asyncio.run_coroutine_threadsafe(one_more(), rpc_loop).result(60)
    finally:
        asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)
        serving.shutdown()
        compute.shutdown()

    parts = lambda messages: [m.tensor_part.buffer for m in messages]  # noqa: E731
    assert parts(first) == parts(second) and len(first) > 2, "both streamed the same state, whole"
    assert len(copies) == 2 and parts(later) == parts(first), "once both ended, the next download took a fresh copy"
