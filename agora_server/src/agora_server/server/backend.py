"""A stage's model, optimizer and counters behind forward/backward calls.

Calls arrive from one compute thread at a time (the server owns a single-thread executor),
so the module is never run concurrently. Backward re-runs the forward with the current
weights: no activations are kept between RPCs, and any worker of a stage can serve the
backward of a micro-batch another one forwarded.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

import torch

from agora_server.models.config import StageKind
from agora_server.models.stages import PipelineStage
from agora_server.optim import LocalProgress, StageProgress, clip_and_check, learning_rate, make_optimizer
from agora_server.server.config import ServerConfig
from agora_server.telemetry.events import Event, NonFiniteGradients, OptimizerStepped


@dataclasses.dataclass
class BackendCounters:
    forward_batches: int = 0
    backward_batches: int = 0
    samples: int = 0
    """Sequences whose backward completed: the unit of contribution."""
    tokens: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0


class StageBackend:
    def __init__(
        self,
        stage: PipelineStage,
        config: ServerConfig,
        device: torch.device,
        emit: Callable[[Event], None] = lambda event: None,
        progress: StageProgress | None = None,
        after_epoch: Callable[[int], None] = lambda epoch: None,
    ):
        self.stage, self.config, self.device, self.emit = stage.to(device), config, device, emit
        self.optimizer = make_optimizer(stage, config.optimizer)
        self.progress = progress or LocalProgress(config.target_batch_size)
        self.after_epoch = after_epoch
        self.counters = BackendCounters()
        self._accumulated_samples = 0
        self._accumulated_batches = 0
        self._lock = threading.Lock()  # guards counters read by reporter threads
        self._throughput_ema: float | None = None

    @property
    def kind(self) -> StageKind:
        return self.stage.kind

    def throughput(self) -> float:
        """Tokens per second of forward+backward work, measured (0 before the first backward)."""
        return self._throughput_ema or 0.0

    def state_dict(self) -> dict:
        """Everything a restarted worker needs to continue where this one is (call on the compute thread)."""
        return {
            "model": self.stage.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.progress.epoch,
            "counters": dataclasses.asdict(self.snapshot()),
        }

    def load_state_dict(self, state: dict) -> None:
        self.stage.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        with self._lock:
            self.counters = BackendCounters(**state.get("counters", {}))

    def snapshot(self) -> BackendCounters:
        with self._lock:
            return dataclasses.replace(self.counters)

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        moved = {}
        for name, tensor in inputs.items():
            tensor = tensor.to(self.device, non_blocking=True)
            moved[name] = tensor.float() if tensor.is_floating_point() else tensor
        return moved

    @torch.no_grad()
    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        x = self._to_device(inputs)
        out = self.stage(x["tokens"], x.get("boundary"), x.get("labels"))
        with self._lock:
            self.counters.forward_batches += 1
        return [out.cpu()]

    def backward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        started = time.perf_counter()
        x = self._to_device(inputs)
        boundary = x.get("boundary")
        if boundary is not None:
            boundary.requires_grad_(True)
        with torch.enable_grad():
            out = self.stage(x["tokens"], boundary, x.get("labels"))
            grad_out = x["loss_weights"] if self.kind is StageKind.TAIL else x["grad"]
            out.backward(grad_out)
        outputs = [] if boundary is None else [boundary.grad.cpu()]
        if self.kind is StageKind.TAIL:
            outputs.append(out.detach().cpu())

        batch, seq = x["tokens"].shape
        self._accumulated_samples += batch
        self._accumulated_batches += 1
        self.progress.report(self._accumulated_samples)
        self._record_backward(batch, batch * seq, time.perf_counter() - started)
        self.maybe_step()
        return outputs

    def maybe_step(self) -> bool:
        """Step if the stage has reached its target batch (also called between requests, so a
        worker whose peers finished the epoch steps even when no request arrives)."""
        if not self.progress.ready():
            return False
        epoch = self.progress.epoch
        if self._accumulated_batches:
            self._apply_gradients(epoch)
        self.after_epoch(self.progress.advance())
        return True

    def _apply_gradients(self, epoch: int) -> None:
        # each micro-batch's loss is a mean over its tokens: average them, whatever their count
        for param in self.stage.parameters():
            if param.grad is not None:
                param.grad.div_(self._accumulated_batches)
        norm = clip_and_check(self.stage, self.config.optimizer.clip_grad_norm)
        lr = learning_rate(epoch, self.config.optimizer)
        if math.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            with self._lock:
                self.counters.optimizer_steps += 1
            self.emit(OptimizerStepped(stage=self.stage.spec.name, step=epoch + 1, grad_norm=norm, lr=lr))
        else:
            # one bad micro-batch must not poison the weights: drop its gradient and carry on
            with self._lock:
                self.counters.skipped_steps += 1
            self.emit(NonFiniteGradients(stage=self.stage.spec.name, grad_norm=norm))
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated_samples = self._accumulated_batches = 0

    def _record_backward(self, samples: int, tokens: int, elapsed: float) -> None:
        with self._lock:
            self.counters.backward_batches += 1
            self.counters.samples += samples
            self.counters.tokens += tokens
        rate = tokens / max(elapsed, 1e-6)
        self._throughput_ema = rate if self._throughput_ema is None else 0.8 * self._throughput_ema + 0.2 * rate
