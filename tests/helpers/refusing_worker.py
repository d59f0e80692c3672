"""A dishonest worker for tests: it announces itself on a stage with a huge throughput and answers
every forward and backward call with a refusal. Run as a process of its own:

    python -m tests.helpers.refusing_worker --run RUN --stage body1 --initial_peers MADDR...

It prints one JSON line ``{"event": "refusing_worker_ready", "peer_id": ..., "calls": ...}`` once announced
and a line ``{"event": "refused", "calls": n}`` per refused call, and runs until it is terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--initial_peers", nargs="+", required=True)
    parser.add_argument("--claimed_throughput", type=float, default=1e9)
    args = parser.parse_args()
    asyncio.run(serve(args))


async def serve(args) -> None:
    from hivemind import DHT
    from hivemind.proto import runtime_pb2
    from hivemind.utils import get_dht_time

    from agora_server.wire import Rpc, ServerPhase, StageServerInfo, handler_name, pack_error, stage_key

    dht = DHT(initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    p2p = await dht.replicate_p2p()
    calls = 0

    async def refuse(requests, _context):
        nonlocal calls
        async for _ in requests:  # read the whole request, as an honest worker would
            pass
        calls += 1
        print(json.dumps({"event": "refused", "calls": calls}), flush=True)
        yield runtime_pb2.ExpertResponse(metadata=pack_error("refused: this worker refuses everything"))

    for rpc in (Rpc.FORWARD, Rpc.BACKWARD):
        await p2p.add_protobuf_handler(handler_name(args.run, rpc), refuse, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)
    peer_id = dht.peer_id.to_base58()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    started, ready = time.time(), False
    while not stop.is_set():
        info = StageServerInfo(stage=args.stage, phase=ServerPhase.ONLINE, throughput=args.claimed_throughput,
                               max_batch_size=8, wire_dtype="float32", started_at=started)
        dht.store(stage_key(args.run, args.stage), subkey=peer_id, value=info.to_record(), expiration_time=get_dht_time() + 6)
        if not ready:
            ready = True
            print(json.dumps({"event": "refusing_worker_ready", "peer_id": peer_id}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except asyncio.TimeoutError:
            pass
    dht.shutdown()


if __name__ == "__main__":
    main()
