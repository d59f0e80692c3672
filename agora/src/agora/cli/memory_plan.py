"""`python3 agora_cli.py memory-plan`: the GPU and host memory each stage of a run needs, and the
largest micro-batch a GPU fits. The preflight chooses a GPU's batch size from the same plan.

Examples:
  python3 agora_cli.py memory-plan --config llama-8b --vram-gib 24
  python3 agora_cli.py memory-plan --config llama-8b --json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the config: --help stays instant
    from agora.config import RunConfig

GUIDE_VRAM_GIB = 24.0
"""The participant guide's smallest GPU: planned for when none is named and none is found here."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agora_cli.py memory-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-8b", help="run config: a shipped name or a YAML path (default: llama-8b)")
    parser.add_argument("--vram-gib", type=float, default=None, help="GPU memory to plan for, in GiB (default: this machine's GPU, else 24)")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"stages": [{"name", "params", "gpu_gib", "host_gib", "max_batch"}, ...]}')
    return parser


def plan_run(config: RunConfig, vram_bytes: int | None):
    """A StagePlan per stage at the trainer's micro-batch and the data's sequence length."""
    from agora_server.server.memory_plan import plan_stage

    return [
        plan_stage(config.model, spec, config.boundary, config.server, config.seed, config.data.seq_len, config.trainer.micro_batch_size, vram_bytes)
        for spec in config.stages
    ]


INSTALL_BYTES = 12 * 2**30
"""Disk besides checkpoints: the environment with CUDA torch (about 7 GB), the Docker image layers or
pip cache, and the logs."""


def disk_needed(config: RunConfig) -> int:
    """Free disk a worker needs whichever stage it serves: ``FILES_AT_ONCE`` checkpoints of the largest
    stage (``server.checkpoint`` keeps no more) and the installation."""
    from agora_server.server.checkpoint import FILES_AT_ONCE
    from agora_server.server.memory_plan import checkpoint_bytes

    return FILES_AT_ONCE * max(checkpoint_bytes(plan.params) for plan in plan_run(config, None)) + INSTALL_BYTES


def largest_batch_everywhere(config: RunConfig, vram_bytes: int) -> int:
    """The largest micro-batch that fits a GPU of ``vram_bytes`` whichever stage the coordinator
    assigns (0: the GPU fits none). The run config's ``server.max_batch_size`` caps it elsewhere."""
    return min(plan.max_batch for plan in plan_run(config, vram_bytes))


def describe_policy(config: RunConfig) -> str:
    precision = config.server.precision
    placement = "on the CPU" if precision.master_weights == "cpu" else "on the GPU"
    parts = [f"{precision.dtype} weights", f"float32 master weights and optimizer state {placement}"]
    checkpointing = precision.activation_checkpointing
    parts.append({True: "per-layer activation checkpointing", False: "no activation checkpointing"}.get(
        checkpointing, "per-layer activation checkpointing where a stage needs it"))
    parts.append(f"loss in chunks of {precision.loss_chunk_tokens} tokens" if precision.loss_chunk_tokens else "loss in one piece")
    codec = config.boundary
    parts.append(f"{codec.codec} boundaries ({config.boundary_width} values per token)")
    return ", ".join(parts)


def render_table(config: RunConfig, plans, vram_gib: float) -> str:
    from agora_server.server.memory_plan import DEVICE_RESERVE_BYTES, GIB

    header = (
        f"Memory plan of {config.run_name}: micro-batch {config.trainer.micro_batch_size} x {config.data.seq_len} tokens; {describe_policy(config)}.\n"
        f"GiB per worker; a {vram_gib:g} GiB GPU leaves {vram_gib - DEVICE_RESERVE_BYTES / GIB:g} GiB for tensors.\n\n"
    )
    columns = ("stage", "layers", "params", "recompute", "weights", "grads", "optim", "consts", "activ", "GPU peak", "host", "max batch")
    rows = [columns]
    for plan in plans:
        d = plan.device
        rows.append((
            plan.name, f"{plan.layers.start}-{plan.layers.stop - 1}", f"{plan.params / 1e9:.2f}B", "yes" if plan.checkpointing else "no",
            *(f"{value / GIB:.2f}" for value in (d.weights, d.gradients, d.optimizer, d.constants, d.activations, d.peak, plan.host.total)),
            str(plan.max_batch),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) if i > 2 else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    fitting = min(plan.max_batch for plan in plans)
    batch = config.trainer.micro_batch_size
    if fitting >= batch:
        verdict = f"Every stage fits this GPU at micro-batch {batch}; the largest micro-batch every stage fits is {fitting}."
    else:
        verdict = f"At least one stage does not fit this GPU at micro-batch {batch} (max batch {fitting})."
    from agora_server.server.checkpoint import FILES_AT_ONCE
    from agora_server.server.memory_plan import checkpoint_bytes

    host = max(plan.host.total for plan in plans) / GIB
    largest = max(checkpoint_bytes(plan.params) for plan in plans)
    disk = (FILES_AT_ONCE * largest + INSTALL_BYTES) / GIB
    return header + "\n".join(lines) + (f"\n\n{verdict} Host memory per GPU: at most {host:.1f} GiB. Disk: {disk:.0f} GiB "
                                        f"({FILES_AT_ONCE} checkpoints of {largest / GIB:.1f} GiB and the installation).\n")


def this_machines_vram_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from agora.config import ConfigError, load_run_config

    try:
        config = load_run_config(args.config)
    except ConfigError as e:
        print(f"[MEMORY] {e}", file=sys.stderr)
        return 2
    vram_gib = args.vram_gib or this_machines_vram_gib() or GUIDE_VRAM_GIB
    plans = plan_run(config, int(vram_gib * 2**30))
    if args.json:
        print(json.dumps({"config": config.run_name, "vram_gib": vram_gib, "stages": [plan.to_json() for plan in plans]}, indent=2))
    else:
        print(render_table(config, plans, vram_gib), end="")
    return 0
