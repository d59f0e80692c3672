"""The run's stages as this coordinator serves them: names and pipeline order from the run config, the
workers each needs from the coordinator config. Worked out once at start; a coordinator config whose
stage list disagrees with the run config is refused then, not discovered when a stage stays empty."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping

from agora.coordinator.config import CoordinatorConfig, CoordinatorConfigError

if TYPE_CHECKING:
    from agora.config import RunConfig


@dataclasses.dataclass(frozen=True)
class StagePlan:
    needs: Mapping[str, int]
    """Workers each stage should have, in pipeline order."""

    @property
    def names(self) -> list[str]:
        return list(self.needs)

    def __contains__(self, stage: object) -> bool:
        return stage in self.needs


def load_run(config: CoordinatorConfig) -> RunConfig:
    from agora.config import ConfigError, load_run_config  # torch: only once a coordinator starts

    try:
        return load_run_config(config.run_config)
    except ConfigError as e:
        raise CoordinatorConfigError(f"run_config: {e}") from None


def plan_stages(config: CoordinatorConfig, run: RunConfig) -> StagePlan:
    run_stages = [spec.name for spec in run.stages]
    if config.stages is None:
        return StagePlan({name: 1 for name in run_stages})
    listed = [stage.name for stage in config.stages]
    if listed != run_stages:
        raise CoordinatorConfigError(
            f"coordinator config lists stages {', '.join(listed)} but run config {config.run_config} has stages "
            f"{', '.join(run_stages)}: list exactly those, in that order, or remove `stages` to need one worker each")
    return StagePlan({stage.name: stage.need for stage in config.stages})
