#!/usr/bin/env python3
"""Subspace boundary compression against dense boundaries: loss cost, bytes on the wire, speed on a slow link.

Prints one JSON object on stdout with three parts, each over the variants dense and subspace at
compression rates 8, 16 and 32 (k = hidden_size / rate numbers per token instead of hidden_size):

  loss        one process, no swarm: the stages of the benchmark model composed in-process through
              their boundary codecs, trained with the same optimizer, learning rate and schedule on
              the same batches for the same number of tokens. Validation loss every few steps on a
              fixed list of validation batches (the curve), the final validation loss and its ratio
              to dense, and the steps each variant needs to reach a target loss.
  bytes       a short real local swarm per variant (seed, one worker per stage, trainer) with
              wire_dtype bfloat16: boundary bytes per token per boundary per direction, measured
              from the payloads the trainer received (trainer-summary.json), next to the values the
              wire format predicts, and the ratio dense / compressed.
  bandwidth   the swarm's processes in network namespaces created here, one per process, joined by
              veth pairs to a bridge, every link shaped by a tbf qdisc (100 Mbit/s each way by
              default): tokens/s of dense vs subspace on the same model and micro-batches.
              Namespaces, links and processes are torn down afterwards, even on failure; stale ones
              from an earlier run (same name prefix) are removed first. Needs root (CAP_NET_ADMIN);
              if the machine refuses, the JSON says which command failed and its stderr.

Usage:
  .venv/bin/python bench/compression.py                    # the measurement (~15 minutes on 2 cores)
  .venv/bin/python bench/compression.py --quick            # smoke test with few steps (a few minutes)
  .venv/bin/python bench/compression.py --output bench/compression.json
  .venv/bin/python bench/compression.py --no-bandwidth --no-swarm-bytes    # the loss curves only

The swarms' console output, logs and configs go to a temporary directory (``--log-dir`` to keep
them elsewhere), never to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchlib import build_stages, composed_loss, evaluate, merge, run_and_print, run_swarm
from netns import NetPlan, Netns, NetSetupError, cleanup_network, probe_link

# The benchmark model: local-tiny's shape at hidden 256 (~8.5M parameters, 2.1M of them the LM head
# and 2.1M the embedding), three stages of two layers, sequences of 128 tokens.
BENCH_MODEL = {
    "vocab_size": 8192,  # fixed by the shipped tokenizer (agora-bpe-8k)
    "hidden_size": 256,
    "num_layers": 6,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 688,
    "max_seq_len": 128,
}
BENCH_STAGE_LAYERS = [2, 2, 2]
SEQ_LEN = 128
RATES = (8, 16, 32)

# (a) loss: same optimizer for every variant
LOSS_BATCH = 8  # sequences per optimizer step
LOSS_STEPS, QUICK_LOSS_STEPS = 200, 24
EVAL_EVERY, QUICK_EVAL_EVERY = 20, 6
VAL_BATCHES, QUICK_VAL_BATCHES = 8, 2
LR, WARMUP_STEPS, WEIGHT_DECAY, CLIP = 5e-4, 10, 0.01, 1.0
TARGET_MARGIN = 0.1  # target loss = dense's final validation loss + this

# (b) bytes
BYTES_STEPS, QUICK_BYTES_STEPS = 12, 4
BYTES_MICRO_BATCH = 4

# (c) bandwidth: a model whose dense boundary traffic, not its arithmetic, limits a 100 Mbit/s link on
# 2 CPU cores: wide (512) but cheap layers (SwiGLU 128), one per stage, five stages (four boundaries, all
# of whose traffic passes the trainer's link), float32 on the wire for both sides.
BW_MODEL = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "num_layers": 5,
    "num_heads": 8,
    "num_kv_heads": 4,
    "intermediate_size": 128,
    "max_seq_len": 128,
}
BW_STAGE_LAYERS = [1, 1, 1, 1, 1]
BW_MICRO_BATCH = 8
BW_STEPS, QUICK_BW_STEPS = 20, 6
BW_WARMUP = 4  # completions excluded from the steady-state rate (pipeline fill)
BW_RATE_DEFAULT = 16

NETWORK = NetPlan(ns_prefix="agora-bw-", link_prefix="agbw", subnet="10.213.57.0/24")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps everywhere: a smoke test, not a measurement")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON to this file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the swarms' logs here (default: a temporary directory, removed)")
    parser.add_argument("--no-loss", action="store_true", help="skip the loss comparison")
    parser.add_argument("--no-swarm-bytes", action="store_true", help="skip the measured-bytes swarms")
    parser.add_argument("--bandwidth", dest="bandwidth", action="store_true", default=True, help="run the bandwidth-limited swarms (default)")
    parser.add_argument("--no-bandwidth", dest="bandwidth", action="store_false", help="skip the bandwidth-limited swarms")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="subspace compression rates (default 8,16,32)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps of the loss comparison (default {LOSS_STEPS}; --quick {QUICK_LOSS_STEPS})")
    parser.add_argument("--eval-every", type=int, default=None, help=f"steps between validation evaluations (default {EVAL_EVERY})")
    parser.add_argument("--lr", type=float, default=LR, help=f"peak AdamW learning rate, the same for every variant (default {LR})")
    parser.add_argument("--link-mbit", default="100,25", help="tbf rates to run, Mbit/s on every namespace link each way; the first is the headline (default 100,25)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="also add a netem delay on every link (needs sch_netem; default 0: none)")
    parser.add_argument("--bw-rate", type=int, default=BW_RATE_DEFAULT, help=f"compression rate of the bandwidth run's subspace side (default {BW_RATE_DEFAULT})")
    parser.add_argument("--bw-wire-dtype", default="float32", choices=("float32", "bfloat16"), help="wire dtype of both sides of the bandwidth run")
    parser.add_argument("--bw-steps", type=int, default=None, help=f"micro-batches per bandwidth swarm (default {BW_STEPS})")
    parser.add_argument("--no-unshaped-reference", action="store_true", help="skip the bandwidth run's reference swarms on unshaped links")
    args = parser.parse_args(argv)
    args.rates = [int(r) for r in args.rates.split(",") if r]
    args.link_mbit = [float(r) for r in str(args.link_mbit).split(",") if r]
    args.steps = args.steps or (QUICK_LOSS_STEPS if args.quick else LOSS_STEPS)
    args.eval_every = args.eval_every or (QUICK_EVAL_EVERY if args.quick else EVAL_EVERY)
    args.bw_steps = args.bw_steps or (QUICK_BW_STEPS if args.quick else BW_STEPS)
    if args.bw_steps <= BW_WARMUP + 1 and not args.quick:
        parser.error(f"--bw-steps must exceed {BW_WARMUP + 1}")
    return args


def variants(rates: list[int]) -> list[tuple[str, dict]]:
    """(name, boundary overrides) for dense and every subspace rate."""
    return [("dense", {"codec": "dense"})] + [(f"subspace_r{r}", {"codec": "subspace", "compression_rate": r}) for r in rates]


def run_config(model: dict, stage_layers: list[int], boundary: dict, *, run_name: str, micro_batch: int, extra: dict | None = None):
    from agora.config import load_run_config

    overrides = {
        "run_name": run_name,
        "model": dict(model),
        "stage_layers": list(stage_layers),
        "boundary": dict(boundary),
        "server": {
            "max_batch_size": max(8, micro_batch),
            "target_batch_size": 8,
            "announce_period": 2,
            "progress_interval": 10,
            "cpu_threads": 1,
            "allow_cpu": True,
            "optimizer": {"lr": LR, "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY, "clip_grad_norm": CLIP},
        },
        "trainer": {
            "micro_batch_size": micro_batch,
            "request_timeout": 300,  # queueing behind a slow link must never count as a failed call
            "refresh_period": 1,
            "stage_wait_timeout": 180,
            "report_every": 1,
        },
        "data": {"source": "local", "tokenizer": "agora-bpe-8k", "seq_len": SEQ_LEN},
    }
    return load_run_config("local-tiny", merge(overrides, extra or {}))


# --- (a) loss at equal tokens, one process ------------------------------------------------------------------


def train_variant(config, boundary, batches, val_batches, eval_every: int, lr: float) -> dict:
    import torch

    from agora_server.optim import OptimizerConfig, build_optimizer, clip_and_check

    torch.manual_seed(0)
    stages = build_stages(config, boundary)
    optimizer_config = OptimizerConfig(name="adamw", lr=lr, warmup_steps=WARMUP_STEPS, weight_decay=WEIGHT_DECAY, clip_grad_norm=CLIP)
    optimizers = [build_optimizer(stage, optimizer_config) for stage in stages]
    tokens_per_step = batches[0][0].numel()
    curve = [{"step": 0, "tokens": 0, "val_loss": round(evaluate(stages, val_batches), 4)}]
    train_losses: list[float] = []
    skipped = 0
    started = time.perf_counter()
    train_seconds = 0.0
    for step, (tokens, labels) in enumerate(batches, start=1):
        t0 = time.perf_counter()
        loss = composed_loss(stages, tokens, labels)
        loss.backward()
        for stage, (optimizer, schedule) in zip(stages, optimizers):  # every stage clips and steps on its own, as workers do
            norm = clip_and_check(stage, CLIP)
            if torch.isfinite(torch.tensor(norm)):
                optimizer.step()
                schedule.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        train_losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == len(batches):
            window = train_losses[-eval_every:]
            curve.append(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "val_loss": round(evaluate(stages, val_batches), 4),
                    "train_loss_mean_since_last": round(sum(window) / len(window), 4),
                }
            )
    params = sum(p.numel() for stage in stages for p in stage.parameters())
    return {
        "boundary": boundary.model_dump(mode="json"),
        "boundary_width": boundary.width(config.model.hidden_size),
        "trainable_parameters": params,
        "curve": curve,
        "final_val_loss": curve[-1]["val_loss"],
        "best_val_loss": min(point["val_loss"] for point in curve),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / len(batches), 3),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "non_finite_steps_skipped": skipped,
    }


def first_reaching(curve: list[dict], target: float) -> dict | None:
    for point in curve:
        if point["val_loss"] <= target:
            return {"step": point["step"], "tokens": point["tokens"]}
    return None


def run_loss(args) -> dict:
    import torch

    from agora_server.data import PackedBatches, validation_batches
    from agora_server.models import BoundaryConfig

    config = run_config(BENCH_MODEL, BENCH_STAGE_LAYERS, {"codec": "dense"}, run_name="bench-compression", micro_batch=LOSS_BATCH)
    # identical batches for every variant: the train stream (seed config.data.seed), tokenised once
    stream = iter(PackedBatches(config.data, LOSS_BATCH))
    batches = [next(stream) for _ in range(args.steps)]
    del stream
    val = validation_batches(config.data, LOSS_BATCH, QUICK_VAL_BATCHES if args.quick else VAL_BATCHES)
    results: dict[str, dict] = {}
    for name, boundary in variants(args.rates):
        print(f"[bench] loss: training {name} for {args.steps} steps", file=sys.stderr, flush=True)
        results[name] = train_variant(config, BoundaryConfig(**boundary), batches, val, args.eval_every, args.lr)
        print(f"[bench] loss: {name} final val {results[name]['final_val_loss']} ({results[name]['wall_seconds']} s)", file=sys.stderr, flush=True)

    dense_final = results["dense"]["final_val_loss"]
    target = round(dense_final + TARGET_MARGIN, 4)
    dense_reach = first_reaching(results["dense"]["curve"], target)
    summary = {}
    for name, result in results.items():
        reach = first_reaching(result["curve"], target)
        result["steps_to_target"] = reach["step"] if reach else None
        result["tokens_to_target"] = reach["tokens"] if reach else None
        result["val_loss_ratio_to_dense"] = round(result["final_val_loss"] / dense_final, 4)
        result["val_loss_increase_pct"] = round(100 * (result["final_val_loss"] / dense_final - 1), 2)
        # dense's loss at each point of the curve: the same tokens, so the ratio is the whole-curve answer
        result["val_loss_ratio_curve"] = [
            {"tokens": p["tokens"], "ratio": round(p["val_loss"] / d["val_loss"], 4)}
            for p, d in zip(result["curve"], results["dense"]["curve"])
        ]
        summary[name] = {
            "final_val_loss": result["final_val_loss"],
            "ratio_to_dense": result["val_loss_ratio_to_dense"],
            "increase_pct": result["val_loss_increase_pct"],
            "steps_to_target": result["steps_to_target"],
            "steps_to_target_ratio_to_dense": (
                round(reach["step"] / dense_reach["step"], 3) if reach and dense_reach else None
            ),
            "seconds_per_step": result["seconds_per_step"],
        }
    return {
        "model": {**BENCH_MODEL, "stage_layers": BENCH_STAGE_LAYERS, "seq_len": SEQ_LEN},
        "batch": {"sequences": LOSS_BATCH, "seq_len": SEQ_LEN, "tokens_per_step": LOSS_BATCH * SEQ_LEN},
        "steps": args.steps,
        "tokens": args.steps * LOSS_BATCH * SEQ_LEN,
        "eval_every_steps": args.eval_every,
        "validation": {"batches": len(val), "tokens": sum(t.numel() for t, _ in val)},
        "optimizer": {
            "name": "adamw", "lr": args.lr, "warmup_steps": WARMUP_STEPS, "schedule": "linear warm-up, then constant",
            "weight_decay": WEIGHT_DECAY, "betas": [0.9, 0.95], "clip_grad_norm_per_stage": CLIP,
        },
        "torch_threads": torch.get_num_threads(),
        "target": {
            "definition": f"dense's final validation loss + {TARGET_MARGIN}",
            "val_loss": target,
            "resolution_steps": args.eval_every,
        },
        "summary": summary,
        "variants": results,
        "notes": [
            "Every variant starts from the same seed, sees the same batches in the same order and steps the same "
            "optimizer; only the boundary codec differs. Validation batches are the first ones of the held-out split, "
            "identical for every variant, so the ratios at equal tokens compare like with like; bumps shared by all "
            "curves come from the order of the training data (Python standard-library source files).",
            "The subspace model has fewer trainable parameters: its embedding is V x k instead of V x d and its "
            "residual-branch output projections write k instead of d numbers (see trainable_parameters).",
            f"The learning rate ({args.lr}) was picked for dense; in 160-step development runs of this set-up, 5e-4, "
            "1e-3 and 2e-3 gave dense 6.07 / 6.11 / 6.56 and subspace rate 32 6.39 / 6.58 / (not run), rate 16 "
            "6.22 / 6.22 / 6.83: the subspace variants do not prefer a larger rate, and rate 32 is hurt more by a larger one.",
        ],
    }


# --- swarms -------------------------------------------------------------------------------------------------


def expected_bytes(boundary, hidden: int) -> dict:
    from agora_server.wire import id_slots

    wire = boundary.torch_wire_dtype
    width = boundary.width(hidden)
    return {
        "forward": (width + id_slots(wire)) * wire.itemsize,  # values + the token id's int32 bit pattern
        "backward": width * wire.itemsize,
        "width": width,
    }


# --- (b) measured boundary bytes ------------------------------------------------------------------------------


def run_bytes(args, log_root: Path) -> dict:
    from agora_server.models import BoundaryConfig

    steps = QUICK_BYTES_STEPS if args.quick else BYTES_STEPS
    out: dict = {
        "model": {**BENCH_MODEL, "stage_layers": BENCH_STAGE_LAYERS, "seq_len": SEQ_LEN},
        "micro_batch_size": BYTES_MICRO_BATCH,
        "micro_batches": steps,
        "wire_dtype": "bfloat16",
        "variants": {},
    }
    per_variant = out["variants"]
    for name, boundary in variants(args.rates):
        boundary = {**boundary, "wire_dtype": "bfloat16"}
        config = run_config(BENCH_MODEL, BENCH_STAGE_LAYERS, boundary, run_name="bench-compression-bytes", micro_batch=BYTES_MICRO_BATCH)
        print(f"[bench] bytes: swarm {name}", file=sys.stderr, flush=True)
        try:
            swarm = run_swarm(config, steps, log_root / f"bytes-{name}", timeout=300 + 30 * steps)
        except Exception as e:
            per_variant[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        summary = swarm["summary"]
        boundaries = len(config.stages) - 1
        tokens = summary["tokens"]
        measured = {d: summary["boundary_bytes"][d] / tokens / boundaries for d in ("forward", "backward")}
        expected = expected_bytes(BoundaryConfig(**boundary), BENCH_MODEL["hidden_size"])
        per_variant[name] = {
            "boundary_width": expected["width"],
            "completed": summary["completed"],
            "dropped": summary["dropped"],
            "tokens": tokens,
            "boundaries": boundaries,
            "boundary_bytes_total": summary["boundary_bytes"],
            "bytes_per_token_per_boundary": {d: round(v, 3) for d, v in measured.items()},
            "bytes_per_token_per_boundary_both_directions": round(sum(measured.values()), 3),
            "expected_bytes_per_token_per_boundary": {"forward": expected["forward"], "backward": expected["backward"]},
            "matches_expected": all(abs(measured[d] - expected[d]) < 1e-6 for d in ("forward", "backward")),
            "trainer_bytes_sent": summary["bytes_sent"],
            "trainer_bytes_received": summary["bytes_received"],
            "trainer_payload_bytes_per_token": round(
                (sum(summary["bytes_sent"].values()) + sum(summary["bytes_received"].values())) / tokens, 1
            ),
            "leftover_processes": swarm["leftover_processes"],
        }
    dense = per_variant.get("dense", {})
    if "bytes_per_token_per_boundary" in dense:
        for name, result in per_variant.items():
            if "bytes_per_token_per_boundary" not in result:
                continue
            m, d = result["bytes_per_token_per_boundary"], dense["bytes_per_token_per_boundary"]
            result["ratio_dense_over_this"] = {
                "forward": round(d["forward"] / m["forward"], 3),
                "backward": round(d["backward"] / m["backward"], 3),
                "both_directions": round(
                    dense["bytes_per_token_per_boundary_both_directions"] / result["bytes_per_token_per_boundary_both_directions"], 3
                ),
                "trainer_payload": round(dense["trainer_payload_bytes_per_token"] / result["trainer_payload_bytes_per_token"], 3),
            }
    out["summary"] = {
        name: {
            "bytes_per_token_per_boundary": r.get("bytes_per_token_per_boundary"),
            "expected": r.get("expected_bytes_per_token_per_boundary"),
            "matches_expected": r.get("matches_expected"),
            "ratio_dense_over_this": r.get("ratio_dense_over_this"),
            **({"error": r["error"]} if "error" in r else {}),
        }
        for name, r in per_variant.items()
    }
    return out


# --- (c) bandwidth-limited swarm in network namespaces -----------------------------------------------------------


def steady_rate(reports: list[tuple[float, int]], tokens_per_mb: int) -> dict | None:
    start = next(((t, k) for t, k in reports if k >= BW_WARMUP), None)
    end = reports[-1] if reports else None
    if start is None or end is None or end[1] <= start[1] or end[0] <= start[0]:
        return None
    return {
        "from_completed": start[1],
        "to_completed": end[1],
        "seconds": round(end[0] - start[0], 2),
        "tokens_per_s": round((end[1] - start[1]) * tokens_per_mb / (end[0] - start[0]), 1),
    }


def bandwidth_swarm(args, name: str, boundary: dict, net: Netns, log_dir: Path) -> dict:
    config = run_config(
        BW_MODEL, BW_STAGE_LAYERS, {**boundary, "wire_dtype": args.bw_wire_dtype},
        run_name="bench-compression-bw", micro_batch=BW_MICRO_BATCH,
        extra={"trainer": {"max_in_flight": 2 * len(BW_STAGE_LAYERS)}, "server": {"max_batch_size": BW_MICRO_BATCH}},
    )
    tokens_per_mb = BW_MICRO_BATCH * SEQ_LEN
    swarm = run_swarm(config, args.bw_steps, log_dir, timeout=300 + 60 * args.bw_steps, wrap=net.wrap, host=net.host)
    summary = swarm["summary"]
    payload = sum(summary["bytes_sent"].values()) + sum(summary["bytes_received"].values())
    sent = sum(summary["bytes_sent"].values())
    received = sum(summary["bytes_received"].values())
    return {
        "boundary": config.boundary.model_dump(mode="json"),
        "boundary_width": config.boundary_width,
        "completed": summary["completed"],
        "dropped": summary["dropped"],
        "retried": summary["retried"],
        "tokens": summary["tokens"],
        "seconds": round(summary["seconds"], 2),
        "tokens_per_s": round(summary["tokens"] / summary["seconds"], 1),
        "steady_state": steady_rate(swarm["reports"], tokens_per_mb),
        "trainer_payload_bytes_per_token": round(payload / summary["tokens"], 1),
        "trainer_sent_mbit_per_s": round(sent * 8 / summary["seconds"] / 1e6, 2),
        "trainer_received_mbit_per_s": round(received * 8 / summary["seconds"] / 1e6, 2),
        "loss_first": summary["losses"][0][1] if summary["losses"] else None,
        "loss_last": summary["losses"][-1][1] if summary["losses"] else None,
        "wall_seconds_with_startup": swarm["wall_seconds_with_startup"],
        "leftover_processes": swarm["leftover_processes"],
    }


def swarm_pair(args, pair, net: Netns, log_root: Path, key: str, where: str) -> dict:
    """Both variants' swarms on the same links; a failed one records its error and the other still runs."""
    runs = {}
    for name, boundary in pair:
        print(f"[bench] bandwidth: swarm {name} {where}", file=sys.stderr, flush=True)
        try:
            runs[name] = bandwidth_swarm(args, name, boundary, net, log_root / f"bw-{key}-{name}")
        except Exception as e:
            runs[name] = {"error": f"{type(e).__name__}: {e}"}
    return runs


