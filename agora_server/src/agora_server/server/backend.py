"""A stage's model, optimizer and counters behind forward/backward calls.

Calls arrive from one compute thread at a time (the server owns a single-thread executor),
so the module is never run concurrently. Backward re-runs the forward with the current
weights: no activations are kept between RPCs, and any worker of a stage can serve the
backward of a micro-batch another one forwarded. Weights, gradients and the optimizer follow
the run's precision policy (``optim.master``); a backward that runs out of device memory is
refused and leaves nothing of its gradient behind.
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
from agora_server.optim import LocalProgress, MasterWeights, StageProgress, learning_rate, make_optimizer
from agora_server.optim.gradient_averaging import GradientAverager
from agora_server.server.config import ServerConfig
from agora_server.telemetry.events import Event, GradientsAveraged, NonFiniteGradients, OptimizerStepped

OUT_OF_MEMORY = "CUDA out of memory"
"""The participant guide's words for a micro-batch the GPU could not hold (refusals start with them)."""


class MicroBatchOutOfMemory(RuntimeError):
    """The device ran out of memory during a micro-batch; its gradient was discarded."""


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
        gradients: GradientAverager | None = None,
    ):
        """``gradients``: averages the epoch's gradients with the stage's other workers before the steps it covers."""
        self.stage, self.config, self.device, self.emit = stage, config, device, emit
        self.gradients = gradients
        precision = config.precision
        self.weights = MasterWeights(stage, precision, device)
        self.compute_dtype = precision.torch_dtype
        if device.type == "cuda" and precision.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.optimizer = make_optimizer(self.weights.masters, config.optimizer)
        self.progress = progress or LocalProgress(config.target_batch_size)
        self.after_epoch = after_epoch
        self.counters = BackendCounters()
        self._accumulated_samples = 0
        self._epoch_samples: int | None = None  # the epoch's count as its gradient round settled it
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
            "model": self.weights.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.progress.epoch,
            "counters": dataclasses.asdict(self.snapshot()),
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["model"])
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
            # the tail's loss weights meet a float32 loss; everything else meets the compute dtype
            dtype = torch.float32 if name == "loss_weights" else self.compute_dtype
            moved[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return moved

    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = self._guarded(self._forward, inputs)
        with self._lock:
            self.counters.forward_batches += 1
        return [out]

    @torch.no_grad()
    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._to_device(inputs)
        return self.stage(x["tokens"], x.get("boundary"), x.get("labels")).cpu()

    def backward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        started = time.perf_counter()
        outputs, x = self._guarded(self._backward, inputs)
        self.weights.accumulate()
        batch, seq = x["tokens"].shape
        self._accumulated_samples += batch
        self.progress.report(self._accumulated_samples)
        self._record_backward(batch, batch * seq, time.perf_counter() - started)
        self.maybe_step()
        return outputs

    def _backward(self, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
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
        return outputs, x

    def _guarded(self, compute: Callable, inputs: dict[str, torch.Tensor]):
        """``compute(inputs)``; running out of device memory refuses the micro-batch and drops whatever
        part of its gradient the backward had reached, and the worker goes on."""
        try:
            return compute(inputs)
        except torch.OutOfMemoryError:
            self.weights.discard()
        # past the except clause the error is gone, and with its traceback the micro-batch's tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise MicroBatchOutOfMemory(
            f"{OUT_OF_MEMORY}: a micro-batch of this size does not fit in this GPU's free memory; it was dropped and "
            "the worker goes on. If this repeats, restart with a smaller --batch_size_override."
        )

    def maybe_step(self) -> bool:
        """Step if the stage has reached its target batch (also called between requests, so a
        worker whose peers finished the epoch steps even when no request arrives)."""
        if not self.progress.ready():
            return False
        epoch = self.progress.epoch
        # while gradients are averaged, a worker that served nothing this epoch still takes the stage's step
        self._epoch_samples = None
        if self.weights.batches or self._averages_gradients(epoch):
            self._apply_gradients(epoch)
        self.after_epoch(self.progress.advance(self._epoch_samples))
        return True

    def _apply_gradients(self, epoch: int) -> None:
        # each micro-batch's loss is a mean over its tokens: the step takes the mean of their gradients
        lr = learning_rate(epoch, self.config.optimizer)
        combine = None
        if self._averages_gradients(epoch):
            combine = lambda means, batches: self._average_gradients(epoch, means, batches)  # noqa: E731
        norm = self.weights.step(self.optimizer, lr, self.config.optimizer.clip_grad_norm, combine)
        if math.isfinite(norm):
            with self._lock:
                self.counters.optimizer_steps += 1
            self.emit(OptimizerStepped(stage=self.stage.spec.name, step=epoch + 1, grad_norm=norm, lr=lr))
        else:
            with self._lock:
                self.counters.skipped_steps += 1
            self.emit(NonFiniteGradients(stage=self.stage.spec.name, grad_norm=norm))
        self._accumulated_samples = 0

    def _averages_gradients(self, epoch: int) -> bool:
        return self.gradients is not None and self.gradients.averages(epoch)

    def _average_gradients(self, epoch: int, means: list[torch.Tensor], batches: int) -> None:
        result = self.gradients.average(epoch, means, batches, self.progress.counted)
        if result is not None and result.ok:
            self._epoch_samples = result.samples
        if result is not None:
            self.emit(GradientsAveraged(stage=self.stage.spec.name, epoch=epoch, ok=result.ok, group_size=result.group_size, reason=result.reason))

    def _record_backward(self, samples: int, tokens: int, elapsed: float) -> None:
        with self._lock:
            self.counters.backward_batches += 1
            self.counters.samples += samples
            self.counters.tokens += tokens
        rate = tokens / max(elapsed, 1e-6)
        self._throughput_ema = rate if self._throughput_ema is None else 0.8 * self._throughput_ema + 0.2 * rate
