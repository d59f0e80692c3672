"""A whole swarm on this machine: seed DHT, one or more workers per stage, one trainer, on 127.0.0.1.

Every child runs in its own process group (its DHT process and p2pd daemons included), so
stopping a child stops all of it, and nothing is left bound to a port afterwards. Children send
their events as JSON lines (``agora_server.telemetry.eventstream``); the swarm keeps them per child
and is watched through them (``wait_for``, ``events_of``), never through console wording; it renders
their console lines only to show them through a ``SwarmConsole`` (everything, or the quiet view), and
keeps the lines that are no event (``texts_of``: a library's warning, a traceback) for error
reports. Each run owns its log directory's state (``agora.local_state``): the previous run's
coordinator database, checkpoints and logs are deleted at start, and processes a killed run left
behind are stopped first.

Two optional hooks, both keyed by the child's name ("seed", "head#0", "trainer"), let a caller
place children elsewhere (bench/compression.py runs each one in its own network namespace):
``wrap`` returns a command prefix for the child (e.g. ``["ip", "netns", "exec", "ns1"]``) and
``host`` the IPv4 address it listens on instead of 127.0.0.1. Without them nothing changes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TextIO, TypeVar

import psutil
import yaml

from agora.config import RunConfig, deep_merge
from agora.local_console import SwarmConsole
from agora.local_state import RunState, SwarmBusy, group_members, signal_group
from agora.peer_options import PeerOptions, SeedOptions, TrainerOptions, WorkerOptions
from agora.ports import free_port
from agora.processes import EVENT_STREAM_ENV
from agora_server.telemetry import events as ev
from agora_server.telemetry.console import console_lines
from agora_server.telemetry.eventstream import decode_event


DEFAULT_HOST = "127.0.0.1"

E = TypeVar("E", bound=ev.Event)


class SwarmError(RuntimeError):
    pass


@dataclasses.dataclass
class SwarmProcess:
    name: str
    popen: subprocess.Popen
    pump: threading.Thread
    first_event: int = 0
    """Index of this run's first event among the events sent under its name."""

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session makes the child its group's leader


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int, libc) -> Callable[[], None]:
    """A preexec_fn: the kernel sends the child SIGTERM when the launcher dies, even by SIGKILL."""

    def arrange() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


