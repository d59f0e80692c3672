"""Does the asynchronous swarm learn as well as synchronous training? Validation loss at equal tokens.

Prints one JSON object on stdout with three runs of the same model on the same token stream:

  a  sync_adamw     one process: the stages composed in-process, one optimizer per stage stepping on
                    the gradient of every ``target_batch_size`` samples (synchronous data-parallel
                    training, as if all workers of a stage pooled their gradients), AdamW.
  b  swarm_adamw    a real local swarm with 2 stages x 2 workers and one trainer keeping several
                    micro-batches in flight: each worker steps on its own gradients whenever the
                    stage's progress record reaches ``target_batch_size`` (the gradients of the
                    pipeline are stale by the micro-batches in flight), and the workers of a stage
                    are kept together by SPARTA averaging. AdamW.
  c  swarm_nesterov the same swarm with the Nesterov-corrected update (NAdam-style, β1 = 0.99).

The swarms' weights are read from the checkpoints their workers write as they stop. Every pairing of a
head worker with a tail worker is evaluated (``pairings``: the model any participant would hold), and
so is the average of each stage's replicas (``replica_mean``). The headline ratio divides the mean
over pairings by (a)'s final loss; the goal is (c) <= 1.03 x (a).

Usage:
  .venv/bin/python bench/convergence.py                 # the measurement (~25 minutes on 2 cores)
  .venv/bin/python bench/convergence.py --quick         # smoke test (a few minutes; its ratios mean nothing)
  .venv/bin/python bench/convergence.py --output bench/results/convergence.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import build_stages, composed_loss, count_events, evaluate, event_lines, merge, run_and_print, run_swarm, step_stages

MICRO_BATCH = 4
SEQ_LEN = 128
TARGET_BATCH = 16  # samples per epoch (optimizer step) of a stage
STEPS = 800  # micro-batches; 200 epochs
QUICK_STEPS = 64
VAL_BATCHES = 24
WORKERS_PER_STAGE = 2
LR = 1e-3
WARMUP_EPOCHS = 20
AVERAGING = {"fraction": 0.25, "average_every": 4, "matchmaking_time": 2.0, "request_timeout": 1.0, "averaging_timeout": 30.0}
NESTEROV = {"name": "nesterov", "betas": [0.99, 0.999], "momentum_start": 0.5, "momentum_warmup_steps": 50}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test, not a measurement")
    parser.add_argument("--steps", type=int, default=None, help=f"micro-batches of {MICRO_BATCH} x {SEQ_LEN} tokens per run (default {STEPS})")
    parser.add_argument("--lr", type=float, default=LR, help=f"peak learning rate of every run (default {LR})")
    parser.add_argument("--fraction", type=float, default=AVERAGING["fraction"], help=f"SPARTA fraction p per round (default {AVERAGING['fraction']})")
    parser.add_argument("--average-every", type=int, default=AVERAGING["average_every"], help=f"epochs between rounds (default {AVERAGING['average_every']})")
    parser.add_argument("--nesterov-betas", default="0.99,0.999", help="β1,β2 of run (c) (default 0.99,0.999, as in Ajanthan et al.)")
    parser.add_argument("--only", choices=["sync_adamw", "swarm_adamw", "swarm_nesterov"], action="append", help="run only these (repeatable)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    parser.add_argument("--log-dir", type=Path, help="keep the swarms' logs and checkpoints here (default: a temporary directory, removed)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a swarm run may take (default 3600)")
    return parser.parse_args(argv)


def run_config(args, optimizer: dict, run_name: str):
    from agora.config import load_run_config

    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    epochs = steps * MICRO_BATCH // TARGET_BATCH
    warmup = min(WARMUP_EPOCHS, max(1, epochs // 10))
    overrides = {
        "run_name": run_name,
        "stage_layers": [3, 3],
        "boundary": {"codec": "dense", "wire_dtype": "float32"},
        "server": {
            "target_batch_size": TARGET_BATCH,
            "cpu_threads": 1,
            "announce_period": 2,
            "progress_interval": 30,
            "checkpoint_every": 10**6,  # only the checkpoint written at the stop
            "averaging": {**AVERAGING, "fraction": args.fraction, "average_every": args.average_every},
            "optimizer": merge({"lr": args.lr, "warmup_steps": warmup, "decay_steps": epochs - warmup, "weight_decay": 0.01}, optimizer),
        },
        "trainer": {"micro_batch_size": MICRO_BATCH, "max_in_flight": 6, "request_timeout": 120, "refresh_period": 1, "report_every": 10},
        "data": {"seq_len": SEQ_LEN},
    }
    return load_run_config("local-tiny", overrides), steps


def train_sync(config, batches: list, val_batches: list, eval_every: int) -> dict:
    """(a): one optimizer per stage, each step on the mean gradient of ``target_batch_size`` samples."""
    import torch

    from agora_server.optim import make_optimizer

    torch.manual_seed(config.seed)
    stages = build_stages(config)
    optimizer_config = config.server.optimizer
    optimizers = [make_optimizer(stage, optimizer_config) for stage in stages]
    curve = [{"epoch": 0, "tokens": 0, "val_loss": round(evaluate(stages, val_batches), 4)}]
    samples = batches_in_epoch = epoch = tokens = 0
    started = time.perf_counter()
    for tokens_batch, labels in batches:
        composed_loss(stages, tokens_batch, labels).backward()
        samples += tokens_batch.shape[0]
        batches_in_epoch += 1
        tokens += tokens_batch.numel()
        if samples < config.server.target_batch_size:
            continue
        step_stages(stages, optimizers, optimizer_config, epoch, batches_in_epoch)
        samples = batches_in_epoch = 0
        epoch += 1
        if epoch % eval_every == 0:
            curve.append({"epoch": epoch, "tokens": tokens, "val_loss": round(evaluate(stages, val_batches), 4)})
    final = evaluate(stages, val_batches)
    return {"tokens": tokens, "epochs": epoch, "final_val_loss": round(final, 4), "curve": curve, "seconds": round(time.perf_counter() - started, 1)}


def relative_distance(a: dict, b: dict) -> float:
    diff = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    norm = sum(float(a[k].float().pow(2).sum()) for k in a)
    return math.sqrt(diff / norm)


def evaluate_replicas(config, checkpoint_dir: Path, val_batches: list) -> dict:
    """Validation loss of every head × tail pairing of the workers' final weights, and of the replicas' mean."""
    import torch

    from agora_server.server.checkpoint import load_checkpoint

    replicas = []
    for spec in config.stages:
        paths = sorted((checkpoint_dir / config.run_name / spec.name).glob("*.pt"))
        replicas.append([load_checkpoint(path) for path in paths])
        if len(paths) != WORKERS_PER_STAGE:
            raise RuntimeError(f"expected {WORKERS_PER_STAGE} checkpoints of stage {spec.name}, found {len(paths)}")
    stages = build_stages(config)
    pairings = []
    for choice in itertools.product(*(range(len(r)) for r in replicas)):
        for stage, states, index in zip(stages, replicas, choice):
            stage.load_state_dict(states[index]["model"])
        pairings.append({"workers": list(choice), "val_loss": round(evaluate(stages, val_batches), 4)})
    for stage, states in zip(stages, replicas):
        keys = states[0]["model"].keys()
        stage.load_state_dict({k: torch.stack([s["model"][k].float() for s in states]).mean(0).to(states[0]["model"][k].dtype) for k in keys})
    losses = [p["val_loss"] for p in pairings]
    return {
        "pairings": pairings,
        "mean_val_loss": round(sum(losses) / len(losses), 4),
        "worst_val_loss": max(losses),
        "replica_mean_val_loss": round(evaluate(stages, val_batches), 4),
        "epochs": {spec.name: [s["epoch"] for s in states] for spec, states in zip(config.stages, replicas)},
        "replica_relative_distance": {
            spec.name: round(relative_distance(states[0]["model"], states[1]["model"]), 5) for spec, states in zip(config.stages, replicas)
        },
    }


def run_swarm_variant(config, steps: int, val_batches: list, log_dir: Path, timeout: float) -> dict:
    result = run_swarm(config, steps, log_dir, timeout, workers_per_stage=WORKERS_PER_STAGE)
    summary = result["summary"]
    out = {
        "tokens": summary["tokens"],
        "completed": summary["completed"],
        "dropped": summary["dropped"],
        "retried": summary["retried"],
        "wall_seconds": result["wall_seconds_with_startup"],
        "leftover_processes": result["leftover_processes"],
    }
    out.update(evaluate_replicas(config, Path(config.server.checkpoint_dir), val_batches))
    rounds: dict[str, dict] = {}
    for log in sorted(log_dir.glob("server_*.log")):
        lines = event_lines(log, "AveragingRound")
        rounds[log.stem] = {
            "ok": sum("ok=True" in line for line in lines),
            "failed": sum("ok=False" in line for line in lines),
            "optimizer_steps": count_events(log, "OptimizerStepped"),
        }
    out["workers"] = rounds
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = run_and_print(lambda: run(args), args.output)
    leftovers = any(v.get("leftover_processes") for v in output["runs"].values() if isinstance(v, dict))
    return 1 if leftovers or any("error" in v for v in output["runs"].values()) else 0


def run(args: argparse.Namespace) -> dict:
    from agora_server.data import PackedBatches, validation_batches

    wanted = args.only or ["sync_adamw", "swarm_adamw", "swarm_nesterov"]
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="agora-bench-convergence-"))
    adamw_config, steps = run_config(args, {"name": "adamw"}, "bench-convergence-adamw")
    betas = [float(b) for b in args.nesterov_betas.split(",")]
    nesterov_config, _ = run_config(args, {**NESTEROV, "betas": betas}, "bench-convergence-nesterov")
    val = validation_batches(adamw_config.data, MICRO_BATCH, VAL_BATCHES)
    output: dict = {
        "benchmark": "convergence",
        "quick": args.quick,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "model": adamw_config.model.model_dump(mode="json"),
        "stage_layers": [spec.num_layers for spec in adamw_config.stages],
        "micro_batch": [MICRO_BATCH, SEQ_LEN],
        "micro_batches": steps,
        "target_batch_size": TARGET_BATCH,
        "workers_per_stage": WORKERS_PER_STAGE,
        "averaging": adamw_config.server.averaging.model_dump(mode="json"),
        "optimizers": {"adamw": adamw_config.server.optimizer.model_dump(mode="json"), "nesterov": nesterov_config.server.optimizer.model_dump(mode="json")},
        "validation": {"batches": len(val), "tokens": sum(t.numel() for t, _ in val)},
        "runs": {},
    }
    try:
        for name in wanted:
            t0 = time.perf_counter()
            print(f"[bench] {name}: {steps} micro-batches", file=sys.stderr, flush=True)
            try:
                if name == "sync_adamw":
                    batches = [b for _, b in zip(range(steps), PackedBatches(adamw_config.data, MICRO_BATCH))]
                    output["runs"][name] = train_sync(adamw_config, batches, val, eval_every=max(1, steps // 40))
                else:
                    config = adamw_config if name == "swarm_adamw" else nesterov_config
                    log_dir = log_root / name
                    config = config.model_copy(update={"server": config.server.model_copy(update={"checkpoint_dir": str(log_dir / "checkpoints")})})
                    output["runs"][name] = run_swarm_variant(config, steps, val, log_dir, args.timeout)
            except Exception as e:  # report the others even if one run fails
                output["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
            output["runs"][name]["bench_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[bench] {name}: {json.dumps({k: v for k, v in output['runs'][name].items() if 'loss' in k or k == 'error'})}", file=sys.stderr, flush=True)
    finally:
        if args.log_dir is None:
            shutil.rmtree(log_root, ignore_errors=True)
    output["summary"] = summarize(output["runs"])
    output["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return output


def summarize(runs: dict) -> dict:
    base = runs.get("sync_adamw", {}).get("final_val_loss")
    summary: dict = {"sync_adamw_val_loss": base}
    curve = [point["val_loss"] for point in runs.get("sync_adamw", {}).get("curve", [])]
    if curve:
        # after the first evaluation past warm-up, every one must be lower than the one before
        summary["sync_validation_decreasing"] = all(later < earlier for earlier, later in zip(curve[1:], curve[2:]))
    for name in ("swarm_adamw", "swarm_nesterov"):
        run = runs.get(name, {})
        if "mean_val_loss" not in run:
            continue
        summary[f"{name}_val_loss"] = run["mean_val_loss"]
        if base:
            summary[f"{name}_over_sync"] = round(run["mean_val_loss"] / base, 4)
            summary[f"{name}_replica_mean_over_sync"] = round(run["replica_mean_val_loss"] / base, 4)
    if "swarm_nesterov_over_sync" in summary:
        summary["goal"] = "swarm_nesterov_over_sync <= 1.03"
        summary["goal_met"] = summary["swarm_nesterov_over_sync"] <= 1.03
    return summary


if __name__ == "__main__":
    sys.exit(main())
