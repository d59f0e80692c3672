#!/usr/bin/env python3
"""Training under churn: workers of a coordinated local swarm are killed (SIGKILL) and restarted at random.

The swarm: a coordinator, a seed DHT, two stages (head, tail) with three workers each, and a
trainer, all child processes on 127.0.0.1. After the trainer's first report, for ``--duration``
seconds a worker that is serving is killed every ``--kill-every`` seconds on average (exponential
gaps) and started again with the same identity after a random ``--down`` time: it joins through the
coordinator again and resumes from its checkpoint. Halfway, every worker of one stage is killed at
once (``--outage`` seconds down), so the trainer has to pause and resume. Then the trainer is stopped
(it finishes what is in flight and writes its ledger), and the swarm.

Prints one JSON object on stdout:

  micro_batches       sent / completed / dropped by reason / retried, and whether completed + dropped = sent
  longest_stall_s     the longest time the trainer went without completing a micro-batch
  pauses              (seconds into training, length) of each trainer pause for an empty stage
  loss                mean of the first and of the last 20 completed micro-batches
  occupancy           every 5 s: workers serving each stage (processes up that announced their stage)
  kills, restarts     what the churn did, with times (a restarted worker may be given the other stage)
  leaked_processes    processes of the swarm alive after shutdown (must be empty)
  leaked_ports        ports the swarm listened on during the run still bound after shutdown (must be empty)

Usage:
  .venv/bin/python bench/churn.py                       # 5.5 minutes of churn, ~8 minutes in all on 2 cores
  .venv/bin/python bench/churn.py --duration 60         # a short look
  .venv/bin/python bench/churn.py --output bench/results/churn.json

Exit code 1 if the accounting does not add up, the loss did not fall, or anything leaked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import sys
import time
from pathlib import Path

from benchlib import REPO, run_and_print

STAGES = ("head", "tail")
WORKERS_PER_STAGE = 3
SAMPLE_EVERY = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=330, help="seconds of churn (default 330)")
    parser.add_argument("--kill-every", type=float, default=15, help="mean seconds between kills (default 15)")
    parser.add_argument("--down", type=float, nargs=2, default=(3, 25), metavar=("MIN", "MAX"), help="seconds a killed worker stays down (default 3 25)")
    parser.add_argument("--outage", type=float, default=25, help="seconds a whole stage stays down halfway through; 0: no outage (default 25)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the churn's random choices (default 1)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    parser.add_argument("--log-dir", type=Path, default=REPO / "logs" / "bench-churn", help="the swarm's logs, checkpoints and console output")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Churn:
    """Kills and restarts, with the time (seconds since churn began) of each."""

    swarm: object
    rng: random.Random
    started: float = dataclasses.field(default_factory=time.monotonic)
    kills: list = dataclasses.field(default_factory=list)
    restarts: list = dataclasses.field(default_factory=list)
    due: dict = dataclasses.field(default_factory=dict)
    """Worker name → when to start it again."""

    def now(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def serving(self) -> dict[str, str]:
        """Workers up now and the stage each announced in its latest run."""
        from agora_server.telemetry import events as ev

        found = {}
        for stage in STAGES:
            for index in range(WORKERS_PER_STAGE):
                name = self.swarm.worker_name(stage, index)
                process = self.swarm.process(name)
                if process.popen.poll() is not None:
                    continue
                started = self.swarm.events_of(name, ev.ServerStarted, since=process.first_event)
                if started:
                    found[name] = started[-1].stage
        return found

    def kill(self, name: str, stage: str, down: float, why: str) -> None:
        self.swarm.kill(name, signal.SIGKILL)
        self.swarm.process(name).popen.wait(30)
        self.kills.append({"t": self.now(), "worker": name, "stage": stage, "why": why, "down_s": round(down, 1)})
        self.due[name] = time.monotonic() + down

    def restart_due(self) -> None:
        for name, when in list(self.due.items()):
            if time.monotonic() >= when:
                stage, index = name.split("#")
                self.swarm.start_worker(stage, int(index))
                self.restarts.append({"t": self.now(), "worker": name})
                del self.due[name]


def occupancy(serving: dict[str, str]) -> dict[str, int]:
    return {stage: sum(1 for s in serving.values() if s == stage) for stage in STAGES}


def run(args: argparse.Namespace) -> dict:
    import psutil
    import yaml

    from agora.config import load_run_config
    from agora.local_swarm import LocalSwarm
    from agora_server.telemetry import events as ev

    log_dir = args.log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    overrides = {
        "stage_layers": [3, 3],
        "server": {"checkpoint_dir": str(log_dir / "checkpoints"), "checkpoint_every": 10},
    }
    config = load_run_config("local-tiny", overrides)
    config_path = log_dir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    rng = random.Random(args.seed)
    result: dict = {"duration_s": args.duration, "workers_per_stage": WORKERS_PER_STAGE, "seed": args.seed}
    ports_seen: set[int] = set()
    samples: list[dict] = []

    with open(log_dir / "swarm-console.log", "w", encoding="utf-8") as console:
        # a trainer drains what is in flight when stopped: give it the time its calls may take
        swarm = LocalSwarm(
            str(config_path), config, workers_per_stage=WORKERS_PER_STAGE, steps=10**9, log_dir=log_dir,
            output=console, coordinator=True, grace_seconds=3 * config.trainer.request_timeout,
        )
        churn = Churn(swarm, rng)
        try:
            swarm.start(timeout=600)
            if swarm.wait_for("trainer", ev.TrainerReport, timeout=300) is None:
                raise RuntimeError(f"the trainer never reported; see {log_dir}")
            churn.started = time.monotonic()
            outage_at = args.duration / 2 if args.outage > 0 else None
            next_kill = rng.expovariate(1 / args.kill_every)
            next_sample = 0.0
            while churn.now() < args.duration:
                if swarm.process("trainer").popen.poll() is not None:
                    raise RuntimeError(f"the trainer exited during churn; see {log_dir}")
                churn.restart_due()
                serving = churn.serving()
                if churn.now() >= next_sample:
                    samples.append({"t": churn.now(), **occupancy(serving)})
                    ports_seen |= swarm.listening_ports()
                    next_sample += SAMPLE_EVERY
                if outage_at is not None and churn.now() >= outage_at:
                    # the stage with most workers up: an outage of an already empty one would show nothing
                    stage = max(STAGES, key=lambda s: (occupancy(serving)[s], rng.random()))
                    for name in [n for n, s in serving.items() if s == stage]:
                        churn.kill(name, stage, args.outage, "outage")
                    outage_at = None
                elif churn.now() >= next_kill:
                    if serving:
                        name = rng.choice(sorted(serving))
                        churn.kill(name, serving[name], rng.uniform(*args.down), "random")
                    next_kill = churn.now() + rng.expovariate(1 / args.kill_every)
                time.sleep(0.2)
            # churn over: bring everyone back, so the trainer's last calls have somewhere to go
            for name in churn.due:
                churn.due[name] = 0.0
            churn.restart_due()
            ports_seen |= swarm.listening_ports()
            trainer = swarm.process("trainer")
            trainer.popen.send_signal(signal.SIGTERM)
            result["trainer_exit_code"] = trainer.popen.wait(3 * config.trainer.request_timeout + 60)
        finally:
            result["leaked_processes"] = swarm.stop()
        listening = {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.laddr and c.status == psutil.CONN_LISTEN}
        result["leaked_ports"] = sorted(ports_seen & listening)
        result["ports_watched"] = len(ports_seen)

    summary = json.loads(swarm.summary_path.read_text())
    dropped = summary["dropped"]
    losses = [loss for _, loss in summary["losses"]]
    window = min(20, len(losses) // 2)
    result["micro_batches"] = {
        "sent": summary["sent"],
        "completed": summary["completed"],
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "retried": summary["retried"],
        "accounted": summary["completed"] + sum(dropped.values()) == summary["sent"],
    }
    result["training_seconds"] = round(summary["seconds"], 1)
    result["longest_stall_s"] = round(summary["longest_stall"], 1)
    result["pauses"] = [[round(at, 1), round(length, 1)] for at, length in summary["pauses"]]
    result["loss"] = {
        "start": round(sum(losses[:window]) / window, 4) if window else None,
        "end": round(sum(losses[-window:]) / window, 4) if window else None,
        "window": window,
    }
    result["kills"], result["restarts"], result["occupancy"] = churn.kills, churn.restarts, samples
    result["min_occupancy"] = {stage: min(s[stage] for s in samples) for stage in STAGES} if samples else {}
    return result


def healthy(result: dict) -> bool:
    loss = result["loss"]
    return (
        result["micro_batches"]["accounted"]
        and loss["end"] is not None and loss["end"] < loss["start"]
        and not result["leaked_processes"]
        and not result["leaked_ports"]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_and_print(lambda: run(args), args.output)
    return 0 if healthy(result) else 1


if __name__ == "__main__":
    sys.exit(main())
