#!/usr/bin/env python3
"""Throughput of the local swarm against one process training the same model on the same data.

Prints one JSON object on stdout:

  single_tokens_per_s  one process, the stages composed in-process, torch's default threads (all cores)
  swarm_tokens_per_s   seed DHT + one worker per stage + trainer as child processes on 127.0.0.1
  ratio                swarm_tokens_per_s / single_tokens_per_s (now: >= 0.6; goal: >= 0.9)
  compute_efficiency   swarm_tokens_per_s / what the slowest stage allows with one forward and one
                       backward per micro-batch (no recompute), from each stage's worker code timed alone

Both train the same model (the run config's stages, built from the same seed), on the same
micro-batches (the same PackedBatches stream the trainer reads), with the workers' optimizer
schedule (AdamW per stage, clipped per stage, a step every ``server.target_batch_size`` samples).
Both run ``--warmup`` micro-batches first and are then timed over the next ``--steps``
micro-batches: the single process from the end of the last warm-up micro-batch to the end of the
last one; the swarm from the trainer's report of its ``warmup``-th completed micro-batch to its
report of the last (the times its ``TrainerReport`` events carry).
End-to-end rates (warm-up and pipeline fill included) are reported next to them.

Usage:
  .venv/bin/python bench/throughput.py                # the real benchmark, a few minutes on 2 cores
  .venv/bin/python bench/throughput.py --quick        # tiny smoke run, well under 90 s
  .venv/bin/python bench/throughput.py --output bench/throughput.json

The swarm's console output and logs go to ``--log-dir`` (default logs/bench-throughput), never to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from benchlib import REPO, build_stages, run_and_print, step_stages, trainer_reports, worker_rounds

# The benchmark model: ~25M parameters; one micro-batch of 4 x 256 tokens takes ~2.5 s of
# forward+backward on one core, while a boundary tensor is 2 MiB: compute dominates messaging.
BENCH_MODEL = {
    "vocab_size": 8192,  # fixed by the shipped tokenizer (agora-bpe-8k)
    "hidden_size": 512,
    "num_layers": 6,
    "num_heads": 8,
    "num_kv_heads": 4,
    "intermediate_size": 1344,
    "max_seq_len": 256,
}
BENCH_STAGE_LAYERS = [3, 3]
BENCH_MICRO_BATCH = 4
BENCH_SEQ_LEN = 256
BENCH_STEPS = 32

QUICK_MODEL = {
    "vocab_size": 8192,
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 344,
    "max_seq_len": 64,
}
QUICK_STAGE_LAYERS = [1, 1]
QUICK_MICRO_BATCH = 2
QUICK_SEQ_LEN = 64
QUICK_STEPS = 8

SWARM_FILES = ("run.yaml", "seed.log", "trainer.log", "trainer-summary.json", "swarm-console.log")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help=f"timed micro-batches per side (default {BENCH_STEPS}; --quick: {QUICK_STEPS})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed micro-batches before the timed ones, on both sides (default 2)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps: a smoke test, not a measurement")
    parser.add_argument("--repeat", type=int, default=None, help="rounds of (single, swarm); each side's best round counts (default 2; --quick: 1)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON to this file")
    parser.add_argument("--log-dir", type=Path, default=REPO / "logs" / "bench-throughput", help="the swarm's logs and config")
    # knobs for exploring configurations; the defaults are the benchmark's
    parser.add_argument("--num-layers", type=int, default=None, help="decoder layers of the model (give --stage-layers too)")
    parser.add_argument("--stage-layers", default=None, help="decoder layers per stage, head first, e.g. 3,3 or 2,2,2")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch")
    parser.add_argument("--max-in-flight", type=int, default=None, help="trainer.max_in_flight (default: 2 x stages)")
    parser.add_argument("--worker-threads", type=int, default=None, help="server.cpu_threads (default: cores // workers, at least 1)")
    parser.add_argument("--single-threads", type=int, default=None, help="torch threads of the single process (default: torch's default)")
    parser.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--target-batch-size", type=int, default=8, help="server.target_batch_size (default 8)")
    parser.add_argument("--averaging", action="store_true", help="keep SPARTA averaging on (it has no peers with one worker per stage)")
    parser.add_argument("--skip-single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-swarm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-stage-profile", action="store_true", help="skip timing each stage's worker compute alone")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else BENCH_STEPS
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2
    if args.steps < 2 or args.warmup < 1 or args.repeat < 1:
        parser.error("need --steps >= 2 and --warmup >= 1")
    return args


# --- configuration ---------------------------------------------------------------------------------


def build_config(args: argparse.Namespace):
    from agora.config import load_run_config

    model = dict(QUICK_MODEL if args.quick else BENCH_MODEL)
    if args.num_layers:
        model["num_layers"] = args.num_layers
    stage_layers = [int(n) for n in args.stage_layers.split(",")] if args.stage_layers else (
        QUICK_STAGE_LAYERS if args.quick else BENCH_STAGE_LAYERS
    )
    micro_batch = args.micro_batch or (QUICK_MICRO_BATCH if args.quick else BENCH_MICRO_BATCH)
    seq_len = QUICK_SEQ_LEN if args.quick else BENCH_SEQ_LEN
    cores = os.cpu_count() or 1
    worker_threads = args.worker_threads or max(1, cores // len(stage_layers))
    overrides = {
        "run_name": "bench-throughput",
        "model": dict(model),
        "stage_layers": stage_layers,
        "boundary": {"codec": "dense", "wire_dtype": args.wire_dtype},
        "server": {
            "max_batch_size": max(8, micro_batch),
            "target_batch_size": args.target_batch_size,
            "cpu_threads": worker_threads,
            "allow_cpu": True,
            "announce_period": 2,
            "progress_interval": 10,
            "averaging": {"enabled": args.averaging},
            # the workers' end-of-run checkpoints go next to the logs and are deleted after each swarm
            "checkpoint_dir": str((args.log_dir / "checkpoints").resolve()),
            "optimizer": {"lr": 0.001, "warmup_steps": 10, "weight_decay": 0.01, "clip_grad_norm": 1.0},
        },
        "trainer": {
            "micro_batch_size": micro_batch,
            "max_in_flight": args.max_in_flight or 2 * len(stage_layers),
            "request_timeout": 300,  # queueing behind other micro-batches must never count as a failure
            "refresh_period": 1,
            "stage_wait_timeout": 180,
            "report_every": 1,  # one TrainerReport event per completion: the swarm's timing source
        },
        "data": {"source": "local", "tokenizer": "agora-bpe-8k", "seq_len": seq_len},
    }
    return load_run_config("local-tiny", overrides)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


class CpuMeter:
    """Who used the machine's CPUs during a phase: this benchmark's processes, or others.

    ``others_share`` is the fraction of all cores' time taken by processes that are not ours
    (another user's tests, say): near 0 means the timing is clean. Our processes are this one and,
    while ``watch_groups`` returns them, every member of those process groups (the swarm's children,
    their DHT processes and p2pd daemons), sampled every half second."""

    def __init__(self, watch_groups=lambda: ()):
        import psutil

        self.psutil, self.watch_groups = psutil, watch_groups
        self.cores = psutil.cpu_count() or 1
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True, name="cpu-meter")

    def _machine(self) -> tuple[float, float]:
        t = self.psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest time is inside user time
        return total - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0), getattr(t, "steal", 0.0)

    def _own_now(self) -> float:
        t = self.psutil.Process().cpu_times()
        return t.user + t.system

    def _sample(self) -> None:
        groups = set(self.watch_groups())
        if not groups:
            return
        for proc in self.psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups:
                    t = proc.cpu_times()
                    self._seen[proc.pid] = max(self._seen.get(proc.pid, 0.0), t.user + t.system)
            except (ProcessLookupError, self.psutil.Error):
                continue

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> "CpuMeter":
        self._wall, (self._busy, self._steal), self._own = time.perf_counter(), self._machine(), self._own_now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._wall
        busy, steal = self._machine()
        busy, steal = busy - self._busy, steal - self._steal
        ours = self._own_now() - self._own + sum(self._seen.values())
        self.result = {
            "wall_s": round(wall, 1),
            "machine_busy_cpu_s": round(busy, 1),
            "ours_cpu_s": round(ours, 1),
            "others_cpu_s": round(max(0.0, busy - ours), 1),
            "others_share": round(max(0.0, busy - ours) / (wall * self.cores), 3),
            "steal_cpu_s": round(steal, 1),
        }


# --- (a) one process ---------------------------------------------------------------------------------


def run_single(config, batches: list, warmup: int, threads: int | None) -> dict:
    """Train the composed stages in this process: forward head → … → tail, one backward, the workers' optimizer schedule."""
    import torch

    from agora_server.optim import make_optimizer

    if threads:
        torch.set_num_threads(threads)
    stages = build_stages(config)
    optimizer_config = config.server.optimizer
    optimizers = [make_optimizer(stage, optimizer_config) for stage in stages]
    target_batch_size = config.server.target_batch_size
    accumulated_samples = accumulated_batches = epoch = 0
    losses: list[float] = []
    marks: list[float] = []

    started = time.perf_counter()
    for tokens, labels in batches:
        boundary = None
        for stage in stages[:-1]:
            boundary = stage(tokens, boundary)
        per_token_loss = stages[-1](tokens, boundary, labels)
        valid = (labels != -100).float()
        loss = (per_token_loss * (valid / valid.sum().clamp(min=1.0))).sum()  # the trainer's loss weights
        loss.backward()
        accumulated_samples += tokens.shape[0]
        accumulated_batches += 1
        if accumulated_samples >= target_batch_size:  # each stage steps on its own, as StageBackend does
            step_stages(stages, optimizers, optimizer_config, epoch, accumulated_batches)
            accumulated_samples = accumulated_batches = 0
            epoch += 1
        losses.append(float(loss.detach()))
        marks.append(time.perf_counter())

    timed = len(batches) - warmup
    tokens_per_mb = batches[0][0].numel()
    seconds = marks[-1] - marks[warmup - 1]
    return {
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "tokens_per_s": timed * tokens_per_mb / seconds,
        "end_to_end_seconds": marks[-1] - started,
        "end_to_end_tokens_per_s": len(batches) * tokens_per_mb / (marks[-1] - started),
        "seconds_per_micro_batch": seconds / timed,
        "optimizer_steps": epoch,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


# --- each stage's worker compute alone ------------------------------------------------------------------


def profile_stages(config, batches: list, threads: int, repeats: int) -> dict:
    """Time each stage's worker code (StageBackend.forward/backward) without any messaging: the forward and a
    backward that recomputes it, and (head and body) a forward that keeps its graph and the backward on it.

    One stage at a time on ``threads`` threads, the other cores idle: an optimistic bound on what the
    pipeline's slowest stage allows."""
    import torch

    from agora_server.models.config import StageKind
    from agora_server.server.backend import StageBackend
    from agora_server.server.kept_graphs import GraphKey, KeptGraphs

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = {}
        stages = build_stages(config)
        width = config.model.hidden_size
        for stage in stages:
            graphs = KeptGraphs(config.server.kept_graphs, None, bytes_per_token=0.0)
            backend = StageBackend(stage, config.server, torch.device("cpu"), graphs=graphs)
            fwd_times, bwd_times, kept_times = [], [], []
            for i in range(repeats + 1):
                tokens, labels = batches[i % len(batches)]
                boundary = torch.randn(*tokens.shape, width) * 0.5
                inputs = {"tokens": tokens} if stage.kind is StageKind.HEAD else {"tokens": tokens, "boundary": boundary}
                if stage.kind is StageKind.TAIL:  # the tail's backward runs its forward too
                    valid = (labels != -100).float()
                    t0 = time.perf_counter()
                    backend.backward({**inputs, "labels": labels, "loss_weights": valid / valid.sum()})
                    fwd, bwd = 0.0, time.perf_counter() - t0
                else:
                    grad = torch.randn(*tokens.shape, width) * 1e-3
                    t0 = time.perf_counter()
                    backend.forward(inputs)
                    t1 = time.perf_counter()
                    backend.backward({**inputs, "grad": grad})
                    fwd, bwd = t1 - t0, time.perf_counter() - t1
                    key = GraphKey("profile", "", i)  # what a worker does now: the forward keeps its graph
                    t0 = time.perf_counter()
                    backend.forward(inputs, keep=key)
                    t1 = time.perf_counter()
                    backend.backward_graph({"grad": grad}, key)
                    kept_times.append((t1 - t0, time.perf_counter() - t1))
                if i:  # the first is a warm-up
                    fwd_times.append(fwd)
                    bwd_times.append(bwd)
            f, b = sum(fwd_times) / repeats, sum(bwd_times) / repeats
            kept = {}
            if kept_times:
                kept_f, kept_b = (sum(t[k] for t in kept_times[1:]) / repeats for k in (0, 1))
                kept = {"forward_keeping_s": round(kept_f, 4), "backward_on_kept_graph_s": round(kept_b, 4),
                        "per_micro_batch_kept_graph_s": round(kept_f + kept_b, 4)}
            result[stage.spec.name] = {
                "layers": stage.spec.num_layers,
                "forward_s": round(f, 4),
                "backward_s": round(b, 4),
                "per_micro_batch_s": round(f + b, 4),
                # a backward that recomputes is one forward with autograd and one backward: the work a
                # micro-batch needs of the stage when nothing is recomputed (the tail's always is that)
                "forward_backward_s": round(b, 4),
                **kept,
            }
            del backend
        del stages
        gc.collect()
        return result
    finally:
        torch.set_num_threads(previous)


# --- (b) the local swarm ------------------------------------------------------------------------------


def clear_swarm_files(log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    for name in SWARM_FILES:
        (log_dir / name).unlink(missing_ok=True)
    for path in log_dir.glob("server_*.log*"):
        path.unlink()
    for path in log_dir.glob("trainer.log.*"):
        path.unlink()


def run_swarm(config, total_steps: int, warmup: int, log_dir: Path, timeout: float) -> dict:
    import yaml

    from agora.local_swarm import LocalSwarm

    clear_swarm_files(log_dir)
    config_path = log_dir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tokens_per_mb = config.trainer.micro_batch_size * config.data.seq_len
    result: dict = {}
    with open(log_dir / "swarm-console.log", "w", encoding="utf-8") as console:
        swarm = LocalSwarm(str(config_path), config, workers_per_stage=1, steps=total_steps, log_dir=log_dir, output=console)
        leftovers: list[str] = []
        started = time.perf_counter()
        with CpuMeter(lambda: [p.pgid for p in swarm.processes]) as meter:
            try:
                swarm.start()
                code = swarm.wait_for_trainer(threading.Event(), timeout=timeout)
                result["wall_seconds_with_startup"] = time.perf_counter() - started
                result["trainer_exit_code"] = code
            finally:
                leftovers = swarm.stop()
                shutil.rmtree(config.server.checkpoint_dir, ignore_errors=True)
        result["leftover_processes"] = leftovers
        result["cpu"] = meter.result
    if result.get("trainer_exit_code") != 0 or not swarm.summary_path.is_file():
        raise RuntimeError(f"the swarm's trainer did not finish cleanly ({result}); see {log_dir}")

    summary = json.loads(swarm.summary_path.read_text())
    result.update(
        completed=summary["completed"],
        sent=summary["sent"],
        dropped=summary["dropped"],
        retried=summary["retried"],
        kept_graph_backwards=summary["kept_graph_backwards"],
        recomputed_backwards=summary["recomputed_backwards"],
        graph_resends=summary["graph_resends"],
        bytes_sent=summary["bytes_sent"],
        bytes_received=summary["bytes_received"],
        summary_seconds=summary["seconds"],
        end_to_end_tokens_per_s=summary["tokens"] / summary["seconds"],
        loss_first=summary["losses"][0][1] if summary["losses"] else None,
        loss_last=summary["losses"][-1][1] if summary["losses"] else None,
    )
    rounds = worker_rounds(swarm)
    by_stage = {spec.name: rounds[swarm.worker_name(spec.name, 0)] for spec in config.stages}
    result["optimizer_steps"] = {stage: counts["optimizer_steps"] for stage, counts in by_stage.items()}
    result["averaging_rounds"] = {stage: counts["ok"] + counts["failed"] for stage, counts in by_stage.items()}
    reports = trainer_reports(swarm)
    start = next(((t, k) for t, k in reports if k >= warmup), None)
    end = reports[-1] if reports else None
    if start is None or end is None or end[1] <= start[1] or end[0] <= start[0]:
        raise RuntimeError(f"the trainer sent too few reports to time the run: {reports}")
    result.update(
        timed_from_completed=start[1],
        timed_to_completed=end[1],
        seconds=end[0] - start[0],
        tokens_per_s=(end[1] - start[1]) * tokens_per_mb / (end[0] - start[0]),
        seconds_per_micro_batch=(end[0] - start[0]) / (end[1] - start[1]),
    )
    return result


# --- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = run_and_print(lambda: run(args), args.output)
    failed = "swarm_error" in output or output.get("swarm", {}).get("leftover_processes")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> dict:
    wall_started = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"[bench] load average is {load_before[0]:.2f}: other work on this machine will skew the timings", file=sys.stderr)

    import torch

    from agora_server.data import PackedBatches
    from agora_server.pipeline import in_flight_limit

    config = build_config(args)
    total = args.warmup + args.steps
    tokens_per_mb = config.trainer.micro_batch_size * config.data.seq_len
    stages = build_stages(config)
    stage_params = {s.spec.name: count_parameters(s) for s in stages}
    del stages

    # the same micro-batches the swarm's trainer reads (rank 0 of 1, same seed), tokenised before timing
    stream = iter(PackedBatches(config.data, config.trainer.micro_batch_size))
    batches = [next(stream) for _ in range(total)]
    del stream

    cores = os.cpu_count() or 1
    output: dict = {
        "benchmark": "throughput",
        "quick": args.quick,
        "single_tokens_per_s": None,
        "swarm_tokens_per_s": None,
        "ratio": None,
        "ratio_end_to_end": None,
        "compute_efficiency": None,
        "model": {
            **config.model.model_dump(mode="json"),
            "parameters": sum(stage_params.values()),
            "parameters_millions": round(sum(stage_params.values()) / 1e6, 2),
        },
        "stages": [
            {"name": s.name, "kind": s.kind.value, "layers": list(s.layer_indices), "parameters": stage_params[s.name]}
            for s in config.stages
        ],
        "stage_layers": list(config.stage_layers),
        "micro_batch_size": config.trainer.micro_batch_size,
        "seq_len": config.data.seq_len,
        "tokens_per_micro_batch": tokens_per_mb,
        "warmup_micro_batches": args.warmup,
        "timed_micro_batches": args.steps,
        "timed_tokens": args.steps * tokens_per_mb,
        "cores": cores,
        "single_threads": args.single_threads or torch.get_num_threads(),
        "worker_threads": config.server.cpu_threads,
        "workers": len(config.stages),
        "max_in_flight": config.trainer.max_in_flight,
        # what the trainer keeps in flight: max_in_flight, lowered to hold at most max_delay_epochs of an epoch
        "in_flight": in_flight_limit(config.trainer, config.server.target_batch_size),
        "target_batch_size": config.server.target_batch_size,
        "wire_dtype": config.boundary.wire_dtype,
    }

    if not args.no_stage_profile:
        profile = profile_stages(config, batches, config.server.cpu_threads, repeats=1 if args.quick else 2)
        slowest = max(p["per_micro_batch_s"] for p in profile.values())
        slowest_compute = max(p["forward_backward_s"] for p in profile.values())
        output["stage_profile"] = {
            "threads": config.server.cpu_threads,
            "stages": profile,
            "slowest_stage_s": slowest,
            "pipeline_bound_tokens_per_s": round(tokens_per_mb / slowest, 1),
            "slowest_forward_backward_s": slowest_compute,
            "compute_bound_tokens_per_s": round(tokens_per_mb / slowest_compute, 1),
        }

    # rounds alternate the two sides, so a burst of other work on the machine hits one round, not one side;
    # each side's best round counts (the least disturbed), and every round is reported
    rounds, singles, swarms = [], [], []
    for index in range(args.repeat):
        record: dict = {"round": index + 1, "load_average": round(os.getloadavg()[0], 2)}
        if not args.skip_single:
            gc.collect()
            with CpuMeter() as meter:
                single = run_single(config, batches, args.warmup, args.single_threads)
            single["cpu"] = meter.result
            singles.append(single)
            record["single_tokens_per_s"] = round(single["tokens_per_s"], 1)
            gc.collect()
        if not args.skip_swarm:
            timeout = 120 + total * (60 if not args.quick else 10)
            log_dir = args.log_dir / f"round-{index + 1}" if args.repeat > 1 else args.log_dir
            try:
                swarm = run_swarm(config, total, args.warmup, log_dir, timeout)
                swarms.append(swarm)
                record["swarm_tokens_per_s"] = round(swarm["tokens_per_s"], 1)
            except Exception as e:  # still print what was measured, and say why the swarm side is missing
                output["swarm_error"] = f"{type(e).__name__}: {e}"
                record["swarm_error"] = output["swarm_error"]
        if singles and "single_tokens_per_s" in record:
            record["single_others_cpu_share"] = singles[-1]["cpu"]["others_share"]
        if swarms and "swarm_tokens_per_s" in record:
            record["swarm_others_cpu_share"] = swarms[-1]["cpu"]["others_share"]
        if "single_tokens_per_s" in record and "swarm_tokens_per_s" in record:
            record["ratio"] = round(record["swarm_tokens_per_s"] / record["single_tokens_per_s"], 3)
        rounds.append(record)
        if "swarm_error" in output:
            break

    if singles:
        output["single"] = max(singles, key=lambda r: r["tokens_per_s"])
        output["single_tokens_per_s"] = round(output["single"]["tokens_per_s"], 1)
    if swarms:
        output["swarm"] = max(swarms, key=lambda r: r["tokens_per_s"])
        output["swarm_tokens_per_s"] = round(output["swarm"]["tokens_per_s"], 1)
    output["rounds"] = rounds
    if singles and swarms:
        output["ratio"] = round(output["swarm"]["tokens_per_s"] / output["single"]["tokens_per_s"], 3)
        output["ratio_end_to_end"] = round(
            max(r["end_to_end_tokens_per_s"] for r in swarms) / max(r["end_to_end_tokens_per_s"] for r in singles), 3
        )
        if "stage_profile" in output:
            output["stage_profile"]["pipeline_bound_ratio"] = round(
                output["stage_profile"]["pipeline_bound_tokens_per_s"] / output["single"]["tokens_per_s"], 3
            )
    if swarms and "stage_profile" in output:
        output["compute_efficiency"] = round(output["swarm"]["tokens_per_s"] / output["stage_profile"]["compute_bound_tokens_per_s"], 3)

    output["notes"] = [
        f"Same model (~{output['model']['parameters_millions']}M parameters, built from seed {config.seed}), same "
        f"{total} micro-batches of {config.trainer.micro_batch_size}x{config.data.seq_len} tokens, same optimizer "
        "schedule (AdamW per stage, per-stage clipping, a step every target_batch_size samples) on both sides.",
        f"Threads: the single process uses {output['single_threads']} torch thread(s) on {cores} core(s); the swarm runs "
        f"{len(config.stages)} worker(s) with server.cpu_threads={config.server.cpu_threads} each, and its trainer, seed "
        "DHT and p2pd daemons share the same cores.",
        f"Timing: {args.warmup} warm-up micro-batch(es) untimed on both sides, then {args.steps} timed; {args.repeat} "
        "round(s) alternating single and swarm, each side's best round reported (all rounds under 'rounds'). The single "
        "process's batches are tokenised before timing; the swarm's trainer tokenises in its own process, as it "
        "always does. The swarm is timed between the trainer's reports of completions, which excludes start-up and "
        "pipeline fill; ratio_end_to_end includes warm-up and fill (the trainer's summary seconds).",
        "Head and body workers keep the autograd graph of each training forward until its backward (server.kept_graphs), "
        "so a micro-batch costs every stage 1 forward + 1 backward, as in the single process, unless the stage steps "
        "between its forward and its backward (the worker then keeps no graph, or frees it, and the backward "
        "recomputes the forward: swarm.recomputed_backwards); with target_batch_size 8 and 4 micro-batches of 4 in "
        "flight nearly every backward comes after a step. The tail runs forward+backward in one call. compute_efficiency divides "
        "the swarm's rate by tokens_per_micro_batch / stage_profile.slowest_forward_backward_s.",
        "The swarm pipeline is asynchronous (gradients may be slightly stale); the single process is synchronous. "
        "Activations and gradients travel trainer<->worker through p2pd at wire_dtype.",
    ]
    if args.quick:
        output["notes"].append("--quick: a tiny model for smoke testing; messaging dominates, the ratio means nothing.")
    output["config"] = config.model_dump(mode="json")
    output["load_average_before"] = [round(x, 2) for x in load_before]
    output["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    output["wall_seconds"] = round(time.perf_counter() - wall_started, 1)
    output["log_dir"] = str(args.log_dir)
    return output


if __name__ == "__main__":
    sys.exit(main())