class LocalSwarm:
    def __init__(
        self,
        config_ref: str,
        config: RunConfig,
        *,
        workers_per_stage: int = 1,
        workers: dict[str, int] | None = None,
        steps: int = 0,
        log_dir: Path = Path("logs/local"),
        output: TextIO | None = None,
        grace_seconds: float = 15.0,
        wrap: Callable[[str], list[str]] | None = None,
        host: Callable[[str], str] | None = None,
        prom_gateway: str | None = None,
        coordinator: bool = False,
        coordinator_settings: dict | None = None,
        console: SwarmConsole | None = None,
        die_with_launcher: bool = False,
        config_overrides: dict | None = None,
    ):
        """``console``: how children's lines are shown (default: all of them, on ``output``).
        ``die_with_launcher``: children get SIGTERM from the kernel if this process dies (Linux); the
        CLI asks for it, so that a killed ``--local`` leaves nothing running. ``config_overrides``: laid
        over the run config for this swarm's children (written to a config file of its own)."""
        self.config_ref, self.config, self.steps = config_ref, config, steps
        self.prom_gateway = prom_gateway
        self.coordinator = coordinator
        self.coordinator_settings = coordinator_settings or {}
        self.coordinator_url: str | None = None
        self.coordinator_public_key: str | None = None
        self._token: str | None = None  # the local participants' token; only in this process and its children's environment
        self.workers = {spec.name: workers_per_stage for spec in config.stages} | (workers or {})
        self.log_dir, self.output, self.grace_seconds = Path(log_dir), output or sys.stdout, grace_seconds
        self.console = console or SwarmConsole(self.output, verbose=True)
        self.wrap, self.host = wrap, host
        self.keys_dir = Path(tempfile.mkdtemp(prefix="agora-local-keys-"))
        if config_overrides:
            self.config = type(config).model_validate(deep_merge(config.model_dump(mode="json"), config_overrides))
            self.config_ref = str(self.keys_dir / "run-config.yaml")
            Path(self.config_ref).write_text(yaml.safe_dump(self.config.model_dump(mode="json")), encoding="utf-8")
        self.summary_path = self.log_dir / "trainer-summary.json"
        self.dashboard_copy = self.log_dir / "dashboard.html"
        self.state = RunState(self.log_dir)
        self.processes: list[SwarmProcess] = []
        self.seed_maddrs: list[str] = []
        self._seen = threading.Condition()
        self._texts: dict[str, list[str]] = {}
        self._events: dict[str, list[ev.Event]] = {}
        self._claimed = False
        self._stopping = False
        self._preexec = None
        if die_with_launcher and sys.platform.startswith("linux"):
            self._preexec = _die_with(os.getpid(), ctypes.CDLL(None, use_errno=True))

    # --- children -----------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env_extra: dict | None = None) -> SwarmProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{EVENT_STREAM_ENV: "1"}, **(env_extra or {}))
        prefix = self.wrap(name) if self.wrap is not None else []
        popen = subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
            start_new_session=True,  # own process group: signals reach its DHT process and p2pd too
            preexec_fn=self._preexec,
        )
        self.state.add(name, popen.pid)
        pump = threading.Thread(target=self._pump, args=(name, popen), daemon=True, name=f"pump-{name}")
        with self._seen:
            process = SwarmProcess(name, popen, pump, len(self._events.get(name, [])))
        self.processes.append(process)
        pump.start()
        return process

    def _pump(self, name: str, popen: subprocess.Popen) -> None:
        for line in popen.stdout:
            event = decode_event(line)
            with self._seen:
                if event is None:
                    self._texts.setdefault(name, []).append(line.rstrip())
                else:
                    self._events.setdefault(name, []).append(event)
                self._seen.notify_all()
            if event is None:
                self.console.child_text(name, line.rstrip())
            else:
                self.console.child_event(name, event, console_lines(event))
        code = popen.wait()
        if code != 0 and not (self._stopping and code == -signal.SIGTERM):
            self.console.child_exited(name, code, self.texts_of(name)[-8:])

    def wait_for(self, name: str, kind: type[E], where: Callable[[E], bool] | None = None, *,
                 timeout: float, since: int = 0, count: int = 1) -> E | None:
        """Wait until a child has sent ``count`` events of ``kind`` for which ``where`` is true (every one
        of that kind without it); the last of them, or None on timeout. ``since``: ignore the events
        before that index (an earlier run of a restarted child, or what came before an action)."""

        def matching() -> list[E]:
            return [e for e in self._events.get(name, [])[since:] if isinstance(e, kind) and (where is None or where(e))]

        with self._seen:
            return matching()[count - 1] if self._seen.wait_for(lambda: len(matching()) >= count, timeout) else None

    def events_of(self, name: str, kind: type[E], since: int = 0, until: int | None = None) -> list[E]:
        """The child's events of ``kind``; ``since``/``until``: only those of the events at these
        indices (one run of a restarted child: its ``first_event`` to the next run's)."""
        with self._seen:
            return [e for e in self._events.get(name, [])[since:until] if isinstance(e, kind)]

    def texts_of(self, name: str) -> list[str]:
        """The lines a child (all its runs under that name) printed that were no event: a library's
        warning, a traceback, a coordinator's log."""
        with self._seen:
            return list(self._texts.get(name, []))

    def events_sent(self, name: str) -> int:
        """How many events a child (all its runs under that name) has sent so far."""
        with self._seen:
            return len(self._events.get(name, []))

    def listen_host(self, name: str) -> str:
        """The IPv4 address a child listens on: 127.0.0.1 unless ``host`` says otherwise."""
        return self.host(name) if self.host is not None else DEFAULT_HOST

    def _listen_maddrs(self, name: str) -> tuple[str, ...]:
        return (f"/ip4/{self.listen_host(name)}/tcp/0",)

    def _spawn_peer(self, name: str, module: str, options: PeerOptions) -> SwarmProcess:
        return self._spawn(name, ["-m", module, *options.to_argv()], env_extra=options.to_env())

    def start(self, timeout: float = 120.0, *, trainer: bool = True) -> None:
        try:
            left = self.state.claim()
        except SwarmBusy as e:
            raise SwarmError(str(e)) from None
        self._claimed = True
        if left:
            self.console.say(f"[LOCAL] Stopped {len(left)} process(es) a killed earlier run had left running ({', '.join(left)})")
        deadline = time.monotonic() + timeout
        if self.coordinator:  # first: the seed checks DHT records with the coordinator's public key
            self._start_coordinator(deadline)
        self._start_seed(deadline)
        for spec in self.config.stages:
            for index in range(self.workers.get(spec.name, 0)):
                worker = self.start_worker(spec.name, index)
                if self.coordinator:
                    # one join at a time: the coordinator fills the least-filled stage, ties in pipeline
                    # order, so sequential joins into this run's fresh database give exactly the planned layout
                    self._wait_for_access(worker, spec.name, time.monotonic() + timeout)
        if trainer:
            self.start_trainer()

    def start_trainer(self) -> SwarmProcess:
        """The trainer; started again, it continues its data stream where the last one left it."""
        return self._spawn_peer("trainer", "agora.trainer", self._trainer_options())

    def _start_seed(self, deadline: float) -> None:
        access = dict(coordinator_public_key=self.coordinator_public_key, config=self.config_ref) if self.coordinator else {}
        options = SeedOptions(
            identity_path=str(self.keys_dir / "seed.key"),
            log_file=str(self.log_dir / "seed.log"),
            host_maddrs=self._listen_maddrs("seed"),
            **access,
        )
        seed = self._spawn_peer("seed", "agora.run_seed", options)
        while (listening := self.wait_for("seed", ev.SeedListening, timeout=0.2, since=seed.first_event)) is None:
            if seed.popen.poll() is not None or time.monotonic() > deadline:
                raise SwarmError(f"the seed DHT did not start; see {self.log_dir / 'seed.log'}")
        self.seed_maddrs = list(listening.maddrs)

    @property
    def dashboard_url(self) -> str | None:
        return f"{self.coordinator_url}/" if self.coordinator_url else None

    def worker_name(self, stage: str, index: int) -> str:
        return f"{stage}#{index}"

    def _start_coordinator(self, deadline: float) -> None:
        import urllib.request

        import yaml

        from agora.coordinator.tokens import add_token

        self._token = add_token(self._token_file, "local-participant")
        # the coordinator takes its stages from this run config and checks every uploaded checkpoint against it
        run_config_path = self.keys_dir / "run_config.yaml"
        run_config_path.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
        port = free_port(DEFAULT_HOST)
        total = sum(self.workers.values())
        settings = {
            "run_name": self.config.run_name,
            "database_url": f"sqlite:///{(self.log_dir / 'coordinator.db').resolve()}",
            "host": DEFAULT_HOST,
            "port": port,
            "run_config": str(run_config_path.resolve()),
            "stages": [{"name": spec.name, "need": max(1, self.workers.get(spec.name, 0))} for spec in self.config.stages],
            "token_source": str(self._token_file),
            "key_path": str(self.keys_dir / "coordinator.key"),
            "queue": {"capacity": max(1, total), "max_active_per_user": max(1, total) + 4},
            "operators": ["local-participant"],  # the local trainer runs under the same token
            "checkpoints": {"directory": str((self.log_dir / "coordinator-checkpoints").resolve())},
            # workers beat every 5 s here: sample and judge silence on that scale, not production's
            "dashboard": {"sample_interval_s": 2, "lapse_after_s": 15},
        }
        config_path = self.keys_dir / "coordinator.yaml"
        config_path.write_text(yaml.safe_dump(deep_merge(settings, self.coordinator_settings)))
        coordinator = self._spawn("coordinator", ["-m", "agora.run_coordinator", "--config", str(config_path), "--log_level", "warning"])
        self.coordinator_url = f"http://{DEFAULT_HOST}:{port}"
        while True:
            try:
                with urllib.request.urlopen(f"{self.coordinator_url}/api/run_info", timeout=2) as answer:
                    self.coordinator_public_key = json.load(answer)["coordinator_public_key"]
                    self.console.say(f"[LOCAL] Dashboard (live charts): {self.dashboard_url}")
                    return
            except OSError:
                if coordinator.popen.poll() is not None or time.monotonic() > deadline:
                    said = " | ".join(self.texts_of("coordinator")[-5:]) or "nothing"
                    raise SwarmError(f"the coordinator did not start; its last lines: {said}") from None
                time.sleep(0.2)

    @property
    def _token_file(self) -> Path:
        return self.keys_dir / "tokens.txt"

    def add_participant(self, username: str) -> str:
        """A token for another account on this swarm's coordinator (it reads its token file on every
        check): a participant who is no operator, such as ``bench/abuse.py``'s dishonest one."""
        from agora.coordinator.tokens import add_token

        return add_token(self._token_file, username)

    def _wait_for_access(self, worker: SwarmProcess, stage: str, deadline: float) -> None:
        granted = None
        while granted is None:
            granted = self.wait_for(worker.name, ev.AccessGranted, timeout=0.5, since=worker.first_event)
            if granted is None and (worker.popen.poll() is not None or time.monotonic() > deadline):
                raise SwarmError(f"{worker.name} was not admitted by the coordinator; see {self.log_dir}")
        if granted.stage != stage:  # the label would lie about what the worker serves
            raise SwarmError(f"the coordinator gave {worker.name} stage {granted.stage} instead of {stage}; see {self.log_dir}")

    def start_worker(self, stage: str, index: int) -> SwarmProcess:
        return self._spawn_peer(self.worker_name(stage, index), "agora.run_server", self.worker_options(stage, index))

    def worker_options(self, stage: str, index: int) -> WorkerOptions:
        """What a stage's index-th worker is started with (with a coordinator, that assigns the stage)."""
        tag = f"{stage}_{index}"
        if self.coordinator:
            placement = dict(auth_server=self.coordinator_url, token=self._token, heartbeat_interval=5.0)
        else:
            placement = dict(stage=stage)
        return WorkerOptions(
            config=self.config_ref,
            gpu_id=index,
            host_maddrs=self._listen_maddrs(self.worker_name(stage, index)),
            initial_peers=tuple(self.seed_maddrs),
            identity_path=str(self.keys_dir / f"private_{tag}.key"),
            log_file=str(self.log_dir / f"server_{tag}.log"),
            prom_gateway=self.prom_gateway,
            **placement,
        )

    def _trainer_options(self) -> TrainerOptions:
        access = dict(auth_server=self.coordinator_url, token=self._token, identity_path=str(self.keys_dir / "trainer.key")) if self.coordinator else {}
        return TrainerOptions(
            config=self.config_ref,
            initial_peers=tuple(self.seed_maddrs),
            steps=self.steps,
            summary_path=str(self.summary_path),
            log_file=str(self.log_dir / "trainer.log"),
            # with this swarm's keys: a new swarm starts its data afresh, a restarted trainer continues
            data_position=str(self.keys_dir / "trainer.position.json"),
            prom_gateway=self.prom_gateway,
            host_maddrs=self._listen_maddrs("trainer"),
            **access,
        )

    def process(self, name: str) -> SwarmProcess:
        """The child of that name; for a restarted one, its latest run."""
        return next(p for p in reversed(self.processes) if p.name == name)

    # --- running and stopping ------------------------------------------------------------

    def wait_for_trainer(self, stop: threading.Event, timeout: float | None = None) -> int | None:
        """Block until the trainer exits (its code), or ``stop`` is set or ``timeout`` passes (None)."""
        trainer = self.process("trainer")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not stop.wait(0.5):
            code = trainer.popen.poll()
            if code is not None:
                trainer.pump.join(5)
                return code
            if deadline is not None and time.monotonic() > deadline:
                return None
        return None

    def listening_ports(self) -> set[int]:
        """TCP ports the swarm's processes listen on right now."""
        pids = {proc.pid for p in self.processes for proc in group_members(p.pgid)}
        return {
            c.laddr.port
            for c in psutil.net_connections(kind="tcp")
            if c.pid in pids and c.status == psutil.CONN_LISTEN
        }

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one child's whole process group (tests use this to make a worker vanish)."""
        os.killpg(self.process(name).pgid, sig)

    def stop(self) -> list[str]:
        """Stop the trainer first (it finishes in-flight work), then the workers, then the seed.

        Returns descriptions of anything still alive afterwards (empty when clean)."""
        self._stopping = True
        tiers = [
            [p for p in self.processes if p.name == "trainer"],
            [p for p in self.processes if p.name not in ("trainer", "seed", "coordinator")],
            [p for p in self.processes if p.name in ("seed", "coordinator")],
        ]
        for index, tier in enumerate(tiers):
            if index == 2:  # the workers have said goodbye: the dashboard shows the whole run now
                self.save_dashboard()
            self._stop_tier(tier)
        shutil.rmtree(self.keys_dir, ignore_errors=True)
        leftovers = [f"{proc.pid} {proc.name()}" for p in self.processes for proc in group_members(p.pgid)]
        if not leftovers and self._claimed:
            self.state.release()
        return leftovers

    def save_dashboard(self) -> Path | None:
        """Keep the dashboard, with its data, as a file that still shows the run once the coordinator is gone."""
        import urllib.request

        if self.coordinator_url is None or not any(p.name == "coordinator" and p.popen.poll() is None for p in self.processes):
            return None
        try:
            with urllib.request.urlopen(f"{self.coordinator_url}/dashboard/snapshot", timeout=10) as answer:
                self.dashboard_copy.write_bytes(answer.read())
        except OSError:
            return None
        return self.dashboard_copy

    def _stop_tier(self, tier: list[SwarmProcess]) -> None:
        # SIGTERM to the leader only: it shuts its own DHT process and p2pd down in order
        tier = [p for p in tier if p.popen.returncode is None or group_members(p.pgid)]
        for process in tier:
            if process.popen.poll() is None:
                _signal(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for process in tier:
            try:
                process.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(process.pgid, signal.SIGKILL)
                process.popen.wait()
        # whatever the leader left behind (a DHT process, p2pd) goes with its group
        for process in tier:
            if group_members(process.pgid):
                signal_group(process.pgid, signal.SIGTERM)
        sweep_deadline = time.monotonic() + 3.0
        for process in tier:
            while group_members(process.pgid) and time.monotonic() < sweep_deadline:
                time.sleep(0.1)
            if group_members(process.pgid):
                signal_group(process.pgid, signal.SIGKILL)
            process.pump.join(5)

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

