"""A stage's model, optimizer and counters behind forward/backward calls.

Calls arrive from one compute thread at a time (the server owns a single-thread executor),
so the module is never run concurrently. A head or body stage keeps the graph of a training
forward (``kept_graphs``) and runs the backward on it; without it (another worker forwarded the
micro-batch, the graph was freed, or the weights stepped since) the backward re-runs the forward
with the current weights from the inputs sent with it. Weights, gradients and the optimizer follow
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
from agora_server.server.kept_graphs import GraphKey, KeptGraph, KeptGraphs
from agora_server.server.validation import BadRequest
from agora_server.telemetry.events import Event, GradientsAveraged, NonFiniteGradients, OptimizerStepped
from agora_server.wire import GRAPH_GONE, BackwardGraph

OUT_OF_MEMORY = "CUDA out of memory"
"""The participant guide's words for a micro-batch the GPU could not hold (refusals start with them)."""


class MicroBatchOutOfMemory(RuntimeError):
    """The device ran out of memory during a micro-batch; its gradient was discarded."""


class GraphGone(LookupError):
    """A backward sent without its inputs found no graph kept for its micro-batch."""

    def __init__(self):
        super().__init__(f"{GRAPH_GONE}: this worker no longer holds the micro-batch's graph; send the backward with its inputs")


