"""What the benchmarks share: the model's stages composed in one process, and local swarms run to the end.

Imports of the project's packages happen inside the functions, so that ``--help`` works without them.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def merge(a: dict, b: dict) -> dict:
    """``a`` with ``b``'s keys laid over it, nested dicts merged (imported late: ``--help`` needs no torch)."""
    from agora.config import deep_merge

    return deep_merge(a, b)


def run_and_print(run: Callable[[], dict], output_path: Path | None) -> dict:
    """Run a benchmark and print its JSON on stdout (and to ``output_path``); everything else the run
    prints, libraries included, goes to stderr so that stdout stays one JSON object."""
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        output = run()
    text = json.dumps(output, indent=2)
    if output_path:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text(text + "\n", encoding="utf-8")
    print(text, file=real_stdout, flush=True)
    return output


# --- the stages in one process ----------------------------------------------------------------------------


def build_stages(config, boundary=None) -> list:
    """The run's stages, initialised exactly as its workers initialise them; ``boundary`` overrides the run's codec."""
    from agora_server.models import PipelineStage, build_boundary_codec

    boundary = boundary or config.boundary
    return [
        PipelineStage(config.model, spec, build_boundary_codec(boundary, config.model, config.seed), config.seed)
        for spec in config.stages
    ]


def composed_loss(stages, tokens, labels):
    """The trainer's loss (mean over labelled tokens) of the stages composed through their boundaries
    (encode → decode at every seam)."""
    boundary = None
    for stage in stages[:-1]:
        boundary = stage(tokens, boundary)
    per_token = stages[-1](tokens, boundary, labels)
    valid = (labels != -100).float()
    return (per_token * valid).sum() / valid.sum().clamp(min=1.0)


def step_stages(stages, optimizers, optimizer_config, epoch: int, accumulated_batches: int) -> None:
    """End an epoch as every StageBackend does, for all stages at once: the mean of the accumulated
    gradients, clipped per stage, a step at the epoch's learning rate (none if the norm is not finite)."""
    import math

    from agora_server.optim import clip_and_check, learning_rate

    lr = learning_rate(epoch, optimizer_config)
    for stage, optimizer in zip(stages, optimizers):
        for param in stage.parameters():
            if param.grad is not None:
                param.grad.div_(accumulated_batches)
        if math.isfinite(clip_and_check(stage, optimizer_config.clip_grad_norm)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def evaluate(stages, batches) -> float:
    import torch

    with torch.no_grad():
        return sum(float(composed_loss(stages, t, l)) for t, l in batches) / len(batches)


# --- local swarms -----------------------------------------------------------------------------------------


def run_swarm(config, steps: int, log_dir: Path, timeout: float, *, workers_per_stage: int = 1, wrap=None, host=None) -> dict:
    """Run a local swarm until its trainer has completed ``steps`` micro-batches, then stop it (the
    workers write their checkpoints as they stop). Raises if the trainer did not finish cleanly."""
    import yaml

    from agora.local_swarm import LocalSwarm

    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    result: dict = {}
    with open(log_dir / "swarm-console.log", "w", encoding="utf-8") as console:
        swarm = LocalSwarm(
            str(config_path), config, workers_per_stage=workers_per_stage, steps=steps, log_dir=log_dir, output=console, wrap=wrap, host=host
        )
        started = time.perf_counter()
        try:
            swarm.start()
            result["trainer_exit_code"] = wait_for_trainer(swarm, timeout, result)
            result["wall_seconds_with_startup"] = round(time.perf_counter() - started, 1)
        finally:
            result["leftover_processes"] = swarm.stop()
    if result.get("trainer_exit_code") != 0 or not swarm.summary_path.is_file():
        raise RuntimeError(f"the swarm's trainer did not finish cleanly ({result}); see {log_dir}")
    result["summary"] = json.loads(swarm.summary_path.read_text())
    result["reports"] = trainer_reports(swarm)
    result["workers"] = worker_rounds(swarm)
    return result


def wait_for_trainer(swarm, timeout: float, result: dict) -> int | None:
    """The trainer's exit code; None (and result["died"]) if another child died first or ``timeout`` passed."""
    trainer = swarm.process("trainer")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = trainer.popen.poll()
        if code is not None:
            trainer.pump.join(5)
            return code
        died = {p.name: p.popen.returncode for p in swarm.processes if p.name != "trainer" and p.popen.poll() is not None}
        if died:
            result["died"] = died
            return None
        time.sleep(0.5)
    result["timed_out_after_s"] = timeout
    return None


def trainer_reports(swarm) -> list[tuple[float, int]]:
    """(time sent, completed micro-batches) of every report the swarm's trainer sent."""
    from agora_server.telemetry import events as ev

    return [(report.time, report.step) for report in swarm.events_of("trainer", ev.TrainerReport)]


def worker_rounds(swarm) -> dict[str, dict[str, int]]:
    """Per worker of the swarm ("head#0", …): its averaging rounds that succeeded and failed, and its optimizer steps."""
    from agora_server.telemetry import events as ev

    workers = {}
    for process in swarm.processes:
        if process.name in workers or process.name in ("seed", "coordinator", "trainer"):
            continue
        rounds = swarm.events_of(process.name, ev.AveragingRound)
        workers[process.name] = {
            "ok": sum(r.ok for r in rounds),
            "failed": sum(not r.ok for r in rounds),
            "optimizer_steps": len(swarm.events_of(process.name, ev.OptimizerStepped)),
        }
    return workers
