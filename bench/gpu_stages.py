"""GPU check: head, one body and the tail of llama-8b train at micro-batch 1 x 4096 on one GPU.

For each stage, one after the other on the same GPU: the stage is built as a worker builds it (random
weights from the run seed, the precision policy of the run config), then serves backward requests the
way a worker does (its forward with autograd, then the backward) until the stage's batch is complete
and the optimizer steps (on the CPU, where the policy keeps the masters and AdamW state). The stages are
planned for a 24 GiB GPU (``--plan-vram-gib``) whatever this one holds, so "auto" checkpointing decides as
on a participant's card. Recorded per stage: torch.cuda.max_memory_allocated next to the plan's peak,
tokens/s of the backward requests and of a forward request, the optimizer step's seconds, and the
process's peak host memory.

Prints one JSON object on stdout. Exit code 1 if a stage does not fit the budget (22 GiB by default).

Usage:
  .venv/bin/python bench/gpu_stages.py --output bench/results/gpu-8b-stages.json     # on a GPU (~5 minutes)
  .venv/bin/python bench/gpu_stages.py --config local-tiny --device cpu --seq-len 128  # the same code on a CPU
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

from benchlib import run_and_print

GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-8b", help="run config (default llama-8b)")
    parser.add_argument("--stages", default="head,body1,tail", help="stages to run, comma-separated (default head,body1,tail)")
    parser.add_argument("--requests", type=int, default=4, help="timed backward requests per stage; the last one completes the batch and steps (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run config's)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--budget-gib", type=float, default=22.0, help="GPU memory a stage may use (default 22)")
    parser.add_argument("--plan-vram-gib", type=float, default=24.0,
                        help="the GPU the stages are planned for, whatever this one is: it decides activation checkpointing "
                             "where the config says 'auto', as on a worker with that GPU (default 24, an RTX 4090)")
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    return parser.parse_args(argv)


def requests(kind, batch: int, seq_len: int, width: int, vocab: int, dtype, seed: int) -> tuple[dict, dict]:
    """A forward and a backward request of a stage, as the validation hands them to the backend."""
    import torch

    from agora_server.models import StageKind

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    forward = {"tokens": tokens}
    if kind is not StageKind.HEAD:
        forward["boundary"] = torch.randn(batch, seq_len, width, generator=gen).to(dtype)
    backward = dict(forward)
    if kind is StageKind.TAIL:
        forward["labels"] = backward["labels"] = tokens
        backward["loss_weights"] = torch.full((batch, seq_len), 1.0 / tokens.numel())
    else:
        backward["grad"] = (torch.randn(batch, seq_len, width, generator=gen) * 1e-3).to(dtype)
    return forward, backward


def run_stage(config, name: str, args: argparse.Namespace) -> dict:
    import torch

    from agora_server.models import PipelineStage, build_boundary_codec
    from agora_server.server import StageBackend
    from agora_server.server.memory_plan import plan_stage, with_checkpointing

    device = torch.device(args.device)
    seq_len = args.seq_len or config.data.seq_len
    batch = config.trainer.micro_batch_size
    spec = config.stage(name)
    # the stage steps once its batch is complete: after the warm-up request and the timed ones
    server = config.server.model_copy(update={"target_batch_size": batch * (args.requests + 1)})
    plan = plan_stage(config.model, spec, config.boundary, server, config.seed, seq_len, batch, int(args.plan_vram_gib * GIB))
    server = with_checkpointing(server, plan.checkpointing)  # what a worker on the planned GPU decides at start-up
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    stage = PipelineStage(config.model, spec, build_boundary_codec(config.boundary, config.model, config.seed, device), config.seed, server.precision)
    backend = StageBackend(stage, server, device)
    built_seconds = time.perf_counter() - started
    forward, backward = requests(spec.kind, batch, seq_len, config.boundary_width, config.model.vocab_size, server.precision.torch_dtype, config.seed)

    def timed(call, inputs) -> float:
        began = time.perf_counter()
        outputs = call(inputs)
        if cuda:
            torch.cuda.synchronize(device)
        assert all(bool(torch.isfinite(o.float()).all()) for o in outputs), f"{name}: non-finite output"
        return time.perf_counter() - began

    timed(backend.backward, backward)  # warm-up: kernels chosen, allocator filled
    forward_seconds = timed(backend.forward, forward)
    backward_seconds = [timed(backend.backward, backward) for _ in range(args.requests)]
    counters = backend.snapshot()
    if counters.optimizer_steps != 1:
        raise RuntimeError(f"{name}: expected one optimizer step, saw {counters.optimizer_steps} (skipped: {counters.skipped_steps})")
    tokens = batch * seq_len
    typical = statistics.median(backward_seconds[:-1]) if len(backward_seconds) > 1 else backward_seconds[0]
    result = {
        "params": plan.params,
        "micro_batch": [batch, seq_len],
        "build_seconds": round(built_seconds, 1),
        "planned_gpu_gib": round(plan.device.peak / GIB, 2),
        "activation_checkpointing": plan.checkpointing,
        "forward_tokens_per_s": round(tokens / forward_seconds, 1),
        "backward_request_tokens_per_s": round(tokens / typical, 1),
        "optimizer_step_seconds": round(max(backward_seconds[-1] - typical, 0.0), 2),
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
    }
    if cuda:
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
        result["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 2)
        result["measured_over_planned"] = round(result["max_memory_allocated_gib"] / result["planned_gpu_gib"], 3)
        result["within_budget"] = result["max_memory_reserved_gib"] <= args.budget_gib
    del backend, stage
    gc.collect()
    return result


def run(args: argparse.Namespace) -> dict:
    import torch

    from agora.config import load_run_config

    config = load_run_config(args.config)
    output: dict = {
        "benchmark": "gpu-stages",
        "config": config.run_name,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": config.server.precision.model_dump(mode="json"),
        "budget_gib": args.budget_gib,
        "stages": {},
    }
    for name in args.stages.split(","):
        print(f"[bench] {name}", file=sys.stderr, flush=True)
        output["stages"][name] = run_stage(config, name, args)
        print(f"[bench] {name}: {output['stages'][name]}", file=sys.stderr, flush=True)
    output["all_within_budget"] = all(s.get("within_budget", True) for s in output["stages"].values())
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = run_and_print(lambda: run(args), args.output)
    return 0 if output["all_within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