def run_bandwidth(args, log_root: Path) -> dict:
    from agora_server.models import split_into_stages

    stages = [spec.name for spec in split_into_stages(BW_MODEL["num_layers"], BW_STAGE_LAYERS)]
    names = ["seed", *[f"{stage}#0" for stage in stages], "trainer"]
    pair = [("dense", {"codec": "dense"}), (f"subspace_r{args.bw_rate}", {"codec": "subspace", "compression_rate": args.bw_rate})]
    out: dict = {
        "link": {
            "mbit_per_s_each_direction": args.link_mbit,
            "qdisc": "tbf rate <R>mbit burst 64kb latency 50ms on both ends of every veth (egress of each end)",
            "netem_delay_ms_requested": args.delay_ms,
        },
        "topology": f"one network namespace per process (seed, {', '.join(stages)} workers, trainer), each joined by a "
        f"veth pair to the bridge {NETWORK.bridge} in the root namespace; addresses in {NETWORK.subnet}. The trainer sends and receives "
        "every activation and gradient, so its link carries all boundary traffic.",
        "model": {**BW_MODEL, "stage_layers": BW_STAGE_LAYERS, "seq_len": SEQ_LEN},
        "micro_batch_size": BW_MICRO_BATCH,
        "micro_batches": args.bw_steps,
        "wire_dtype": args.bw_wire_dtype,
        "compressed": pair[1][0],
        "primary_mbit": args.link_mbit[0],
        "tokens_per_s_dense": None,
        "tokens_per_s_compressed": None,
        "speedup": None,
    }
    if os.geteuid() != 0:
        out["error"] = {"command": "(precondition)", "returncode": None, "stderr": "not running as root: network namespaces need CAP_NET_ADMIN"}
        return out
    out["stale_cleanup_before"] = cleanup_network(NETWORK)
    net = Netns(names, args.delay_ms, NETWORK)
    try:
        try:
            net.up()
            net.shape(args.link_mbit[0])
        except NetSetupError as e:
            out["error"] = e.to_json()
            return out
        out["netem_error"] = net.netem_error
        out["notes"] = net.notes
        out["by_link"] = {}
        for mbit in args.link_mbit:
            key = f"{mbit:g}mbit"
            entry: dict = out["by_link"].setdefault(key, {})
            try:
                net.shape(mbit)
            except NetSetupError as e:
                entry["error"] = e.to_json()
                continue
            try:
                entry["link_probe"] = probe_link(net, "trainer", "head#0", 2 if args.quick else max(2, int(mbit / 12)))
            except Exception as e:
                entry["link_probe"] = {"error": f"{type(e).__name__}: {e}"}
            entry["runs"] = swarm_pair(args, pair, net, log_root, key, f"behind {mbit:g} Mbit/s links")
            entry.update(compare(entry["runs"], pair))
        primary = out["by_link"].get(f"{args.link_mbit[0]:g}mbit", {})
        for field in ("tokens_per_s_dense", "tokens_per_s_compressed", "speedup", "steady_state_speedup"):
            out[field] = primary.get(field)

        if not args.no_unshaped_reference:
            # the same namespaces without the tbf qdiscs: what the machine's cores allow, to show what the link costs
            entry = out["unshaped"] = {}
            try:
                net.unshape()
            except NetSetupError as e:
                entry["error"] = e.to_json()
            else:
                entry["runs"] = swarm_pair(args, pair, net, log_root, "unshaped", "on unshaped links (reference)")
                entry.update(compare(entry["runs"], pair))
                for key, shaped in out["by_link"].items():
                    shaped["shaped_over_unshaped"] = {
                        name: round(shaped["runs"][name]["tokens_per_s"] / entry["runs"][name]["tokens_per_s"], 3)
                        for name, _ in pair
                        if "tokens_per_s" in shaped.get("runs", {}).get(name, {}) and "tokens_per_s" in entry["runs"].get(name, {})
                    }
    finally:
        out["teardown"] = cleanup_network(NETWORK)
    return out


