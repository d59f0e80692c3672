"""Fixtures that run real swarms on 127.0.0.1 and always take them down, even when a test fails; the
swarm helpers themselves are in ``tests/helpers/swarms.py``."""

import asyncio
import threading

import pytest
from hivemind import DHT

from tests.helpers.swarms import SwarmHarness


@pytest.fixture
def dhts():
    """Two DHT nodes on 127.0.0.1, the second bootstrapped from the first."""
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(m) for m in first.get_visible_maddrs()])
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.fixture
def rpc_loop():
    """The worker's RPC loop: an event loop on a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def swarm_harness(tmp_path):
    harness = SwarmHarness(tmp_path)
    try:
        yield harness
    finally:
        leftovers = harness.stop_all()
        assert not leftovers, f"processes left running: {leftovers}"
