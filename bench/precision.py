"""Does bfloat16 train as well as float32? Validation loss of the same model on the same batches.

Prints one JSON object on stdout. For each model seed, the benchmark model (local-tiny's 2.9M-parameter
decoder in two stages of three layers, micro-batches of 4 x 128 tokens of the offline corpus, an
optimizer step every 16 sequences) is trained twice through the workers' own code (StageBackend's
forward and backward, recompute included, stepping when the stage's batch is complete):

  float32   the default policy: float32 weights that are their own masters
  bfloat16  the production policy of llama-8b.yaml: bfloat16 weights and activations, float32 masters
            and AdamW state offloaded to the CPU, float32 gradient sums, per-layer activation
            checkpointing, the loss in chunks

Both see the same micro-batches in the same order and are scored on the same validation batches. The
goal: bfloat16's final validation loss within 1% of float32's, for every seed and both codecs.

Usage:
  .venv/bin/python bench/precision.py                                   # the measurement (~15 minutes on 2 cores)
  .venv/bin/python bench/precision.py --steps 40 --seeds 0              # smoke test
  .venv/bin/python bench/precision.py --output bench/results/precision-bf16-vs-fp32.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchlib import run_and_print

MICRO_BATCH = 4
SEQ_LEN = 128
TARGET_BATCH = 16
STEPS = 800  # micro-batches: 200 optimizer steps
VAL_BATCHES = 24
LR = 1e-3
WARMUP_EPOCHS = 20
POLICIES = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16", "master_weights": "cpu", "activation_checkpointing": True, "loss_chunk_tokens": 256},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"micro-batches per run (default {STEPS})")
    parser.add_argument("--seeds", default="0,1,2", help="model seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--codecs", default="dense,subspace", help="boundary codecs, comma-separated (default dense,subspace)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    return parser.parse_args(argv)


def run_config(seed: int, codec: str, precision: dict, steps: int):
    from agora.config import load_run_config

    epochs = steps * MICRO_BATCH // TARGET_BATCH
    warmup = min(WARMUP_EPOCHS, max(1, epochs // 10))
    return load_run_config("local-tiny", {
        "seed": seed,
        "stage_layers": [3, 3],
        "boundary": {"codec": codec, "compression_rate": 16},
        "server": {
            "target_batch_size": TARGET_BATCH,
            "precision": precision,
            "optimizer": {"lr": LR, "warmup_steps": warmup, "decay_steps": epochs - warmup, "weight_decay": 0.01},
        },
        "trainer": {"micro_batch_size": MICRO_BATCH},
        "data": {"seq_len": SEQ_LEN},
    })


def train(config, batches: list, val_batches: list, eval_every: int) -> dict:
    import torch

    from agora_server.models import PipelineStage, build_boundary_codec
    from agora_server.server import StageBackend

    codec = build_boundary_codec(config.boundary, config.model, config.seed)
    head, tail = (
        StageBackend(PipelineStage(config.model, spec, codec, config.seed, config.server.precision), config.server, torch.device("cpu"))
        for spec in config.stages
    )

    def evaluate() -> float:
        total = 0.0
        for tokens, labels in val_batches:
            (boundary,) = head.forward({"tokens": tokens})
            (losses,) = tail.forward({"tokens": tokens, "boundary": boundary, "labels": labels})
            valid = (labels != -100).float()
            total += float((losses.float() * valid).sum() / valid.sum())
        return total / len(val_batches)

    curve, started = [], time.perf_counter()
    for step, (tokens, labels) in enumerate(batches, start=1):
        (boundary,) = head.forward({"tokens": tokens})
        valid = (labels != -100).float()
        weights = valid / valid.sum().clamp(min=1.0)
        grad, _ = tail.backward({"tokens": tokens, "boundary": boundary, "labels": labels, "loss_weights": weights})
        head.backward({"tokens": tokens, "grad": grad})
        if step % eval_every == 0 or step == len(batches):
            curve.append({"micro_batches": step, "val_loss": round(evaluate(), 4)})
    return {
        "final_val_loss": curve[-1]["val_loss"],
        "optimizer_steps": head.snapshot().optimizer_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "curve": curve,
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from agora_server.data import PackedBatches, validation_batches

    torch.set_num_threads(1)  # both precisions on one core each time: their speeds are comparable
    seeds = [int(s) for s in args.seeds.split(",")]
    codecs = args.codecs.split(",")
    base = run_config(seeds[0], codecs[0], {}, args.steps)
    batches = [b for _, b in zip(range(args.steps), PackedBatches(base.data, MICRO_BATCH))]
    val = validation_batches(base.data, MICRO_BATCH, VAL_BATCHES)
    output: dict = {
        "benchmark": "precision",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "model": base.model.model_dump(mode="json"),
        "stage_layers": [spec.num_layers for spec in base.stages],
        "micro_batch": [MICRO_BATCH, SEQ_LEN],
        "micro_batches": args.steps,
        "target_batch_size": TARGET_BATCH,
        "policies": POLICIES,
        "validation": {"batches": len(val), "tokens": sum(t.numel() for t, _ in val)},
        "runs": {},
    }
    for codec in codecs:
        for seed in seeds:
            for name, precision in POLICIES.items():
                key = f"{codec}/seed{seed}/{name}"
                print(f"[bench] {key}: {args.steps} micro-batches", file=sys.stderr, flush=True)
                output["runs"][key] = train(run_config(seed, codec, precision, args.steps), batches, val, max(1, args.steps // 20))
                print(f"[bench] {key}: val loss {output['runs'][key]['final_val_loss']}", file=sys.stderr, flush=True)
    output["summary"] = summarize(output["runs"], codecs, seeds)
    output["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return output


def summarize(runs: dict, codecs: list[str], seeds: list[int]) -> dict:
    summary: dict = {"goal": "bfloat16 final validation loss within 1% of float32's for every seed and codec"}
    gaps = []
    for codec in codecs:
        ratios = [runs[f"{codec}/seed{s}/bfloat16"]["final_val_loss"] / runs[f"{codec}/seed{s}/float32"]["final_val_loss"] for s in seeds]
        gaps += [abs(r - 1) for r in ratios]
        summary[codec] = {
            "bf16_over_fp32": [round(r, 4) for r in ratios],
            "mean": round(sum(ratios) / len(ratios), 4),
            "fp32_seed_spread": round(max(runs[f"{codec}/seed{s}/float32"]["final_val_loss"] for s in seeds)
                                      - min(runs[f"{codec}/seed{s}/float32"]["final_val_loss"] for s in seeds), 4),
        }
    summary["largest_gap"] = round(max(gaps), 4)
    summary["goal_met"] = max(gaps) <= 0.01
    return summary


def main(argv: list[str] | None = None) -> int:
    output = run_and_print(lambda: run(parse_args(argv)), parse_args(argv).output)
    return 0 if output["summary"]["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
