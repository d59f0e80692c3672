"""A participant's saved answers: one JSON file per GPU under ``~/.agora/``, readable only by its owner."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from agora.cli import troubleshooting as known
from agora.peer_options import WorkerFiles, default_port

DIR_MODE = 0o700
FILE_MODE = 0o600
SHARED_FIELDS = ("token", "email", "use_docker")
"""The participant's, not the GPU's: a new GPU id starts from another GPU's saved values for these."""
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{34}")


def looks_like_hf_token(token: str) -> bool:
    """The shape of a HuggingFace user access token: ``hf_`` and 34 letters and digits."""
    return _HF_TOKEN.fullmatch(token) is not None


class SettingsError(RuntimeError):
    """Saved settings that cannot be used; the message says which file and what to do."""


@dataclasses.dataclass
class Settings(WorkerFiles):
    gpu_id: int = 0
    token: str | None = None
    """HuggingFace token; only ever shown masked."""
    email: str | None = None
    use_docker: bool = False
    host_port: int | None = None
    """Listening port; None means the worker's default (``peer_options.default_port``)."""
    announce_port: int | None = None
    """Port other peers dial when it differs from host_port (port mapping, e.g. RunPod); None: host_port."""
    log_file: str | None = None
    identity_path: str | None = None
    batch_size_override: int | None = None

    @property
    def port(self) -> int:
        return self.host_port if self.host_port is not None else default_port(self.gpu_id)

    @property
    def public_port(self) -> int:
        return self.announce_port if self.announce_port is not None else self.port

    def summary(self) -> list[tuple[str, str]]:
        return [
            ("HuggingFace token", mask_token(self.token)),
            ("Email", self.email or "(none)"),
            ("Run with", "Docker" if self.use_docker else "native (this Python)"),
            ("GPU id", str(self.gpu_id)),
            ("Host port", str(self.port)),
            ("Announce port", str(self.public_port)),
            ("Log file", self.log_path),
            ("Identity key", self.key_path),
        ]


def mask_token(token: str | None) -> str:
    if not token:
        return "(not set)"
    # enough to tell two tokens apart, never enough to use one
    prefix = "hf_" if token.startswith("hf_") else ""
    return f"{prefix}…{token[-4:]}" if len(token) > 8 else "…"


def agora_home() -> Path:
    return Path(os.path.expanduser("~")) / ".agora"


def settings_path(gpu_id: int) -> Path:
    return agora_home() / f"settings_gpu{gpu_id}.json"


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def write_private_json(path: Path, data: dict) -> None:
    """Write atomically with mode 0600 from the first byte (the token must never be world-readable)."""
    ensure_private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def load(gpu_id: int) -> Settings | None:
    """Saved settings for this GPU, None if there are none; SettingsError if the file is unusable."""
    path = settings_path(gpu_id)
    if not path.exists():
        return None
    try:
        raw = _parse(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"it must hold a JSON object ({{...}}), not {_describe(raw)}")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(Settings)})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        settings = Settings(**raw)
        _check_types(settings)
    except OSError as e:
        raise SettingsError(known.SETTINGS_UNREADABLE.format(path=path, reason=e.strerror or e)) from None
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise SettingsError(known.SETTINGS_UNREADABLE.format(path=path, reason=e)) from None
    settings.gpu_id = gpu_id
    return settings


def _parse(text: str):
    if not text.strip():
        raise ValueError("the file is empty")  # e.g. a disk that filled up while it was written by hand
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"it is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _describe(value) -> str:
    # never the text itself: a token pasted into the wrong field must not end up on the screen
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _check_types(s: Settings) -> None:
    for name in ("host_port", "announce_port", "batch_size_override"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name} must be a whole number, found {_describe(value)}")
    for name in ("token", "email", "log_file", "identity_path"):
        value = getattr(s, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be text, found {_describe(value)}")
    if not isinstance(s.use_docker, bool):
        raise ValueError(f"use_docker must be true or false, found {_describe(s.use_docker)}")


def save(settings: Settings) -> Path:
    path = settings_path(settings.gpu_id)
    write_private_json(path, dataclasses.asdict(settings))
    return path


def set_aside_unreadable(gpu_id: int) -> Path | None:
    """Keep an unreadable settings file as ``.bad`` before --reconfigure writes a new one."""
    path = settings_path(gpu_id)
    if not path.exists():
        return None
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    os.chmod(bad, FILE_MODE)  # it may hold a token, and a hand-edited file may not have been private
    return bad


def shared_from_other_gpu(gpu_id: int) -> tuple[int, dict] | None:
    """(GPU id, its token, email and mode) from the first other GPU whose saved settings can be read."""
    for other in saved_gpu_ids():
        if other == gpu_id:
            continue
        try:
            saved = load(other)
        except SettingsError:
            continue
        if saved is not None and saved.token:
            return other, {name: getattr(saved, name) for name in SHARED_FIELDS}
    return None


def saved_gpu_ids() -> list[int]:
    ids = []
    for path in agora_home().glob("settings_gpu*.json"):
        suffix = path.stem.removeprefix("settings_gpu")
        if suffix.isdigit():
            ids.append(int(suffix))
    return sorted(ids)