@dataclasses.dataclass
class BackendCounters:
    forward_batches: int = 0
    backward_batches: int = 0
    samples: int = 0
    """Sequences whose backward completed: the unit of contribution."""
    tokens: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    kept_graph_backwards: int = 0
    """Backwards (head or body) that ran on the graph their forward kept."""
    recomputed_backwards: int = 0
    """Backwards (head or body) that ran the forward again from the inputs sent with them."""


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
        graphs: KeptGraphs | None = None,
    ):
        """``gradients``: averages the epoch's gradients with the stage's other workers before the steps it covers.
        ``graphs``: where a head or body stage keeps the graphs of training forwards (None: it keeps none)."""
        self.stage, self.config, self.device, self.emit = stage, config, device, emit
        self.graphs = graphs if stage.kind is not StageKind.TAIL else None
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

    def forward(self, inputs: dict[str, torch.Tensor], keep: GraphKey | None = None) -> list[torch.Tensor]:
        """The stage's output (see ``forward_keeping``)."""
        return self.forward_keeping(inputs, keep)[0]

    def forward_keeping(self, inputs: dict[str, torch.Tensor], keep: GraphKey | None) -> tuple[list[torch.Tensor], bool]:
        """The stage's output, and whether its graph was kept. ``keep``: a training forward, whose graph is
        kept under that key for the backward when the store has room and the backward is expected before
        the stage's next step (this worker's samples towards the target, and those of the training forwards
        ahead of it: with other workers on the stage the step may come sooner, and the graph is then freed)."""
        graphs = self.graphs if keep is not None else None
        if graphs is not None:
            self.free_unusable_graphs()
            batch = inputs["tokens"].shape[0]
            ahead = graphs.forwarded(keep, batch)
            before_step = self._accumulated_samples + ahead + batch <= self.config.target_batch_size
            if not (before_step and graphs.room_for(graphs.estimate(inputs["tokens"].numel()))):
                graphs = None
        if graphs is None:
            out = self._guarded(self._forward, inputs)
        else:
            started = time.perf_counter()
            out, graph = self._guarded(self._forward_with_graph, inputs)
            graph.forward_seconds = time.perf_counter() - started
            graphs.keep(keep, graph)
        with self._lock:
            self.counters.forward_batches += 1
        return [out], graphs is not None

    @torch.no_grad()
    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._to_device(inputs)
        return self.stage(x["tokens"], x.get("boundary"), x.get("labels")).cpu()

    def _forward_with_graph(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, KeptGraph]:
        x = self._to_device(inputs)
        out = self._graph_forward(x)
        graph = KeptGraph(inputs=x, output=out, weights_version=self.weights.version,
                          nbytes=self.graphs.estimate(x["tokens"].numel()))
        return out.detach().cpu(), graph

    def backward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The gradients to send back (the tail: and the per-token loss), the forward recomputed."""
        return self.backward_graph(inputs, None)[0]

    def backward_graph(self, inputs: dict[str, torch.Tensor], key: GraphKey | None) -> tuple[list[torch.Tensor], BackwardGraph | None]:
        """``backward``, on the graph kept under ``key`` when there is one; also says, for a head or body
        stage, which way it ran. ``inputs`` without the stage's input (``grad`` alone): only the kept
        graph will do, and ``GraphGone`` says it is not here."""
        started = time.perf_counter()
        graph = self._kept_graph(key, inputs)
        if graph is None and "tokens" not in inputs:
            raise GraphGone()
        if graph is not None:
            outputs, x = self._guarded(self._backward_kept, graph, inputs["grad"])
            started -= graph.forward_seconds  # the throughput counts forward and backward work either way
        else:
            outputs, x = self._guarded(self._backward, inputs)
        self.weights.accumulate()
        batch, seq = x["tokens"].shape
        self._accumulated_samples += batch
        self.progress.report(self._accumulated_samples)
        how = None if self.kind is StageKind.TAIL else BackwardGraph.KEPT if graph is not None else BackwardGraph.RECOMPUTED
        self._record_backward(batch, batch * seq, time.perf_counter() - started, how)
        self.maybe_step()
        return outputs, how

    def _kept_graph(self, key: GraphKey | None, inputs: dict[str, torch.Tensor]) -> KeptGraph | None:
        if self.graphs is None or key is None:
            return None
        self.free_unusable_graphs()
        graph = self.graphs.take(key)
        if graph is not None and tuple(inputs["grad"].shape) != tuple(graph.output.shape):
            raise BadRequest(f"grad has shape {list(inputs['grad'].shape)}, expected {list(graph.output.shape)} (the forward's output)")
        return graph

    def _backward_kept(self, graph: KeptGraph, grad: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        x = graph.inputs
        with torch.enable_grad():
            graph.output.backward(grad.to(self.device, self.compute_dtype))
        boundary = x.get("boundary")
        return ([] if boundary is None else [boundary.grad.cpu()]), x

    def _graph_forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stage's output with its autograd graph, down to the input boundary's gradient."""
        boundary = x.get("boundary")
        if boundary is not None:
            boundary.requires_grad_(True)
        with torch.enable_grad():
            return self.stage(x["tokens"], boundary, x.get("labels"))

    def _backward(self, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        x = self._to_device(inputs)
        out = self._graph_forward(x)
        out.backward(x["loss_weights"] if self.kind is StageKind.TAIL else x["grad"])
        boundary = x.get("boundary")
        outputs = [] if boundary is None else [boundary.grad.cpu()]
        if self.kind is StageKind.TAIL:
            outputs.append(out.detach().cpu())
        return outputs, x

    def free_unusable_graphs(self) -> None:
        """Free the kept graphs that timed out or whose weights changed (call on the compute thread, also
        between requests, so that their memory returns even when no request comes)."""
        if self.graphs is not None:
            self.graphs.free_unusable(self.weights.version)

    def _guarded(self, compute: Callable, *args):
        """``compute(*args)``; running out of device memory refuses the micro-batch and drops whatever
        part of its gradient the backward had reached, and the worker goes on."""
        try:
            return compute(*args)
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

    def _record_backward(self, samples: int, tokens: int, elapsed: float, how: BackwardGraph | None) -> None:
        with self._lock:
            self.counters.backward_batches += 1
            self.counters.samples += samples
            self.counters.tokens += tokens
            if how is BackwardGraph.KEPT:
                self.counters.kept_graph_backwards += 1
            elif how is BackwardGraph.RECOMPUTED:
                self.counters.recomputed_backwards += 1
        rate = tokens / max(elapsed, 1e-6)
        self._throughput_ema = rate if self._throughput_ema is None else 0.8 * self._throughput_ema + 0.2 * rate
