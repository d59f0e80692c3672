"""A newcomer downloads its stage's weights from a real peer (hivemind DHTs on 127.0.0.1, in one
process): progress as the bytes arrive, bfloat16 on the wire when the run says so, the shapes checked."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from agora_server.optim.averaging import AveragingConfig, SpartaAverager

CONFIG = AveragingConfig(fraction=0.5, average_every=4, matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=1.0)


@pytest.fixture
def rpc_loop():
    """The worker's RPC loop: an event loop on a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


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
    assert metadata == {"epoch": 12}
    wire = torch.float32 if state_dtype == "float32" else torch.bfloat16
    assert [t.dtype for t in tensors] == [wire, wire]
    assert all(torch.equal(t, w.to(wire)) for t, w in zip(tensors, weights))
    total = sum(w.numel() for w in weights) * wire.itemsize
    assert progress and all(p.bytes_total == total for p in progress)
    done = [p.bytes_done for p in progress]
    assert done == sorted(done) and done[-1] >= 0.9 * total
