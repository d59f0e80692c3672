#!/usr/bin/env python3
"""A newcomer worker joins a running stage through home-sized links and downloads the stage's weights.

Prints one JSON object on stdout. Each run starts a real swarm (seed, one worker per stage, a trainer
that runs a few micro-batches so the stage has an epoch to join), every process in a network namespace
of its own whose link is shaped to ``--link-mbit`` each way (bench/netns.py). Then a second worker of
the body stage starts; it finds the stage running and downloads the body's weights from the first
one. The body is sized so that its state (what the download carries, float32 weights) is about
``--state-mib`` MiB: local-tiny's shape, wider, with as many body layers as that takes.

Two runs by default:
  clean  nothing disturbs the download. Goal: ok and download_seconds <= 1.5 x ideal_seconds, where
         ideal_seconds is the state's size at the link rate.
  cut    the newcomer's link goes down for ``--cut-seconds`` once ``--cut-at`` of the state has crossed
         it (counted by the kernel on its veth). The download must still complete, continuing from the
         parts already received (resumed: true), not from the start.

download_seconds is the worker's own measure (StateDownloaded event): from its first request to the
last byte, over every try and peer. The namespaces, links and processes are removed afterwards, even on
failure, and stale ones from a killed run first, so the bench runs twice in a row. Needs root.

Usage:
  .venv/bin/python bench/join.py --state-mib 128               # a small state, a few minutes
  .venv/bin/python bench/join.py --output bench/results/join.json   # 1024 MiB at 200 Mbit/s
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchlib import run_and_print, wait_for_trainer
from netns import NetPlan, Netns, NetSetupError, cleanup_network

NETWORK = NetPlan(ns_prefix="agora-join-", link_prefix="agjn", subnet="10.213.58.0/24")
MODEL = {  # local-tiny's vocabulary and tokenizer; wide layers so that a few of them make the state
    "vocab_size": 8192,
    "hidden_size": 1024,
    "num_heads": 8,
    "num_kv_heads": 8,
    "intermediate_size": 2752,
    "max_seq_len": 128,
}
SEQ_LEN = 32  # short sequences: the swarm only has to reach its first epochs on two cores
TRAINER_STEPS = 3
NEWCOMER = "body1#1"
SERVING = "body1#0"
NAMES = ["seed", "head#0", SERVING, "tail#0", "trainer", NEWCOMER]
SENDER_TIMEOUT = 5.0
"""Seconds a stream may fall silent before the newcomer drops it and asks again: shorter than the cut,
so a cut always breaks the stream (with the production 10 s a 10 s cut is a coin toss)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-mib", type=float, default=1024, help="size of the stage state the newcomer downloads")
    parser.add_argument("--link-mbit", type=float, default=200, help="every process's link, each way")
    parser.add_argument("--runs", default="clean,cut", help="comma-separated: clean, cut")
    parser.add_argument("--cut-seconds", type=float, default=10.0, help="how long the newcomer's link is down in the cut run")
    parser.add_argument("--cut-at", type=float, default=0.4, help="share of the state received when the link goes down")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--log-dir", type=Path, help="keep the swarms' logs here (default: a temporary directory, removed)")
    return parser.parse_args(argv)


def layer_parameters() -> int:
    """One decoder layer of MODEL: attention projections, the gated MLP and two norms."""
    hidden, heads, kv_heads = MODEL["hidden_size"], MODEL["num_heads"], MODEL["num_kv_heads"]
    kv_width = kv_heads * hidden // heads
    return 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * MODEL["intermediate_size"] + 2 * hidden


def body_layers(state_mib: float) -> int:
    return max(1, round(state_mib * 2**20 / (4 * layer_parameters())))


def run_config(body: int, log_dir: Path):
    from agora.config import load_run_config

    overrides = {
        "run_name": "bench-join",
        "model": {**MODEL, "num_layers": body + 2},
        "stage_layers": [1, body, 1],
        "server": {
            "max_batch_size": 1,
            "target_batch_size": 1,  # one micro-batch per epoch: the stage has epochs to join after a few
            "announce_period": 2,
            "checkpoint_dir": str(log_dir / "checkpoints"),
            "averaging": {"state_dtype": "float32", "sender_timeout": SENDER_TIMEOUT},
            # one momentum buffer instead of AdamW's two: a GiB less on the serving worker, which with its
            # snapshot being served is what comes near the RAM health rule's 95% on a 24 GB machine
            "optimizer": {"name": "nesterov"},
        },
        "trainer": {"micro_batch_size": 1, "request_timeout": 300, "stage_wait_timeout": 300, "validation_every": 10**6},
        "data": {"source": "local", "tokenizer": "agora-bpe-8k", "seq_len": SEQ_LEN},
    }
    return load_run_config("local-tiny", overrides)


def received_bytes(net: Netns, name: str) -> int:
    """Bytes the bridge has sent into ``name``'s namespace: what its process downloaded, headers included."""
    return int(Path(f"/sys/class/net/{net.veth[name][0]}/statistics/tx_bytes").read_text())


