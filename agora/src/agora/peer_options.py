"""Every peer flag defined once, and the typed options each peer role parses its command line into.

- ``Flag``            one flag: its name (also the options attribute), how its text is read, its default, its help
- ``CONFIG`` … ``LOG_FILE``  the flags several roles take; a role-only flag is defined where its role lists it
- ``PeerOptions``     what every role's options can do: ``parse`` a command line, ``to_argv``/``to_env`` to build one
- ``WorkerOptions``   run_server.py      ``SeedOptions``  run_seed.py      ``TrainerOptions``  python -m agora.trainer
- ``DEFAULT_PORT``, ``TOKEN_ENV``, ``WorkerFiles`` (log and key named after the GPU): the defaults launchers share

Launchers (the CLI, the local swarm) build a peer's command line from these options, so no flag name is
spelled twice. A flag read from an environment variable (the token) is a secret: it travels to the child in
its environment and never in argv, where any user of the machine could read it.

Only the standard library here: the entry points parse before torch loads, so --help is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Self

DEFAULT_PORT = 49200
"""A worker listens on DEFAULT_PORT + its GPU id unless told otherwise."""
TOKEN_ENV = "AGORA_TOKEN"
"""The environment variable that carries the HuggingFace token to a peer (and to the CLI) instead of --token."""
LOOPBACK_MADDRS = ("/ip4/127.0.0.1/tcp/0",)
"""Where a seed or trainer listens by default: this machine only, any free port."""
TRAINER_IDENTITY = "private_trainer.key"


def default_port(gpu_id: int) -> int:
    return DEFAULT_PORT + gpu_id


def default_log_file(gpu_id: int | str) -> str:
    """A worker's verbose log; ``gpu_id`` may be a placeholder such as ``<ID>`` in help texts."""
    return f"logs/server_gpu{gpu_id}.log"


def default_identity_path(gpu_id: int | str) -> str:
    """A worker's private key file; ``gpu_id`` may be a placeholder such as ``<ID>`` in help texts."""
    return f"private_gpu{gpu_id}.key"


class WorkerFiles:
    """A worker's log and key files: the ones given, or those named after its GPU. For the worker's options
    and the CLI's saved settings, which both have ``gpu_id``, ``log_file`` and ``identity_path``."""

    gpu_id: int
    log_file: str | None
    identity_path: str | None

    @property
    def log_path(self) -> str:
        return self.log_file or default_log_file(self.gpu_id)

    @property
    def key_path(self) -> str:
        return self.identity_path or default_identity_path(self.gpu_id)


class OptionsError(ValueError):
    """Options that contradict each other; the message names the flags."""


_FLAG, _SHOWN_DEFAULT = "agora.flag", "agora.shown_default"


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    """``--name`` on the command line, and the attribute of the options object."""
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    nargs: str | None = None
    """``"+"`` or ``"*"`` for a flag that takes several values (kept as a tuple); a required one needs at least one."""
    env: str | None = None
    """Read from this environment variable when the flag is not given; never written into a command line."""
    explicit: bool = False
    """Written into a command line even at its default, so that the command names it (the GPU a worker uses)."""

    def option(self, *, default: Any = dataclasses.MISSING, required: bool = False, shown_default: str | None = None) -> Any:
        """This flag as a field of an options class. ``default``: the role's own, where it differs from the
        flag's; ``shown_default``: what --help names as the default when the role works it out at run time."""
        if required:
            return dataclasses.field(metadata={_FLAG: self})
        value = self.default if default is dataclasses.MISSING else default
        # a secret must not show up where options are printed (a traceback, a log line)
        return dataclasses.field(default=value, repr=self.env is None, metadata={_FLAG: self, _SHOWN_DEFAULT: shown_default})


