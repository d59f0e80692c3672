"""Does the asynchronous swarm learn as well as synchronous training? Validation loss at equal tokens, over seeds.

Prints one JSON object on stdout. For every seed (the model's initial weights and the data order) the
same model is trained on the same micro-batches by:

  a  sync_adamw         one process: the stages composed in-process, one optimizer per stage stepping
                        on the mean gradient of every ``target_batch_size`` samples (synchronous
                        data-parallel training, as if all workers of a stage pooled their gradients).
  b  swarm_adamw        a real local swarm, 2 stages x 2 workers and one trainer keeping micro-batches
                        in flight (gradients cross stages up to half an epoch late): when the stage
                        has processed ``target_batch_size`` samples its workers average their
                        gradients and step (``averaging.gradient_epochs``; with ``--gradient-epochs``
                        lower than the run, each worker steps on its own afterwards and SPARTA keeps
                        the replicas together). AdamW.
  c  swarm_nesterov     the same swarm with the Nesterov-corrected update (``NesterovAdamW``).
  d  emulated_adamw,    a deterministic single-process emulation of (b) and (c) (``swarm_emulation``):
     emulated_nesterov  the same delays, replicas and SPARTA without processes, checked against them.

The swarms' weights are read from the checkpoints their workers write as they stop; every pairing of a
head worker with a tail worker is evaluated (the model a participant would hold) and the mean over
pairings is the run's loss. The summary divides each arm's loss by (a)'s of the same seed (paired: same
initial weights, same batches) and gives the mean of those ratios with a 95% t-interval.
Goal: ``swarm_nesterov_over_sync_ci_high <= 1.02`` and the corrected swarm below the AdamW swarm.

Usage:
  .venv/bin/python bench/convergence.py --output bench/results/convergence.json   # every arm, 3 seeds (~1 hour)
  .venv/bin/python bench/convergence.py --arms sync_adamw,emulated_adamw,emulated_nesterov --seeds 0,1,2,3,4
  .venv/bin/python bench/convergence.py --quick                                   # smoke test; its ratios mean nothing
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import build_stages, composed_loss, evaluate, merge, run_and_print, run_swarm, step_stages

MICRO_BATCH = 4
SEQ_LEN = 128
TARGET_BATCH = 16  # samples per epoch (optimizer step) of a stage
IN_FLIGHT = 2  # micro-batches the trainer keeps going: 8 samples, half an epoch of delay (trainer.max_delay_epochs)
STEPS = 800  # micro-batches: 200 epochs
GRADIENT_EPOCHS = 10**6  # the workers of a stage average gradients for the whole run
QUICK_STEPS = 64
SEEDS = "0,1,2"
VAL_BATCHES = 24
WORKERS_PER_STAGE = 2
LR = 1e-3
WARMUP_EPOCHS = 20
# groups of 2: a gradient round starts as soon as both workers of the stage have joined it
AVERAGING = {"fraction": 0.25, "average_every": 4, "matchmaking_time": 2.0, "request_timeout": 1.0, "averaging_timeout": 30.0, "target_group_size": 2}
# β1 = 0.9: a momentum horizon of 10 epochs, 5% of the run (β1 = 0.99 needs thousands of steps to pay off)
NESTEROV = {"name": "nesterov", "betas": [0.9, 0.999], "momentum_start": 0.5, "momentum_warmup_steps": WARMUP_EPOCHS}
ARMS = ("sync_adamw", "swarm_adamw", "swarm_nesterov", "emulated_adamw", "emulated_nesterov")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test, not a measurement")
    parser.add_argument("--seeds", default=SEEDS, help=f"comma-separated seeds: initial weights and data order of each paired run (default {SEEDS})")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to run (default all: {','.join(ARMS)}); sync_adamw always runs")
    parser.add_argument("--steps", type=int, default=None, help=f"micro-batches of {MICRO_BATCH} x {SEQ_LEN} tokens per run (default {STEPS})")
    parser.add_argument("--target-batch", type=int, default=TARGET_BATCH, help=f"samples per epoch of a stage (default {TARGET_BATCH})")
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT, help=f"micro-batches the trainer keeps in the pipeline (default {IN_FLIGHT})")
    parser.add_argument("--lr", type=float, default=LR, help=f"peak learning rate of every run (default {LR})")
    parser.add_argument("--fraction", type=float, default=AVERAGING["fraction"], help=f"SPARTA fraction p per round (default {AVERAGING['fraction']})")
    parser.add_argument("--average-every", type=int, default=AVERAGING["average_every"], help=f"epochs between rounds (default {AVERAGING['average_every']})")
    parser.add_argument("--gradient-epochs", type=int, default=GRADIENT_EPOCHS, help="epochs (from the first) in which the workers of a stage average gradients before stepping; 0: SPARTA only (default: all)")
    parser.add_argument("--nesterov-betas", default=",".join(map(str, NESTEROV["betas"])), help="β1,β2 of the corrected arms (default %(default)s)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    parser.add_argument("--log-dir", type=Path, help="keep the swarms' logs and checkpoints here (default: a temporary directory, removed)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a swarm run may take (default 3600)")
    args = parser.parse_args(argv)
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.arms = ["sync_adamw", *(arm for arm in args.arms.split(",") if arm != "sync_adamw")]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    args.steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    return args


def run_config(args, optimizer: dict, seed: int, run_name: str):
    from agora.config import load_run_config

    epochs = args.steps * MICRO_BATCH // args.target_batch
    warmup = min(WARMUP_EPOCHS, max(1, epochs // 10))
    overrides = {
        "run_name": run_name,
        "seed": seed,
        "stage_layers": [3, 3],
        "boundary": {"codec": "dense", "wire_dtype": "float32"},
        "server": {
            "target_batch_size": args.target_batch,
            "cpu_threads": 1,
            "announce_period": 2,
            "progress_interval": 30,
            "checkpoint_every": 10**6,  # only the checkpoint written at the stop
            "averaging": {**AVERAGING, "fraction": args.fraction, "average_every": args.average_every, "gradient_epochs": args.gradient_epochs},
            "optimizer": merge({"lr": args.lr, "warmup_steps": warmup, "decay_steps": epochs - warmup, "weight_decay": 0.01}, optimizer),
        },
        "trainer": {"micro_batch_size": MICRO_BATCH, "max_in_flight": args.in_flight, "request_timeout": 120, "refresh_period": 1, "report_every": 10},
        "data": {"seq_len": SEQ_LEN, "seed": seed},
    }
    return load_run_config("local-tiny", overrides)


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
    a, b = ({k: v.detach().float() for k, v in state.items()} for state in (a, b))  # saved masters are Parameters
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    norm = sum(float(a[k].pow(2).sum()) for k in a)
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
        # what the in-flight window and the gradient rounds cost: the trainer's tokens per second of training
        "tokens_per_second": round(summary["tokens"] / summary["seconds"], 1) if summary.get("seconds") else None,
        "leftover_processes": result["leftover_processes"],
    }
    out.update(evaluate_replicas(config, Path(config.server.checkpoint_dir), val_batches))
    out["workers"] = result["workers"]
    # the stage's steps are its epochs: every checkpoint of a stage holds the epoch its worker reached
    out["stage_epochs"] = {stage: max(epochs) for stage, epochs in out["epochs"].items()}
    return out


def emulate_variant(config, args, batches: list, val_batches: list) -> dict:
    from swarm_emulation import EmulatedSwarm, emulate

    swarm = EmulatedSwarm(WORKERS_PER_STAGE, args.in_flight, gradient_averaging_epochs=args.gradient_epochs,
                          sparta_fraction=args.fraction, average_every=args.average_every)
    started = time.perf_counter()
    result = emulate(config, swarm, batches, val_batches, evaluate)
    result.pop("curve")
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = run_and_print(lambda: run(args), args.output)
    runs = [run for by_arm in output["runs"].values() for run in by_arm.values()]
    return 1 if any(run.get("leftover_processes") or "error" in run for run in runs) else 0


def run(args: argparse.Namespace) -> dict:
    from agora_server.data import PackedBatches, validation_batches

    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="agora-bench-convergence-"))
    betas = [float(b) for b in args.nesterov_betas.split(",")]
    optimizers = {"adamw": {"name": "adamw"}, "nesterov": {**NESTEROV, "betas": betas}}
    first = run_config(args, optimizers["adamw"], args.seeds[0], "bench-convergence")
    val = validation_batches(first.data, MICRO_BATCH, VAL_BATCHES)
    output: dict = {
        "benchmark": "convergence",
        "quick": args.quick,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "model": first.model.model_dump(mode="json"),
        "stage_layers": [spec.num_layers for spec in first.stages],
        "micro_batch": [MICRO_BATCH, SEQ_LEN],
        "micro_batches": args.steps,
        "target_batch_size": args.target_batch,
        "in_flight": args.in_flight,
        "delay_epochs": round(args.in_flight * MICRO_BATCH / args.target_batch, 3),
        "workers_per_stage": WORKERS_PER_STAGE,
        "seeds": args.seeds,
        "averaging": first.server.averaging.model_dump(mode="json"),
        "optimizers": {name: run_config(args, opt, 0, "x").server.optimizer.model_dump(mode="json") for name, opt in optimizers.items()},
        "validation": {"batches": len(val), "tokens": sum(t.numel() for t, _ in val)},
        "runs": {arm: {} for arm in args.arms},
    }
    try:
        for seed in args.seeds:
            batches = None
            for arm in args.arms:
                kind, optimizer = arm.split("_")
                config = run_config(args, optimizers[optimizer], seed, f"bench-convergence-{optimizer}")
                print(f"[bench] seed {seed} {arm}: {args.steps} micro-batches", file=sys.stderr, flush=True)
                started = time.perf_counter()
                try:
                    if kind == "swarm":
                        log_dir = log_root / f"{arm}-{seed}"
                        config = config.model_copy(update={"server": config.server.model_copy(update={"checkpoint_dir": str(log_dir / "checkpoints")})})
                        result = run_swarm_variant(config, args.steps, val, log_dir, args.timeout)
                    else:
                        batches = batches or [b for _, b in zip(range(args.steps), PackedBatches(config.data, MICRO_BATCH))]
                        if kind == "sync":
                            result = train_sync(config, batches, val, eval_every=max(1, args.steps * MICRO_BATCH // args.target_batch // 20))
                        else:
                            result = emulate_variant(config, args, batches, val)
                except Exception as e:  # report the others even if one run fails
                    result = {"error": f"{type(e).__name__}: {e}"}
                result["bench_seconds"] = round(time.perf_counter() - started, 1)
                output["runs"][arm][str(seed)] = result
                print(f"[bench] seed {seed} {arm}: {json.dumps({k: v for k, v in result.items() if 'loss' in k or k == 'error'})}", file=sys.stderr, flush=True)
    finally:
        if args.log_dir is None:
            shutil.rmtree(log_root, ignore_errors=True)
    output["summary"] = summarize(output["runs"], args)
    output["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return output


def final_loss(run: dict) -> float | None:
    return run.get("final_val_loss", run.get("mean_val_loss"))


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval of paired ratios (the spread over seeds; none from a single seed)."""
    mean = statistics.fmean(values)
    out = {"mean": round(mean, 4), "min": round(min(values), 4), "max": round(max(values), 4)}
    if len(values) > 1:
        half = T_975[min(len(values) - 1, len(T_975)) - 1] * statistics.stdev(values) / math.sqrt(len(values))
        out.update(ci_low=round(mean - half, 4), ci_high=round(mean + half, 4))
    return out


