"""A run's configuration: one YAML file → typed, validated objects handed to the components."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agora_server.data import DataConfig
from agora_server.models import BoundaryConfig, ModelConfig, StageSpec, split_into_stages
from agora_server.pipeline import TrainerConfig
from agora_server.server import ServerConfig

SHIPPED_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A run config that cannot be used; the message says which file and field, and why."""


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    """Names the run in DHT keys and RPC handlers; peers of different runs never mix."""
    seed: int = 0
    """Seeds the model's initialisation (and later the shared compression constants)."""
    model: ModelConfig
    stage_layers: list[int]
    """Decoder layers per stage, head first, tail last; they must add up to model.num_layers."""
    boundary: BoundaryConfig = BoundaryConfig()
    server: ServerConfig = ServerConfig()
    trainer: TrainerConfig = TrainerConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> "RunConfig":
        split_into_stages(self.model.num_layers, self.stage_layers)
        if self.trainer.micro_batch_size > self.server.max_batch_size:
            raise ValueError(
                f"trainer.micro_batch_size {self.trainer.micro_batch_size} exceeds server.max_batch_size {self.server.max_batch_size}"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len {self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        return self

    @property
    def boundary_width(self) -> int:
        return self.boundary.width(self.model.hidden_size)

    @property
    def stages(self) -> list[StageSpec]:
        return split_into_stages(self.model.num_layers, self.stage_layers)

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ConfigError(f"run {self.run_name} has no stage {name!r}; its stages are {', '.join(s.name for s in self.stages)}")


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config_path(ref: str | Path) -> Path:
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / f"{ref}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"run config {str(ref)!r} is neither a file nor a shipped config ({', '.join(shipped_config_names())})")


def load_run_config(ref: str | Path, overrides: dict | None = None) -> RunConfig:
    """Load a YAML run config by path or shipped name; ``overrides`` are merged on top (nested dicts)."""
    path = resolve_config_path(ref)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read run config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"run config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {path} must be a YAML mapping, found {type(raw).__name__}")
    try:
        return RunConfig.model_validate(deep_merge(raw, overrides or {}))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"run config {path} is invalid: {problems}") from None


def deep_merge(base: dict, top: dict) -> dict:
    """``base`` with ``top`` laid over it; nested dicts are merged, not replaced."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged
