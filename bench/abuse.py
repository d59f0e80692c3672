"""Attacks on a running coordinated local swarm, each with the peak memory of its target before,
during and after, and whether it was refused; prints one JSON object.

The swarm: a coordinator, a seed, one worker per stage of local-tiny and a trainer, on 127.0.0.1.
Two attackers: a stranger (no participant token, no access token), and a dishonest participant
("mallory", an account of the coordinator that is no operator) whose nodes are admitted like anyone's
(tests/helpers/dishonest_participant.py, tests/helpers/refusing_worker.py). Each attack runs while a
thread samples the target's resident memory (the process and its children, its p2p daemon and
averager included) every 50 ms. The goal: every attack refused, no target grows by more than
64 MiB, the trainer's completed count rises while the attacks run, no process exits.

The stranger: oversize request bodies to the coordinator (declared, and streamed without a length),
and unauthenticated streams to a worker (one large, one of many empty parts). The participant: forged
heartbeats claiming 2^53 samples and tokens under three sessions (credited only what the elapsed time
allows; /metrics and the dashboard still answer), junk as its stage's checkpoint (random bytes, and a
state of the stage's layout holding NaN), many weight downloads opened at once from the worker of its
stage (a few served, sharing one snapshot), and a worker that refuses every call (banned by the trainer).

Not run here (covered by tests/integration/test_worker_memory_bounds.py): oversize p2p frames, and many
open streams of one peer id or of many.

    .venv/bin/python bench/abuse.py --output bench/results/abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.benchlib import REPO, run_and_print  # noqa: E402

MiB = 2**20
GROWTH_GOAL = 64 * MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--body-mib", type=int, default=256, help="MiB each oversize body or stream offers (default 256)")
    parser.add_argument("--downloads", type=int, default=40, help="weight downloads the participant opens at once (default 40)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    parser.add_argument("--log-dir", type=Path, default=REPO / "logs" / "bench-abuse", help="the swarm's logs")
    return parser.parse_args(argv)


class MemoryWatch:
    """Resident memory of one process tree, sampled in the background while an attack runs."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        import psutil

        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.05)

    def __enter__(self) -> "MemoryWatch":
        self.before = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measured(target: str, pid: int, attack) -> dict:
    with MemoryWatch(pid) as watch:
        started = time.monotonic()
        refused, detail = attack()
        seconds = time.monotonic() - started
    after = watch.rss()
    return {"target": target, "refused": refused, "detail": detail, "seconds": round(seconds, 2),
            "rss_mib": {"before": round(watch.before / MiB, 1), "peak": round(max(watch.peak, after) / MiB, 1),
                        "after": round(after / MiB, 1)},
            "grew_mib": round((max(watch.peak, after) - watch.before) / MiB, 1)}


# --- coordinator -------------------------------------------------------------------------------------------


