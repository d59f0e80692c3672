"""A deterministic single-process emulation of the swarm's training dynamics (the convergence benchmark's arm d).

The real swarm's loss depends on three things the synchronous run does not have: gradients that
cross stages computed on weights a few micro-batches old (the pipeline keeps ``in_flight``
micro-batches going), each worker of a stage stepping on its own share of the stage's batch, and the
replicas kept together by SPARTA. This module reproduces exactly those, with the project's own stages,
optimizers and SPARTA partition, and nothing else (no processes, no network), so that many seeds and
settings cost minutes instead of hours.

Time is simulated, not measured. Every worker is a server with one compute thread; a call costs
``forward_cost`` or ``backward_cost`` units of its stage; the trainer keeps ``in_flight`` micro-batches
going and sends each call to the worker of the stage that would finish it first (as the trainer's
balancer does). Calls are computed in the order they finish, on the weights the worker holds then.
A micro-batch runs head forward → … → tail forward+backward → … → head backward, and a backward
re-runs its stage's forward with the current weights, as ``StageBackend`` does. A stage steps when its
workers have processed ``target_batch_size`` samples between them: every worker steps on the
gradients it accumulated (in the first ``gradient_averaging_epochs``: on the mean of all of them, as one optimizer would),
and every ``average_every`` epochs SPARTA averages a fraction of every tensor across the replicas.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math

FORWARD, BACKWARD = "forward", "backward"


@dataclasses.dataclass(frozen=True)
class EmulatedSwarm:
    workers_per_stage: int = 2
    in_flight: int = 6
    forward_cost: tuple[float, ...] = (1.0, 1.2)
    """Simulated seconds of one forward per stage; a backward (forward again + backward) costs 3×."""
    gradient_averaging_epochs: int = 0
    """Epochs (from the first) in which a stage's workers average their gradients before stepping, as
    one optimizer would; SPARTA keeps them together afterwards."""
    sparta_fraction: float = 0.25
    average_every: int = 4


@dataclasses.dataclass
class _Replica:
    stage: object
    optimizer: object
    busy_until: float = 0.0
    batches: int = 0
    samples_since_round: int = 0


def emulate(config, swarm: EmulatedSwarm, batches: list, val_batches: list, evaluate, eval_every: int = 0) -> dict:
    """Train ``config``'s stages on ``batches`` as ``swarm`` would; returns the final validation loss
    (mean over head × … × tail pairings of replicas), the optimizer steps per stage and a curve."""
    import torch

    from agora_server.optim import clip_gradients, learning_rate, make_optimizer
    from agora_server.optim.sparta import SpartaPartition
    from benchlib import build_stages

    torch.manual_seed(config.seed)
    initial = build_stages(config)
    opt_config = config.server.optimizer
    replicas: list[list[_Replica]] = []
    for stage in initial:
        row = []
        for _ in range(swarm.workers_per_stage):
            copy = build_stages(config)[len(replicas)]
            copy.load_state_dict(stage.state_dict())
            row.append(_Replica(copy, make_optimizer(copy, opt_config)))
        replicas.append(row)
    partitions = [SpartaPartition([p.numel() for p in row[0].stage.parameters()], swarm.sparta_fraction, config.seed) for row in replicas]
    n_stages = len(replicas)
    target = config.server.target_batch_size
    epochs = [0] * n_stages
    stage_samples = [0] * n_stages
    steps_taken = [0] * n_stages
    curve: list[dict] = []

    def end_epoch(s: int) -> None:
        row = replicas[s]
        lr = learning_rate(epochs[s], opt_config)
        averaging_gradients = epochs[s] < swarm.gradient_averaging_epochs
        if averaging_gradients:
            total = sum(r.batches for r in row)
            for params in zip(*(r.stage.parameters() for r in row)):
                grads = [p.grad for p in params if p.grad is not None]
                mean = torch.stack(grads).sum(0) / total if grads else None
                for p in params:
                    p.grad = None if mean is None else mean.clone()
            for r in row:
                r.batches = total
        stepped = False
        for r in row:
            if r.batches:
                grads = [p.grad for p in r.stage.parameters() if p.grad is not None]
                if not averaging_gradients:
                    for g in grads:
                        g.div_(r.batches)
                if math.isfinite(clip_gradients(grads, opt_config.clip_grad_norm)):
                    for group in r.optimizer.param_groups:
                        group["lr"] = lr
                    r.optimizer.step()
                    stepped = True
                r.optimizer.zero_grad(set_to_none=True)
                r.batches = 0
        steps_taken[s] += stepped
        epochs[s] += 1
        stage_samples[s] = 0
        if swarm.workers_per_stage > 1 and not averaging_gradients and epochs[s] % swarm.average_every == 0:
            sparta_round(s, epochs[s] // swarm.average_every)

    def sparta_round(s: int, round_index: int) -> None:
        row, partition = replicas[s], partitions[s]
        weights = [max(r.samples_since_round, 0) for r in row]
        if sum(weights) == 0:
            weights = [1] * len(row)
        gathered = [partition.gather(list(r.stage.parameters()), round_index) for r in row]
        averaged = [sum(w * g[i] for w, g in zip(weights, gathered)) / sum(weights) for i in range(len(gathered[0]))]
        for r, own in zip(row, gathered):
            partition.apply_delta(list(r.stage.parameters()), round_index, own, averaged)
            r.samples_since_round = 0

    def choose(s: int, now: float, cost: float) -> _Replica:
        return min(replicas[s], key=lambda r: max(r.busy_until, now) + cost)

    # a micro-batch's calls: (stage, kind) forward through the front stages, the tail's backward, backwards back
    calls = [(s, FORWARD) for s in range(n_stages - 1)] + [(s, BACKWARD) for s in reversed(range(n_stages))]
    events: list = []  # (finish time, order, micro-batch index, call index, replica)
    order = itertools.count()
    state: dict[int, dict] = {}
    source = iter(enumerate(batches))
    completed = 0
    losses = []

    def start_call(mb: int, call_index: int, now: float) -> None:
        s, kind = calls[call_index]
        cost = swarm.forward_cost[s] * (1 if kind == FORWARD else 3)
        replica = choose(s, now, cost)
        replica.busy_until = max(replica.busy_until, now) + cost
        heapq.heappush(events, (replica.busy_until, next(order), mb, call_index, replica))

    def launch(now: float) -> bool:
        item = next(source, None)
        if item is None:
            return False
        index, (tokens, labels) = item
        state[index] = {"tokens": tokens, "labels": labels, "inputs": [None] * n_stages, "grad": None}
        start_call(index, 0, now)
        return True

    for _ in range(swarm.in_flight):
        launch(0.0)
    while events:
        now, _, mb, call_index, replica = heapq.heappop(events)
        s, kind = calls[call_index]
        st = state[mb]
        tokens, labels = st["tokens"], st["labels"]
        if kind == FORWARD:
            with torch.no_grad():
                st["inputs"][s + 1] = replica.stage(tokens, st["inputs"][s], None)
        else:
            boundary = st["inputs"][s]
            if boundary is not None:
                boundary = boundary.detach().requires_grad_(True)
            out = replica.stage(tokens, boundary, labels if s == n_stages - 1 else None)
            if s == n_stages - 1:
                valid = (labels != -100).float()
                weights = valid / valid.sum().clamp(min=1.0)
                out.backward(weights)
                losses.append(float((out.detach() * weights).sum()))
            else:
                out.backward(st["grad"])
            st["grad"] = None if boundary is None else boundary.grad
            replica.batches += 1
            replica.samples_since_round += tokens.shape[0]
            stage_samples[s] += tokens.shape[0]
            if stage_samples[s] >= target:
                end_epoch(s)
        if call_index + 1 < len(calls):
            start_call(mb, call_index + 1, now)
            continue
        del state[mb]
        completed += 1
        if eval_every and completed % eval_every == 0:
            curve.append({"micro_batches": completed, "val_loss": round(mean_pairing_loss(replicas, val_batches, evaluate), 4)})
        launch(now)
    return {
        "final_val_loss": round(mean_pairing_loss(replicas, val_batches, evaluate), 4),
        "optimizer_steps": steps_taken,
        "epochs": epochs,
        "train_loss_last_10pct": round(sum(losses[-len(losses) // 10 :]) / max(1, len(losses) // 10), 4),
        "curve": curve,
    }


def mean_pairing_loss(replicas, val_batches, evaluate) -> float:
    """Validation loss averaged over every head × … × tail choice of replicas (the model a participant holds)."""
    losses = [evaluate([r.stage for r in choice], val_batches) for choice in itertools.product(*replicas)]
    return sum(losses) / len(losses)
