"""The coordinator's settings: one YAML file → a validated CoordinatorConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class CoordinatorConfigError(ValueError):
    """A coordinator config that cannot be used; the message names the file and the field."""


class StageNeed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    need: int = Field(default=1, ge=1)
    """Workers this stage should have; assignment fills the stage furthest below its need first."""


class QueueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity: int = Field(default=64, ge=1)
    """Active nodes the whole run admits; later joins wait in the queue."""
    max_active_per_user: int = Field(default=8, ge=1)
    """Nodes one account may have active or waiting at once; raise it for operators with many GPUs."""
    poll_interval_s: float = Field(default=10.0, gt=0)
    """What a queued worker is told to wait before its next status poll."""
    joins_paused: bool = False
    """Queue new joins but admit nobody, e.g. while the operators repair the run."""
    wait_estimate_window: int = Field(default=20, ge=2)
    """How many recent departures (nodes whose access ended) the wait estimate averages the interval
    over; no estimate is given before two departures have been seen."""
    abandon_after_s: float = Field(default=300.0, gt=0)
    """A waiting request not polled for this long is dropped so it stops holding a place."""
    download_deadline_s: float = Field(default=3600.0, gt=0)
    """A queued node must have downloaded its stage's weights this long after joining, or it is dropped."""


class PortTestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    deadline_s: float = Field(default=5.0, gt=0)
    """How long the connect-back may take, connect plus answer."""
    only_source_address: bool = True
    """Test only the address the join came from, so the coordinator cannot be used to probe other
    hosts; turn off when it sits behind a reverse proxy that hides the workers' addresses."""


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: Path | None = None
    """Where the coordinator keeps each stage's latest uploaded checkpoint (and the one before it), served
    at ``/api/checkpoints/{stage}``. Unset: the coordinator accepts and serves no checkpoints."""
    max_upload_bytes: int = Field(default=64 * 2**30, ge=1)
    """Largest checkpoint upload accepted; larger ones get 413. Size it to one stage's state, with room to grow."""
    partial_upload_expiry_s: float = Field(default=3600.0, gt=0)
    """A resumable upload that received nothing for this long is dropped (its part on disk deleted); the node
    then uploads that checkpoint from the start. Each node has at most one partial upload (its newest)."""
    public_url: str | None = Field(default=None, pattern=r"^https?://")
    """Base URL nodes reach the coordinator at (e.g. behind a reverse proxy), for the checkpoint URL in
    answers. Unset: the URL the node's own request came to."""


class ContributionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_samples_per_second: float = Field(default=1000.0, gt=0)
    """Most samples one node is credited per second since its last heartbeat. A stage of llama-8b at
    4096 tokens does a few samples a second on the fastest GPU and the tiny CPU model a few hundred:
    1000 is far above any honest node and still makes a forged report worthless."""
    max_tokens_per_second: float = Field(default=1_000_000.0, gt=0)
    """Most tokens one node is credited per second; the same margin as the samples."""
    slack_s: float = Field(default=60.0, ge=0)
    """Seconds added to the time since the last heartbeat: work finished just before access was recorded,
    and clocks that differ by a little, are credited too."""


class DashboardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_interval_s: float = Field(default=30.0, gt=0)
    """Seconds between samples of the workers per stage (the dashboard's chart); also how often a
    silent node is checked for having lapsed."""
    lapse_after_s: float = Field(default=120.0, gt=0)
    """A node holding access but silent (no heartbeat) this long shows as lapsed and no longer counts
    as serving its stage. Keep it above the workers' heartbeat interval (30 s) with room for a slow one."""
    history_points: int = Field(default=400, ge=10)
    """Most points per series the history API returns (older samples are thinned evenly)."""
    timeline_changes: int = Field(default=50, ge=1)
    """State changes shown per node."""


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: str = Field(default="agora", pattern=r"^[A-Za-z0-9_-]+$")
    database_url: str = "sqlite:///coordinator.db"
    """Any SQLAlchemy URL; a PostgreSQL URL for a big run."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    run_config: str
    """The run config (a path, or the name of a shipped one) whose stages this coordinator admits to: the
    stages and their pipeline order come from it, and every checkpoint upload must hold exactly the weights
    (names, shapes, dtypes) of its stage's model."""
    stages: list[StageNeed] | None = None
    """Unset: the run config's stages, one worker needed each. Set it only to give stages other needs: it must
    then list every stage of the run config, in pipeline order (the coordinator refuses to start otherwise)."""
    token_source: Literal["hf"] | Path = "hf"
    """``hf``: check participants' tokens with Hugging Face ``whoami``; a path: an offline token file
    (lines ``<sha256 of token> <username>``)."""
    token_cache_s: float = Field(default=300.0, ge=0)
    """How long a successful token check is reused; Hugging Face rate-limits ``whoami`` hard."""
    token_failure_cache_s: float = Field(default=60.0, ge=0)
    """How long a refused token is refused again without asking Hugging Face, so that a stranger repeating
    it cannot spend the ``whoami`` rate limit; short, so a token fixed on the Hugging Face side works soon."""
    new_tokens_per_minute: int = Field(default=20, ge=1)
    """How many tokens it does not remember one address may have checked in a minute (each may cost a
    ``whoami`` call): a stranger making up a token per request is refused (429) beyond it."""
    key_path: Path = Path("coordinator.key")
    """Ed25519 key that signs access tokens; created with mode 0600 if missing. Keep it across
    restarts, or every access token issued before becomes worthless."""
    access_token_lifetime_s: float = Field(default=1800.0, gt=0)
    """Workers refresh before this runs out; a node that does not is dropped from the run."""
    stage_hysteresis: float = Field(default=0.25, ge=0)
    """A returning node keeps its previous stage unless another stage's capacity/need is lower by more than this."""
    operators: list[str] = Field(default_factory=list)
    """Usernames (as the token check names them) allowed to stop nodes through ``/api/admin/stop_node``."""
    accepted_code_versions: list[str] = Field(default_factory=list)
    """Code version hashes allowed to join; empty accepts any (local runs only)."""
    checkpoint_url_template: str | None = None
    """Where a node downloads its stage's weights when they are hosted elsewhere, ``{stage}`` replaced.
    Unset and ``checkpoints.directory`` unset: nothing to download, so a node may be admitted at once."""
    max_request_bytes: int = Field(default=64 * 2**10, ge=1024)
    """Largest request body (checkpoint uploads aside, see ``checkpoints.max_upload_bytes``). Enforced while
    the body streams in, before any token is checked, so a stranger cannot make the coordinator buffer more.
    The JSON bodies of the API are a few KiB; raise it only if a newer worker sends more."""
    max_heartbeat_skew_s: float = Field(default=300.0, gt=0)
    """Heartbeats whose timestamp is further than this from the coordinator's clock are refused (replays)."""
    queue: QueueConfig = QueueConfig()
    port_test: PortTestConfig = PortTestConfig()
    checkpoints: CheckpointConfig = CheckpointConfig()
    dashboard: DashboardConfig = DashboardConfig()
    contributions: ContributionConfig = ContributionConfig()

    @model_validator(mode="after")
    def _checkpoint_source(self) -> "CoordinatorConfig":
        if self.checkpoint_url_template is not None and "{stage}" not in self.checkpoint_url_template:
            raise ValueError("checkpoint_url_template must contain {stage}")
        if self.checkpoint_url_template is not None and self.checkpoints.directory is not None:
            raise ValueError("set checkpoint_url_template (weights hosted elsewhere) or checkpoints.directory "
                             "(the coordinator serves them), not both")
        return self

    @property
    def serves_checkpoints(self) -> bool:
        return self.checkpoints.directory is not None

    def public_base(self, base_url: str | None = None) -> str:
        """The URL nodes reach this coordinator at: ``checkpoints.public_url``, else the URL of the asking request."""
        return (self.checkpoints.public_url or base_url or f"http://{self.host}:{self.port}").rstrip("/")

    def dashboard_url(self, peer_id: str | None = None, base_url: str | None = None) -> str:
        return f"{self.public_base(base_url)}/" + (f"?node={peer_id}" if peer_id else "")

    def checkpoint_url(self, stage: str, base_url: str | None = None) -> str | None:
        """Where a node of ``stage`` downloads weights; ``base_url``: the URL the asking request came to."""
        if self.checkpoint_url_template is not None:
            return self.checkpoint_url_template.replace("{stage}", stage)
        if not self.serves_checkpoints:
            return None
        return f"{self.public_base(base_url)}/api/checkpoints/{stage}"


def load_coordinator_config(path: str | Path | None, overrides: dict | None = None) -> CoordinatorConfig:
    """Read the YAML file (none: all defaults), apply top-level overrides, validate."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CoordinatorConfigError(f"cannot read coordinator config {path}: {e}") from e
        if not isinstance(data, dict):
            raise CoordinatorConfigError(f"coordinator config {path} must be a mapping at the top level")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return CoordinatorConfig.model_validate(data)
    except ValidationError as e:
        raise CoordinatorConfigError(f"invalid coordinator config {path or '(defaults)'}:\n{e}") from e
