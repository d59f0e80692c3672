"""A dishonest worker for tests and ``bench/abuse.py``: it announces itself on a stage with a huge
throughput and answers every forward and backward call with a refusal. Run as a process of its own:

    python -m tests.helpers.refusing_worker --run RUN --stage body1 --initial_peers MADDR...
    AGORA_TOKEN=... python -m tests.helpers.refusing_worker --config RUN.yaml --coordinator URL --identity_path KEY --initial_peers MADDR...

The second joins the run's coordinator first, as any participant's node, and serves the stage it is
given, its DHT records signed with its access. It prints one JSON line ``{"event":
"refusing_worker_ready", "peer_id": ..., "stage": ...}`` once announced and a line ``{"event": "refused",
"calls": n}`` per refused call, and runs until it is terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from agora.peer_options import TOKEN_ENV

ROOT = Path(__file__).resolve().parents[2]


class RefusingWorker:
    """The refusing worker as a process of its own, its JSON lines read as they come."""

    def __init__(self, args: list[str], token: str | None = None):
        """``args``: the command line's options; ``token``: the participant's, passed in the environment."""
        env = dict(os.environ, **({TOKEN_ENV: token} if token else {}))
        self.popen = subprocess.Popen([sys.executable, "-m", "tests.helpers.refusing_worker", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.ready: dict | None = None
        self.refused = 0
        self._announced = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event["event"] == "refusing_worker_ready":
                self.ready = event
                self._announced.set()
            elif event["event"] == "refused":
                self.refused = event["calls"]
        self._announced.set()  # it exited: nobody waits for an announcement that cannot come

    def wait_ready(self, timeout: float) -> dict:
        """Its ready line (peer id, stage); AssertionError if it exited or took longer."""
        self._announced.wait(timeout)
        assert self.ready is not None, f"the refusing worker did not announce itself within {timeout:.0f}s (exit code {self.popen.poll()})"
        return self.ready

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(5)


@contextlib.contextmanager
def refusing_worker(args: list[str], token: str | None = None) -> Iterator[RefusingWorker]:
    """A running refusing worker, stopped on the way out whatever happened."""
    worker = RefusingWorker(args, token)
    try:
        yield worker
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", help="without a coordinator: the run's name")
    parser.add_argument("--stage", help="without a coordinator: the stage to announce")
    parser.add_argument("--config", help="with a coordinator: the run config")
    parser.add_argument("--coordinator", help="the run's coordinator; the participant's token comes from AGORA_TOKEN")
    parser.add_argument("--identity_path", help="with a coordinator: the node's key file")
    parser.add_argument("--initial_peers", nargs="+", required=True)
    parser.add_argument("--claimed_throughput", type=float, default=1e9)
    args = parser.parse_args()
    asyncio.run(serve(args))


def start_dht(args) -> tuple[object, str, str]:
    """(the DHT, the run, the stage): admitted by the coordinator when there is one."""
    from hivemind import DHT

    if args.coordinator is None:
        return DHT(initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True), args.run, args.stage
    from agora.config import load_run_config
    from tests.helpers import dishonest_participant

    config = load_run_config(args.config)
    node = dishonest_participant.admit_node(config, args.coordinator, os.environ[TOKEN_ENV], Path(args.identity_path))
    node.close()  # a refusing worker sends no heartbeats: its access lasts as long as the coordinator grants it
    return dishonest_participant.start_dht(node, Path(args.identity_path), args.initial_peers), config.run_name, node.stage


async def serve(args) -> None:
    from hivemind.proto import runtime_pb2

    from tests.helpers.dishonest_participant import announce
    from agora_server.wire import Rpc, ServerPhase, handler_name, pack_error

    dht, run, stage = start_dht(args)
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
        await p2p.add_protobuf_handler(handler_name(run, rpc), refuse, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)
    peer_id = dht.peer_id.to_base58()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ready = False
    while not stop.is_set():
        announce(dht, run, stage, ServerPhase.ONLINE, throughput=args.claimed_throughput, lifetime=6)
        if not ready:
            ready = True
            print(json.dumps({"event": "refusing_worker_ready", "peer_id": peer_id, "stage": stage}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except asyncio.TimeoutError:
            pass
    dht.shutdown()


if __name__ == "__main__":
    main()