def compare(runs: dict, pair) -> dict:
    (dense_name, _), (compressed_name, _) = pair
    dense, compressed = runs.get(dense_name, {}), runs.get(compressed_name, {})
    if "tokens_per_s" not in dense or "tokens_per_s" not in compressed:
        return {}
    result = {
        "tokens_per_s_dense": dense["tokens_per_s"],
        "tokens_per_s_compressed": compressed["tokens_per_s"],
        "speedup": round(compressed["tokens_per_s"] / dense["tokens_per_s"], 3),
    }
    if dense.get("steady_state") and compressed.get("steady_state"):
        result["steady_state_tokens_per_s_dense"] = dense["steady_state"]["tokens_per_s"]
        result["steady_state_tokens_per_s_compressed"] = compressed["steady_state"]["tokens_per_s"]
        result["steady_state_speedup"] = round(compressed["steady_state"]["tokens_per_s"] / dense["steady_state"]["tokens_per_s"], 3)
    return result


# --- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl+C: the finally blocks stop the swarms and remove the namespaces, and the
    # JSON still comes out with the parts finished so far
    signal.signal(signal.SIGTERM, _on_sigterm)
    output = run_and_print(lambda: run(args), args.output)
    bw = output.get("bandwidth") or {}
    leftovers = bw.get("teardown", {}).get("namespaces_left") or bw.get("teardown", {}).get("links_left")
    return 1 if leftovers or "interrupted" in output else 0