class PeerOptions:
    """What every role's options class (a frozen dataclass of ``Flag.option`` fields) can do."""

    @classmethod
    def _flags(cls) -> list[tuple[Flag, dataclasses.Field]]:
        fields = [(f.metadata[_FLAG], f) for f in dataclasses.fields(cls)]
        misnamed = [f.name for flag, f in fields if flag.name != f.name]
        if misnamed:  # the attribute must be the flag's name: parse fills it by that name
            raise TypeError(f"{cls.__name__} fields named unlike their flags: {misnamed}")
        return fields

    @classmethod
    def parser(cls, description: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for flag, field in cls._flags():
            required = field.default is dataclasses.MISSING
            extra: dict[str, Any] = {"required": True} if required else {"default": field.default}
            if flag.nargs:
                extra["nargs"] = "+" if required else flag.nargs
            parser.add_argument(f"--{flag.name}", type=flag.type, help=_help(flag, field), **extra)
        return parser

    @classmethod
    def parse(cls, argv: list[str] | None = None, *, description: str | None = None, env: Mapping[str, str] = os.environ) -> Self:
        """Options from a command line (``sys.argv`` when None); exits with a usage message when they are wrong."""
        parser = cls.parser(description)
        values = vars(parser.parse_args(argv))
        for flag, _ in cls._flags():
            if flag.nargs and values[flag.name] is not None:
                values[flag.name] = tuple(values[flag.name])
            if flag.env and values[flag.name] is None:
                values[flag.name] = env.get(flag.env) or None
        try:
            return cls(**values)
        except OptionsError as e:
            parser.error(str(e))

    def to_argv(self) -> list[str]:
        """The command line that parses back to these options, less the secrets (``to_env`` carries them);
        flags at their default are left out."""
        argv: list[str] = []
        for flag, field in self._flags():
            value = getattr(self, flag.name)
            if flag.env or (not flag.explicit and field.default is not dataclasses.MISSING and value == field.default):
                continue
            if flag.nargs:
                argv += [f"--{flag.name}", *map(str, value)]
            elif str(value).startswith("-"):  # e.g. a base64url key: "--flag -x…" would read as another flag
                argv.append(f"--{flag.name}={value}")
            else:
                argv += [f"--{flag.name}", str(value)]
        return argv

    def to_env(self) -> dict[str, str]:
        """The environment variables that carry the secrets; one not set is "", so a child never inherits a stale one."""
        return {flag.env: getattr(self, flag.name) or "" for flag, _ in self._flags() if flag.env}


def _help(flag: Flag, field: dataclasses.Field) -> str:
    shown = field.metadata.get(_SHOWN_DEFAULT)
    if shown is None and field.default not in (None, (), dataclasses.MISSING):
        shown = " ".join(map(str, field.default)) if flag.nargs else str(field.default)
    notes = [f"default {shown}"] if shown else []
    if flag.env:
        notes.append(f"or set {flag.env}")
    return f"{flag.help} ({'; '.join(notes)})" if notes else flag.help


# --- the flags several roles take ------------------------------------------------------------

CONFIG = Flag("config", "run config: a YAML path or a shipped name (local-tiny, llama-8b)")
INITIAL_PEERS = Flag("initial_peers", "multiaddrs of the run's seeds", nargs="*", default=())
HOST_MADDRS = Flag("host_maddrs", "multiaddrs to listen on", nargs="+")
ANNOUNCE_MADDRS = Flag("announce_maddrs", "multiaddrs other peers should dial", nargs="+")
IDENTITY_PATH = Flag("identity_path", "private key file, created if missing: a fixed key gives a fixed peer id, which is what the coordinator admits")
LOG_FILE = Flag("log_file", "verbose log file")
AUTH_SERVER = Flag("auth_server", "the run's coordinator URL: it admits this peer (and gives a worker its stage)")
TOKEN = Flag("token", "HuggingFace token for --auth_server; a trainer needs an operator's", env=TOKEN_ENV)
PROM_GATEWAY = Flag("prom_gateway", "Prometheus Pushgateway address (host:port) for this peer's metrics")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerOptions(PeerOptions, WorkerFiles):
    """run_server.py: a worker hosting one pipeline stage."""

    gpu_id: int = Flag(
        "gpu_id", "GPU index; also names the default key and log files", type=int, default=0, explicit=True).option()
    config: str = CONFIG.option(required=True)
    token: str | None = TOKEN.option()
    auth_server: str | None = AUTH_SERVER.option()
    prom_gateway: str | None = PROM_GATEWAY.option()
    host_maddrs: tuple[str, ...] | None = HOST_MADDRS.option(shown_default=f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}+gpu_id")
    announce_maddrs: tuple[str, ...] | None = ANNOUNCE_MADDRS.option()
    initial_peers: tuple[str, ...] = INITIAL_PEERS.option()
    email: str | None = Flag("email", "optional contact email").option()
    log_file: str | None = LOG_FILE.option(shown_default=default_log_file("<ID>"))
    identity_path: str | None = IDENTITY_PATH.option(shown_default=default_identity_path("<ID>"))
    batch_size_override: int | None = Flag(
        "batch_size_override", "lower the micro-batch limit (e.g. after CUDA out of memory)", type=int).option()
    stage: str | None = Flag(
        "stage", "stage to host in a run without a coordinator (with --auth_server the coordinator assigns it)").option()
    auth_timeout: float = Flag("auth_timeout", "seconds to wait in the authorization queue", type=float, default=4 * 3600.0).option()
    heartbeat_interval: float = Flag(
        "heartbeat_interval", "seconds between progress reports to the coordinator", type=float, default=30.0).option()

    def __post_init__(self) -> None:
        if self.auth_server and self.stage:
            raise OptionsError("--stage is for runs without a coordinator; with --auth_server the coordinator assigns the stage")
        if self.batch_size_override is not None and self.batch_size_override < 1:
            raise OptionsError("--batch_size_override must be at least 1")

    @property
    def listen_maddrs(self) -> list[str]:
        return list(self.host_maddrs or [f"/ip4/0.0.0.0/tcp/{default_port(self.gpu_id)}"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedOptions(PeerOptions):
    """run_seed.py: a long-lived DHT peer that others bootstrap from."""

    host_maddrs: tuple[str, ...] = HOST_MADDRS.option(default=LOOPBACK_MADDRS)
    announce_maddrs: tuple[str, ...] | None = ANNOUNCE_MADDRS.option()
    identity_path: str = IDENTITY_PATH.option(required=True)
    initial_peers: tuple[str, ...] = INITIAL_PEERS.option()
    log_file: str | None = LOG_FILE.option()
    coordinator_public_key: str | None = Flag(
        "coordinator_public_key",
        "the run coordinator's public key (it prints it at start; also in /api/run_info), given as "
        "--coordinator_public_key=KEY since a key may start with '-': the seed then refuses DHT "
        "records from peers the coordinator did not admit").option()
    config: str | None = CONFIG.option()

    def __post_init__(self) -> None:
        if self.coordinator_public_key and not self.config:
            raise OptionsError("--coordinator_public_key needs --config: the seed must know the run's stage keys")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerOptions(PeerOptions):
    """python -m agora.trainer: streams the run's data through the pipeline."""

    config: str = CONFIG.option(required=True)
    initial_peers: tuple[str, ...] = INITIAL_PEERS.option(required=True)
    steps: int = Flag("steps", "stop after this many completed micro-batches (0: until Ctrl+C)", type=int, default=0).option()
    rank: int | None = Flag(
        "rank", "this trainer's shard of the data, 0 to the run config's trainer.data_shards - 1, in a run without a "
        "coordinator (with --auth_server the coordinator assigns it)", type=int).option(shown_default="0")
    host_maddrs: tuple[str, ...] = HOST_MADDRS.option(default=LOOPBACK_MADDRS)
    summary_path: str | None = Flag("summary_path", "write the final ledger and loss curve here as JSON").option()
    log_file: str | None = LOG_FILE.option()
    prom_gateway: str | None = PROM_GATEWAY.option()
    auth_server: str | None = AUTH_SERVER.option()
    token: str | None = TOKEN.option()
    identity_path: str = IDENTITY_PATH.option(default=TRAINER_IDENTITY)
    data_position: str | None = Flag(
        "data_position", "file that keeps this trainer's place in its data stream, so a restart continues there",
    ).option(shown_default="beside the identity file, <identity name>.position.json")

    def __post_init__(self) -> None:
        if self.auth_server and self.rank is not None:
            raise OptionsError("--rank is for runs without a coordinator; with --auth_server the coordinator assigns the data shard")
        if self.rank is not None and self.rank < 0:
            raise OptionsError("--rank must be 0 or more")

    @property
    def data_position_path(self) -> Path:
        if self.data_position:
            return Path(self.data_position)
        identity = Path(self.identity_path)
        return identity.with_name(f"{identity.stem}.position.json")
