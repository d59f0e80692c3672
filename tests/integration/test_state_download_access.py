"""A worker sends its stage's weights only to peers announced on that stage: in a run with a
coordinator the DHT takes such an announcement only from a worker admitted to the stage."""

from __future__ import annotations

import asyncio

import torch
from hivemind.utils import get_dht_time

from agora_server.optim.averaging import AveragingConfig
from agora_server.wire import ServerPhase, StageServerInfo, stage_key
from tests.helpers.admitted_peers import RUN, body1_averagers


def test_the_stages_weights_go_only_to_peers_announced_on_it(tmp_path, rpc_loop):
    config = AveragingConfig(fraction=0.5, average_every=4, matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=1.0)
    # the sharer and a newcomer of body1, and a worker of head asking for body1's weights
    with body1_averagers(tmp_path, ["body1", "body1", "head"], config) as (dhts, averagers, _):
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

    newcomer = dhts[1].peer_id.to_base58()
    info = StageServerInfo(stage="body1", phase=ServerPhase.CATCHING_UP, throughput=0.0, max_batch_size=8, wire_dtype="float32")
    assert dhts[1].store(stage_key(RUN, "body1"), subkey=newcomer, value=info.to_record(), expiration_time=get_dht_time() + 60)
    state = download(1, attempts=5)
    assert state is not None, "the newcomer announced on the stage got nothing"
    metadata, tensors = state
    assert metadata == {"epoch": 12} and torch.equal(tensors[0], weights)
