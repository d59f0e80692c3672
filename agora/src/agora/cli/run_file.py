"""run.json: which run to join (its config, coordinator, Pushgateway and seed peers)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
DEFAULT_RUN_FILE = REPO / "run.json"


class RunFileError(RuntimeError):
    """run.json is missing or malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class RunFile:
    run_config: str
    """Run config path (relative to the repository) or shipped name; run_server.py --config."""
    auth_server: str | None
    prom_gateway: str | None
    seeds: tuple[str, ...]
    path: Path

    @property
    def config_ref(self) -> str:
        candidate = REPO / self.run_config
        return str(candidate) if candidate.is_file() else self.run_config


def load_run_file(path: str | Path = DEFAULT_RUN_FILE) -> RunFile:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror}; run from a complete clone of the repository") from None
    except ValueError as e:
        raise RunFileError(f"{path} is not valid JSON ({e}); restore it with `git checkout run.json`") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("run_config"), str):
        raise RunFileError(f"{path} needs a \"run_config\" string; restore it with `git checkout run.json`")
    seeds = raw.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, str) for s in seeds):
        raise RunFileError(f"{path}: \"seeds\" must be a list of multiaddr strings")
    return RunFile(raw["run_config"], raw.get("auth_server") or None, raw.get("prom_gateway") or None, tuple(seeds), path)