def join_once(args, mode: str, log_dir: Path) -> dict:
    import yaml

    from agora.local_swarm import LocalSwarm
    from agora_server.telemetry.events import StateDownloaded

    body = body_layers(args.state_mib)
    config = run_config(body, log_dir)
    state_bytes = body * layer_parameters() * 4
    ideal = state_bytes * 8 / (args.link_mbit * 1e6)
    out: dict = {"mode": mode, "state_mib": round(state_bytes / 2**20, 1), "body_layers": body, "link_mbit": args.link_mbit,
                 "ideal_seconds": round(ideal, 2), "download_seconds": None, "ok": False, "resumed": False}
    cleanup_network(NETWORK)
    net = Netns(NAMES, 0.0, NETWORK)
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    swarm = None
    try:
        try:
            net.up()
            net.shape(args.link_mbit)
        except NetSetupError as e:
            out["error"] = e.to_json()
            return out
        console = open(log_dir / "swarm-console.log", "w", encoding="utf-8")
        swarm = LocalSwarm(str(config_path), config, steps=TRAINER_STEPS, log_dir=log_dir, output=console, wrap=net.wrap, host=net.host)
        swarm.start(timeout=900)
        waited: dict = {}
        if wait_for_trainer(swarm, 900, waited) != 0:
            out["error"] = f"the swarm did not train its first epochs: {waited}; see {log_dir}"
            return out
        before = received_bytes(net, NEWCOMER)
        started = time.monotonic()
        swarm.start_worker("body1", 1)
        if mode == "cut":
            out["cut"] = cut_mid_download(args, net, before, state_bytes, swarm)
        patience = 900 + 20 * ideal
        done = swarm.wait_for(NEWCOMER, StateDownloaded, timeout=patience - (time.monotonic() - started))
        if done is None:
            out["error"] = f"no StateDownloaded from the newcomer within {patience:.0f}s; see {log_dir}"
            return out
        out.update(ok=done.ok, resumed=done.resumed, download_seconds=done.seconds,
                   newcomer_received_mib=round((received_bytes(net, NEWCOMER) - before) / 2**20, 1),
                   seconds_from_start_to_loaded=round(time.monotonic() - started, 1))
        out["ratio_to_ideal"] = round(done.seconds / ideal, 3)
        if mode == "clean":
            out["goal_met"] = done.ok and done.seconds <= 1.5 * ideal
        else:
            out["goal_met"] = done.ok and done.resumed
    finally:
        if swarm is not None:
            out["leftover_processes"] = swarm.stop()
            console.close()  # after the stop: the swarm writes its children's last lines there
        out["teardown"] = cleanup_network(NETWORK)
    return out


def cut_mid_download(args, net: Netns, before: int, state_bytes: int, swarm) -> dict:
    """Take the newcomer's link down for ``--cut-seconds`` once ``--cut-at`` of the state has crossed it."""
    from agora_server.telemetry.events import StateDownloaded

    threshold = before + args.cut_at * state_bytes
    deadline = time.monotonic() + 900
    while received_bytes(net, NEWCOMER) < threshold:
        ended = swarm.events_of(NEWCOMER, StateDownloaded) or swarm.process(NEWCOMER).popen.poll() is not None
        if ended or time.monotonic() > deadline:
            return {"error": "the download ended before the cut point"}
        time.sleep(0.05)
    at = received_bytes(net, NEWCOMER) - before
    net.cut(NEWCOMER)
    try:
        time.sleep(args.cut_seconds)
    finally:
        net.restore(NEWCOMER)
    return {"seconds": args.cut_seconds, "at_mib": round(at / 2**20, 1)}


class Interrupted(BaseException):
    """SIGTERM: unwind through the finally blocks, which stop the swarm and remove the namespaces."""


def _on_sigterm(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted("SIGTERM")


def run(args) -> dict:
    output: dict = {"benchmark": "join", "state_mib_asked": args.state_mib, "link_mbit": args.link_mbit,
                    "sender_timeout": SENDER_TIMEOUT, "load_average_before": [round(x, 2) for x in os.getloadavg()],
                    "cores": os.cpu_count()}
    if os.geteuid() != 0:
        output["error"] = "not running as root: network namespaces need CAP_NET_ADMIN"
        return output
    output["stale_cleanup_before"] = cleanup_network(NETWORK)
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="agora-bench-join-"))
    started = time.perf_counter()
    try:
        for mode in [m.strip() for m in args.runs.split(",") if m.strip()]:
            print(f"[bench] join: {mode} run", file=sys.stderr, flush=True)
            try:
                output[mode] = join_once(args, mode, log_root / mode)
            except (Interrupted, KeyboardInterrupt) as e:
                output["interrupted"] = f"{type(e).__name__} {e} during the {mode} run"
                break
            except Exception as e:
                output[mode] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        if args.log_dir is None:
            shutil.rmtree(log_root, ignore_errors=True)
    for field in ("download_seconds", "ideal_seconds", "ok"):
        output[field] = (output.get("clean") or {}).get(field)
    output["resumed"] = (output.get("cut") or {}).get("resumed")
    output["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    output["wall_seconds"] = round(time.perf_counter() - started, 1)
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    output = run_and_print(lambda: run(args), args.output)
    runs = [output.get(mode) or {} for mode in ("clean", "cut")]
    return 0 if all(r.get("goal_met", True) and "error" not in r for r in runs) and "interrupted" not in output else 1


if __name__ == "__main__":
    sys.exit(main())