T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
"""Student's t, two-sided 95%, for 1…10 degrees of freedom (more seeds use the last: conservative)."""


def summarize(runs: dict, args) -> dict:
    sync = {seed: final_loss(run) for seed, run in runs["sync_adamw"].items() if final_loss(run)}
    summary: dict = {"seeds": len(sync), "sync_adamw_val_loss": round(statistics.fmean(sync.values()), 4) if sync else None}
    curves = [[point["val_loss"] for point in run.get("curve", [])] for run in runs["sync_adamw"].values()]
    # after the first evaluation past warm-up, every one must be lower than the one before
    summary["sync_validation_decreasing"] = all(all(b < a for a, b in zip(c[1:], c[2:])) for c in curves if c)
    ratios: dict[str, dict] = {}
    for arm in args.arms[1:]:
        paired = {seed: final_loss(run) / sync[seed] for seed, run in runs[arm].items() if final_loss(run) and seed in sync}
        if not paired:
            continue
        ratios[arm] = paired
        stats = interval(list(paired.values()))
        summary[f"{arm}_val_loss"] = round(statistics.fmean(final_loss(runs[arm][seed]) for seed in paired), 4)
        summary[f"{arm}_over_sync"] = stats["mean"]
        summary[f"{arm}_over_sync_per_seed"] = {seed: round(r, 4) for seed, r in paired.items()}
        for key in ("ci_low", "ci_high"):
            if key in stats:
                summary[f"{arm}_over_sync_{key}"] = stats[key]
    for optimizer in ("adamw", "nesterov"):
        real, emulated = ratios.get(f"swarm_{optimizer}"), ratios.get(f"emulated_{optimizer}")
        if real and emulated:
            gaps = [emulated[seed] / real[seed] - 1 for seed in real if seed in emulated]
            summary[f"emulation_{optimizer}_gap"] = round(statistics.fmean(gaps), 4)
            summary[f"emulation_{optimizer}_within_1pct"] = abs(statistics.fmean(gaps)) <= 0.01
    expected = args.steps * MICRO_BATCH // args.target_batch
    steps = {f"{arm}/{seed}": run["stage_epochs"] for arm in ("swarm_adamw", "swarm_nesterov") for seed, run in runs.get(arm, {}).items() if "stage_epochs" in run}
    if steps:
        summary["stage_steps"] = steps
        summary["stage_steps_expected"] = expected
        summary["stage_steps_within_2pct"] = all(abs(n - expected) <= 0.02 * expected for s in steps.values() for n in s.values())
    if "swarm_nesterov_over_sync_ci_high" in summary:
        summary["goal"] = "swarm_nesterov_over_sync_ci_high <= 1.02 and swarm_nesterov_over_sync < swarm_adamw_over_sync"
        summary["goal_met"] = summary["swarm_nesterov_over_sync_ci_high"] <= 1.02 and summary["swarm_nesterov_over_sync"] < summary.get("swarm_adamw_over_sync", 0)
    return summary


if __name__ == "__main__":
    sys.exit(main())
