"""Gradient averaging: the workers of a stage step on the mean of their epoch's gradients, as one optimizer would.

Each worker of a stage accumulates the gradients of the micro-batches it served and steps when the
stage's epoch ends. Stepping on its own share makes every worker's step noisier than the stage's
batch, and the replicas drift apart between SPARTA rounds: in the convergence benchmark that costs
about 4% of the loss with two workers, more than the pipeline's staleness. For the stage's first
``gradient_epochs`` epochs the workers instead all-reduce their mean gradients (weighted by the
micro-batches behind them) before stepping, on hivemind's butterfly all-reduce, so they take the same
step from the same weights. The round blocks the step: it costs one all-reduce of the stage's
gradient per epoch (2× its size in traffic per worker), affordable early in a run and on fast links;
SPARTA keeps the replicas together afterwards. A round that finds no partner, times out, or returns
values that are not finite leaves the worker to step on its own gradient, as without averaging.

A round also settles how many samples the epoch counted: each worker's DHT view of the others' counts
is a refresh late, and with epochs shorter than that the workers' own estimates of the epoch's
overshoot lost a twentieth of the stage's steps. The group exchanges the exact counts behind the
gradients it averages, so every member carries its share of the true overshoot into the next epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from hivemind import DHT

from agora_server.access import PeerAccess
from agora_server.optim.averaging import AveragingConfig, _StageStateAverager, group_settings
from agora_server.optim.sparta import to_host


@dataclasses.dataclass(frozen=True)
class GradientRound:
    epoch: int
    ok: bool
    group_size: int
    reason: str = ""
    samples: int | None = None
    """The samples the group's gradients came from (each member's count towards the epoch, carry included)."""


class GradientAverager:
    def __init__(
        self,
        dht: DHT,
        prefix: str,
        shapes: Sequence[torch.Size],
        config: AveragingConfig,
        has_partners: Callable[[], bool] = lambda: True,
        access: PeerAccess | None = None,
        stage: str = "",
    ):
        """``prefix``: the stage's key; ``shapes``: of the gradients to average (the stage's masters).
        ``access`` and ``stage``: in a run with a coordinator, average only with workers admitted to ``stage``."""
        self.config, self.has_partners, self.access = config, has_partners, access
        self.averager = _StageStateAverager(
            [torch.zeros(shape, dtype=torch.float32) for shape in shapes],
            dht,
            prefix=f"{prefix}_gradients".replace(".", "_"),
            **group_settings(config),
            allow_state_sharing=False,
        )
        self.averager.guard, self.averager.stage = (access.guard if access else None), stage
        self.averager.run_in_background(await_ready=True)

    def averages(self, epoch: int) -> bool:
        """Whether the step that ends ``epoch`` averages gradients."""
        return epoch < self.config.gradient_epochs

    def average(self, epoch: int, gradients: Sequence[torch.Tensor], batches: int, samples: int) -> GradientRound | None:
        """Replace ``gradients`` (this worker's mean gradient of ``epoch``, float32, any device) in place
        by the mean over the stage's workers; None when this worker has nobody to average with.
        ``samples``: what this worker counts towards the epoch (its progress record's count)."""
        if not self.has_partners():
            return None
        with self.averager.get_tensors() as buffers:
            for buffer, gradient in zip(buffers, gradients):
                buffer.copy_(to_host(gradient))
        gather = {"epoch": epoch, "samples": samples, "access": self.access.token if self.access else ""}
        try:
            # a worker that served no micro-batch this epoch still takes the stage's step, contributing nothing
            group = self.averager.round_with_group(self.config, max(float(batches), 1e-6), gather)
        except Exception as e:  # a failed round leaves the worker its own gradient
            return GradientRound(epoch, False, 0, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        if not group:
            return GradientRound(epoch, False, 0, "no group formed or all-reduce failed")
        if any(gathered.get("epoch") != epoch for gathered in group.values()):
            return GradientRound(epoch, False, len(group), "a peer averaged another epoch's gradients")
        with self.averager.get_tensors() as buffers:
            if not all(bool(torch.isfinite(buffer).all()) for buffer in buffers):
                return GradientRound(epoch, False, len(group), "the average is not finite: a peer sent NaN or Inf")
            for buffer, gradient in zip(buffers, gradients):
                gradient.copy_(buffer)
        return GradientRound(epoch, True, len(group), samples=sum(map(_sample_count, group.values())))

    def shutdown(self) -> None:
        self.averager.cancel_round_and_shutdown()


def _sample_count(gathered: dict) -> int:
    """A peer's claimed count; what is not a count adds nothing (a carry never exceeds this worker's own
    count, whatever the others claim)."""
    samples = gathered.get("samples")
    return samples if isinstance(samples, int) and not isinstance(samples, bool) and samples > 0 else 0
