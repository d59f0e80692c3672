"""Which stage a node serves, and which node to move when a stage runs dry.

Load is counted in workers; a stage's *fill* is workers / need. Newcomers go where the fill is
lowest; a returning node keeps its previous stage (its local checkpoint is for that stage) unless
another stage's fill is lower by more than the hysteresis margin.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class NodeOnStage:
    uid: str
    stage: str
    granted_at: float


@dataclasses.dataclass(frozen=True)
class Move:
    uid: str
    from_stage: str
    to_stage: str


def fill(workers: int, need: int) -> float:
    return workers / need


def choose_stage(needs: Mapping[str, int], workers: Mapping[str, int], previous: str | None, hysteresis: float) -> str:
    """``needs`` in pipeline order; ties go to the earlier stage."""
    fills = {stage: fill(workers.get(stage, 0), need) for stage, need in needs.items()}
    lowest = min(fills, key=lambda s: fills[s])  # min keeps the first of equals: pipeline order
    if previous in fills and fills[previous] - fills[lowest] <= hysteresis:
        return previous
    return lowest


def choose_move(needs: Mapping[str, int], nodes: Sequence[NodeOnStage]) -> Move | None:
    """When a stage has no worker the pipeline is broken: take the newest worker of the fullest
    stage that can spare one (two or more workers). None if no stage is empty or none can spare."""
    by_stage: dict[str, list[NodeOnStage]] = {stage: [] for stage in needs}
    for node in nodes:
        if node.stage in by_stage:
            by_stage[node.stage].append(node)
    empty = [stage for stage, members in by_stage.items() if not members]
    donors = [stage for stage, members in by_stage.items() if len(members) >= 2]
    if not empty or not donors:
        return None
    donor = max(donors, key=lambda s: (fill(len(by_stage[s]), needs[s]), -list(needs).index(s)))
    # the newest has the least progress on its stage to lose by switching
    newest = max(by_stage[donor], key=lambda n: (n.granted_at, n.uid))
    return Move(uid=newest.uid, from_stage=donor, to_stage=empty[0])