class Interrupted(BaseException):
    """SIGTERM or Ctrl+C: stop the current part, tear down, and print what was measured."""


def _on_sigterm(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise Interrupted("SIGTERM")


def _write_partial(args, output: dict) -> None:
    """With --output, keep the file current after every part, so an interrupted run leaves its results."""
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({**output, "partial": True}, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 0.6:
        print(f"[bench] load average is {load_before[0]:.2f}: other work on this machine will skew the timings", file=sys.stderr)
    output: dict = {"benchmark": "compression", "quick": args.quick, "variants": [name for name, _ in variants(args.rates)]}
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="agora-bench-compression-"))
    parts = [
        ("loss", not args.no_loss, lambda: run_loss(args)),
        ("bytes", not args.no_swarm_bytes, lambda: run_bytes(args, log_root)),
        ("bandwidth", args.bandwidth, lambda: run_bandwidth(args, log_root)),
    ]
    try:
        for name, wanted, part in parts:
            if not wanted:
                continue
            t0 = time.perf_counter()
            try:
                output[name] = part()
            except (Interrupted, KeyboardInterrupt) as e:
                output["interrupted"] = f"{type(e).__name__} {e} during the {name} part"
                if name == "bandwidth":  # its own finally removed the namespaces; say what is left
                    output["bandwidth"] = {"teardown": cleanup_network(NETWORK)}
                break
            output[name]["seconds"] = round(time.perf_counter() - t0, 1)
            output[name]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            _write_partial(args, output)
    finally:
        if args.log_dir is None:
            shutil.rmtree(log_root, ignore_errors=True)
    output["side_by_side"] = side_by_side(output)
    output["load_average_before"] = [round(x, 2) for x in load_before]
    output["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    output["cores"] = os.cpu_count()
    output["wall_seconds"] = round(time.perf_counter() - started, 1)
    output["log_dir"] = str(args.log_dir) if args.log_dir else None
    return output


def side_by_side(output: dict) -> dict:
    """One row per variant: bytes ratio and loss ratio from this run, next to each other."""
    rows = {}
    loss = (output.get("loss") or {}).get("summary", {})
    nbytes = (output.get("bytes") or {}).get("summary", {})
    for name in output["variants"]:
        ratio = (nbytes.get(name) or {}).get("ratio_dense_over_this") or {}
        row = {
            "fewer_boundary_bytes_x": ratio.get("both_directions"),
            "fewer_forward_bytes_x": ratio.get("forward"),
            "val_loss_ratio_to_dense": (loss.get(name) or {}).get("ratio_to_dense"),
            "val_loss_increase_pct": (loss.get(name) or {}).get("increase_pct"),
            "steps_to_target": (loss.get(name) or {}).get("steps_to_target"),
        }
        if row["fewer_boundary_bytes_x"] is not None and row["val_loss_increase_pct"] is not None:
            row["meets_goal_16x_at_5pct"] = row["fewer_boundary_bytes_x"] >= 16 and row["val_loss_increase_pct"] <= 5
        rows[name] = row
    bw = output.get("bandwidth") or {}
    if bw.get("by_link"):
        rows["bandwidth_limited_speedup"] = {
            "compressed": bw.get("compressed"),
            "wire_dtype": bw.get("wire_dtype"),
            **{key: entry.get("speedup") for key, entry in bw["by_link"].items()},
            **({"unshaped": bw["unshaped"].get("speedup")} if bw.get("unshaped") else {}),
        }
    return rows


if __name__ == "__main__":
    sys.exit(main())
