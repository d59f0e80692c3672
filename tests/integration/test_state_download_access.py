"""A worker sends its stage's weights only to peers announced on that stage: in a run with a
coordinator the DHT takes such an announcement only from a worker admitted to the stage."""

from __future__ import annotations

import asyncio

import torch

from agora_server.optim.averaging import MAX_CONCURRENT_STATE_DOWNLOADS, AveragingConfig
from agora_server.wire import stage_key
from tests.helpers.admitted_peers import RUN, body1_averagers
from tests.helpers.dishonest_participant import announce, open_state_downloads
from tests.helpers.polling import wait_until

CONFIG = AveragingConfig(fraction=0.5, average_every=4, matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=1.0)


def test_the_stages_weights_go_only_to_peers_announced_on_it(tmp_path, rpc_loop):
    # the sharer and a newcomer of body1, and a worker of head asking for body1's weights
    with body1_averagers(tmp_path, ["body1", "body1", "head"], CONFIG) as (dhts, averagers, _):
        p2ps = [asyncio.run_coroutine_threadsafe(dht.replicate_p2p(), rpc_loop).result(30) for dht in dhts]
        try:
            assert_weights_go_only_to_the_announced(dhts, averagers, p2ps, rpc_loop)
        finally:
            for p2p in p2ps:
                asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)


def assert_weights_go_only_to_the_announced(dhts, averagers, p2ps, rpc_loop) -> None:
    weights = torch.arange(40, dtype=torch.float32)
    averagers[0].share_state(lambda: ({"epoch": 12}, [weights]))

    def download(index: int, attempts: int):
        return averagers[index].download_state(p2ps[index], rpc_loop, lambda progress: None, attempts=attempts, pause=0.5)

    outsider = download(2, attempts=2)
    assert outsider is None, "a worker of another stage got body1's weights"
    unannounced = download(1, attempts=2)
    assert unannounced is None, "a peer not announced on the stage got its weights"

    assert announce(dhts[1], RUN, "body1")
    state = download(1, attempts=5)
    assert state is not None, "the newcomer announced on the stage got nothing"
    metadata, tensors = state
    assert metadata["epoch"] == 12 and torch.equal(tensors[0], weights)


def test_a_peer_of_the_stage_gets_only_a_few_downloads_at_once(tmp_path, rpc_loop):
    with body1_averagers(tmp_path, ["body1", "body1"], CONFIG) as (dhts, averagers, _):
        # larger than the buffers between two peers: a download that is not read stays open
        averagers[0].share_state(lambda: ({"epoch": 3}, [torch.zeros(8 * 2**20)]))
        assert announce(dhts[1], RUN, "body1")
        p2p = asyncio.run_coroutine_threadsafe(dhts[1].replicate_p2p(), rpc_loop).result(30)
        try:
            opened = open_state_downloads(p2p, dhts[0].peer_id, stage_key(RUN, "body1"), count=12, hold=0.5)
            served = asyncio.run_coroutine_threadsafe(opened, rpc_loop).result(60)
            assert served == MAX_CONCURRENT_STATE_DOWNLOADS, f"{served} of 12 downloads opened at once were served"

            def one_more() -> int:  # the closed downloads' places free up as the peer sees them closed
                opened = open_state_downloads(p2p, dhts[0].peer_id, stage_key(RUN, "body1"), count=1, hold=0)
                return asyncio.run_coroutine_threadsafe(opened, rpc_loop).result(60)

            assert wait_until(one_more, timeout=10) == 1, "the downloads kept their places after they were closed"
        finally:
            asyncio.run_coroutine_threadsafe(p2p.shutdown(), rpc_loop).result(30)