def oversize_declared_body(url: str, size: int):
    import httpx

    def body():
        block = b" " * MiB
        for _ in range(size // MiB):
            yield block

    try:
        answer = httpx.put(f"{url}/api/join", content=body(), headers={"Content-Length": str(size), "Content-Type": "application/json"},
                           timeout=60)
        return answer.status_code == 413, f"answered {answer.status_code}"
    except httpx.HTTPError as e:  # the coordinator closed the connection after refusing
        return True, f"connection closed after the refusal ({type(e).__name__})"


def oversize_streamed_body(url: str, size: int):
    host, port = url.removeprefix("http://").split(":")
    sent, block, answer = 0, b"x" * MiB, b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"PUT /api/join HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sock.setblocking(False)
        while sent < size and not answer:
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            try:
                sent += sock.send(f"{MiB:x}\r\n".encode() + block + b"\r\n") and MiB
            except BlockingIOError:
                continue
            except OSError:
                break
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return status.startswith("HTTP/1.1 413"), f"{status!r} after {sent // MiB} MiB sent of {size // MiB}"


# --- worker ------------------------------------------------------------------------------------------------


async def _stream(p2p, peer, name, first, more) -> None:
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import runtime_pb2

    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), name)
    with contextlib.suppress(ConnectionError, RuntimeError, asyncio.IncompleteReadError):
        await P2P.send_protobuf(first, writer)
        for part in more:
            await P2P.send_protobuf(runtime_pb2.ExpertRequest(tensors=[part]), writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
    writer.close()


def worker_stream(swarm, dht, peer, size: int, empty_parts: bool):
    from hivemind.proto import runtime_pb2

    from agora_server.telemetry import events as ev
    from agora_server.tensor_stream import CHUNK_BYTES
    from agora_server.wire import RequestMeta, Rpc, handler_name

    seen = swarm.events_sent("body1#0")
    meta = RequestMeta(run=swarm.config.run_name, stage="body1", rpc=Rpc.FORWARD, microbatch=0, access="")
    part = runtime_pb2.Tensor() if empty_parts else runtime_pb2.Tensor(buffer=bytes(CHUNK_BYTES))
    count = 300_000 if empty_parts else size // CHUNK_BYTES

    async def attack():
        p2p = await dht.replicate_p2p()
        first = runtime_pb2.ExpertRequest(uid="body1", metadata=meta.pack(), tensors=[runtime_pb2.Tensor(dtype="float32")])
        await _stream(p2p, peer, handler_name(swarm.config.run_name, Rpc.FORWARD), first, (part for _ in range(count)))

    try:
        asyncio.run(asyncio.wait_for(attack(), 120))
    except asyncio.TimeoutError:
        return False, "the stream could not be opened or did not end within 120 s"
    refusal = swarm.wait_for("body1#0", ev.RequestRefused, timeout=30, since=seen)
    return refusal is not None, refusal.reason if refusal else "no refusal logged within 30 s"


# --- an admitted participant ----------------------------------------------------------------------------


PAGES = ("/metrics", "/dashboard/snapshot", "/api/contributions", "/api/nodes")


def forged_contributions(url: str, node, admitted_at: float):
    import httpx

    from agora.coordinator.config import ContributionConfig
    from tests.helpers.dishonest_participant import forge_heartbeats

    sessions = 3
    claimed = forge_heartbeats(node, sessions)
    # each heartbeat is credited at most the rate over the time since the one before, plus the slack
    limits = ContributionConfig()
    seconds = time.time() - admitted_at + sessions * limits.slack_s
    bound = (limits.max_samples_per_second * seconds, limits.max_tokens_per_second * seconds)
    [record] = [r for r in httpx.get(f"{url}/api/contributions", timeout=30).json() if r["peer_id"] == node.identity.peer_id]
    statuses = {page: httpx.get(f"{url}{page}", timeout=30).status_code for page in PAGES}
    bounded = record["samples"] <= bound[0] and record["tokens"] <= bound[1]
    return bounded and set(statuses.values()) == {200}, (
        f"claimed {claimed:.3g} samples and tokens in {sessions} sessions; credited {record['samples']} samples (bound {bound[0]:.0f})"
        f" and {record['tokens']} tokens (bound {bound[1]:.0f}); {', '.join(f'{p} {c}' for p, c in statuses.items())}")


def junk_checkpoints(url: str, node, config):
    import httpx
    import torch

    from agora.coordinator.checkpoint_check import stage_layouts
    from tests.helpers.dishonest_participant import upload_checkpoint

    layout = stage_layouts(config)[node.stage]
    poisoned = io.BytesIO()
    torch.save({"model": {name: torch.full(shape, float("nan"), dtype=dtype) for name, (shape, dtype) in layout.items()},
                "optimizer": {}, "epoch": 0}, poisoned)
    junk = {"random bytes": os.urandom(16 * MiB), "NaN weights": poisoned.getvalue()}
    refusals = {what: upload_checkpoint(node, content) for what, content in junk.items()}
    current = httpx.get(f"{url}/api/checkpoints/{node.stage}", headers={"Authorization": f"Bearer {node.access.access_token}"}, timeout=60)
    served = hashlib.sha256(current.content).hexdigest() if current.status_code == 200 else None
    kept_out = served not in {hashlib.sha256(content).hexdigest() for content in junk.values()}
    refused = all(refusals.values()) and kept_out
    said = "; ".join(f"{what}: {reason or 'accepted'}" for what, reason in refusals.items())
    return refused, f"{node.stage}'s checkpoint upload by its node: {said}; the stage serves {'no junk' if kept_out else 'the junk'}"


def many_weight_downloads(dht, config, stage: str, peer: str, count: int):
    from hivemind.p2p import PeerID

    from agora_server.optim.averaging import MAX_CONCURRENT_STATE_DOWNLOADS
    from agora_server.wire import stage_key
    from tests.helpers.dishonest_participant import announce, open_state_downloads

    if not announce(dht, config.run_name, stage, lifetime=600):
        return False, f"could not announce itself on {stage}"

    async def attack():
        p2p = await dht.replicate_p2p()

        def downloads(count: int, hold: float):
            return open_state_downloads(p2p, PeerID.from_base58(peer), stage_key(config.run_name, stage), count, hold)

        try:
            # the worker looks the downloader up in the DHT: one download served shows that it sees a peer of the stage
            deadline = time.monotonic() + 60
            while not await downloads(1, 0):
                if time.monotonic() > deadline:
                    return False, f"no download was served within 60 s: the worker did not see the announcement on {stage}"
                await asyncio.sleep(1)
            served = await downloads(count, 3.0)
        finally:
            await p2p.shutdown()
        return 0 < served <= MAX_CONCURRENT_STATE_DOWNLOADS, (
            f"{served} of {count} downloads of {stage}'s weights opened at once and held for 3 s were served"
            f" (limit {MAX_CONCURRENT_STATE_DOWNLOADS}), the others got nothing")

    return asyncio.run(attack())


def refusing_worker(swarm, config_path: Path, token: str, key_dir: Path):
    from agora_server.telemetry import events as ev
    from tests.helpers.refusing_worker import refusing_worker as running

    args = ["--config", str(config_path), "--coordinator", swarm.coordinator_url, "--identity_path", str(key_dir / "refusing.key"),
            "--initial_peers", *swarm.seed_maddrs]
    seen = swarm.events_sent("trainer")
    with running(args, token) as worker:
        ready = worker.wait_ready(120)
        banned = swarm.wait_for("trainer", ev.WorkerBanned, lambda e: e.peer_id == ready["peer_id"], timeout=180, since=seen)
    if banned is None:
        return False, f"the trainer did not ban the {ready['stage']} worker that refused {worker.refused} calls within 180 s"
    return banned.reason.startswith("refused"), (
        f"admitted to {ready['stage']}, announced 1e9 tokens/s, refused every call: banned for {banned.seconds:.0f} s"
        f" ({banned.reason!r}); {worker.refused} calls refused in all")


def admitted_participant_attacks(args, swarm, config, config_path: Path, key_dir: Path, attacks: dict) -> None:
    """Mallory's attacks: one node of hers admitted to a stage forges, uploads junk and downloads;
    another serves as a worker that refuses every call."""
    from agora_server.telemetry import events as ev
    from tests.helpers.dishonest_participant import admit_node, start_dht

    token = swarm.add_participant("mallory")
    admitted_at = time.time()
    node = admit_node(config, swarm.coordinator_url, token, key_dir / "node.key")
    node_dht = None
    try:
        coordinator_pid = swarm.process("coordinator").popen.pid
        attacks["participant_forged_contributions"] = measured(
            "coordinator", coordinator_pid, lambda: forged_contributions(swarm.coordinator_url, node, admitted_at))
        attacks["participant_junk_checkpoint"] = measured(
            "coordinator", coordinator_pid, lambda: junk_checkpoints(swarm.coordinator_url, node, config))
        target = swarm.worker_name(node.stage, 0)
        started = swarm.events_of(target, ev.ServerStarted)[0]
        node_dht = start_dht(node, key_dir / "node.key", [*swarm.seed_maddrs, *started.maddrs])
        attacks["participant_many_weight_downloads"] = measured(
            f"{node.stage} worker", swarm.process(target).popen.pid,
            lambda: many_weight_downloads(node_dht, config, node.stage, started.peer_id, args.downloads))
    finally:
        if node_dht is not None:
            node_dht.shutdown()
        node.close()
    attacks["participant_refusing_worker"] = measured(
        "trainer", swarm.process("trainer").popen.pid, lambda: refusing_worker(swarm, config_path, token, key_dir))


def run(args: argparse.Namespace) -> dict:
    import yaml
    from hivemind import DHT

    from agora.config import load_run_config
    from agora.local_swarm import LocalSwarm
    from agora_server.telemetry import events as ev

    log_dir = args.log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    config = load_run_config("local-tiny", {"server": {"checkpoint_dir": str(log_dir / "checkpoints")}})
    config_path = log_dir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    size = args.body_mib * MiB
    result: dict = {"body_mib": args.body_mib, "growth_goal_mib": GROWTH_GOAL // MiB, "attacks": {}}
    # room beyond the swarm's own workers for the participant's two nodes
    swarm = LocalSwarm(str(config_path), config, steps=10**9, log_dir=log_dir, output=io.StringIO(), coordinator=True,
                       coordinator_settings={"queue": {"capacity": len(config.stages) + 2}})
    dht = None
    key_dir = Path(tempfile.mkdtemp(prefix="agora-abuse-keys-"))
    try:
        swarm.start(timeout=600)
        if swarm.wait_for("trainer", ev.TrainerReport, timeout=300) is None:
            raise RuntimeError(f"the trainer never reported; see {log_dir}")
        completed_before = max(e.step for e in swarm.events_of("trainer", ev.TrainerReport))
        coordinator_pid = swarm.process("coordinator").popen.pid
        worker_pid = swarm.process("body1#0").popen.pid
        started = swarm.events_of("body1#0", ev.ServerStarted)
        peer = started[0].peer_id if started else None
        # the stranger dials the worker's own address (its DHT records are signed: a stranger's DHT cannot read them)
        dht = DHT(initial_peers=[*swarm.seed_maddrs, *(started[0].maddrs if started else ())], client_mode=True, start=True)
        attacks = result["attacks"]
        attacks["coordinator_declared_oversize_body"] = measured(
            "coordinator", coordinator_pid, lambda: oversize_declared_body(swarm.coordinator_url, size))
        attacks["coordinator_streamed_oversize_body"] = measured(
            "coordinator", coordinator_pid, lambda: oversize_streamed_body(swarm.coordinator_url, size))
        if peer is None:
            result["worker_attacks_skipped"] = "body1's worker was not found in the DHT"
        else:
            attacks["worker_unauthenticated_large_stream"] = measured(
                "body1 worker", worker_pid, lambda: worker_stream(swarm, dht, peer, size, empty_parts=False))
            attacks["worker_unauthenticated_empty_parts"] = measured(
                "body1 worker", worker_pid, lambda: worker_stream(swarm, dht, peer, size, empty_parts=True))
        admitted_participant_attacks(args, swarm, config, config_path, key_dir, attacks)
        after_attacks = max(e.step for e in swarm.events_of("trainer", ev.TrainerReport))
        # training goes on once the attacks are over, too: one more report
        later = swarm.wait_for("trainer", ev.TrainerReport, lambda e: e.step > after_attacks, timeout=120)
        result["trainer_completed"] = {"before_attacks": completed_before, "after_attacks": after_attacks,
                                       "next_report": later.step if later else None,
                                       "rose": after_attacks > completed_before and later is not None}
        result["exited"] = [name for name in ("coordinator", "seed", "trainer", *(swarm.worker_name(s.name, 0) for s in config.stages))
                            if swarm.process(name).popen.poll() is not None]
    finally:
        if dht is not None:
            dht.shutdown()
        result["leaked_processes"] = swarm.stop()
        shutil.rmtree(key_dir, ignore_errors=True)
    attacks = result["attacks"].values()
    result["all_refused"] = all(a["refused"] for a in attacks)
    result["max_growth_mib"] = max((a["grew_mib"] for a in attacks), default=None)
    result["goal_met"] = bool(result["all_refused"] and result["max_growth_mib"] is not None
                              and result["max_growth_mib"] <= GROWTH_GOAL / MiB and result.get("trainer_completed", {}).get("rose")
                              and not result.get("exited"))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_and_print(lambda: run(args), args.output)
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
