"""Builds a worker from the run_server options and runs it until a signal arrives."""

from __future__ import annotations


import torch

from agora.cli import troubleshooting as known
from agora.config import ConfigError, RunConfig, load_run_config
from agora.membership.checkpoint_upload import CheckpointUploader
from agora.membership.identity import ensure_identity
from agora.peer_options import WorkerOptions
from agora.ports import free_port
from agora.processes import setup_process, start_metrics_push, stop_on_signals
from agora_server.optim.state_download import StateDownloadTooSlow

COORDINATOR_UNREACHABLE_MESSAGE = "Could not reach the coordinator at {url} ({error})."
"""Also in the CLI's table of known errors, with what to do (the address comes from run.json)."""


class WorkerLaunchError(RuntimeError):
    """The worker cannot start; the message says why and what to do."""

    def __init__(self, message: str, tag: str = "SERVER"):
        super().__init__(message)
        self.tag = tag


def pick_device(config: RunConfig) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)  # the launcher exposes exactly one GPU via CUDA_VISIBLE_DEVICES
    if config.server.allow_cpu:
        return torch.device("cpu")
    raise WorkerLaunchError("CUDA is not available. Exiting run.")


def effective_server_config(config: RunConfig, override: int | None) -> RunConfig:
    if override is None:
        return config
    if override > config.server.max_batch_size:
        raise WorkerLaunchError(
            f"--batch_size_override {override} is above this GPU's batch size {config.server.max_batch_size}; it may only lower it"
        )
    server = config.server.model_copy(update={"max_batch_size": override})
    return config.model_copy(update={"server": server})


def build_worker(**kwargs):
    from agora_server.server import StageWorker
    from agora_server.server.checkpoint import CheckpointError

    try:
        return StageWorker(**kwargs)
    except CheckpointError as e:
        raise WorkerLaunchError(str(e)) from None


def run_worker(options: WorkerOptions) -> int:
    from agora.worker.status import WorkerStatusWriter, status_path_for
    from agora_server.telemetry.events import ProcessError, ServerStopping

    log_file = options.log_path
    events = setup_process(log_file)
    events.subscribe(WorkerStatusWriter(status_path_for(log_file)))
    try:
        return _run(options, events)
    except WorkerLaunchError as e:
        if stop_on_signals().is_set():  # stopped by its owner while starting: not a failure
            events.emit(ServerStopping(stage="", reason=f"signal received ({e})"))
            return 0
        # an event, not a bare print: the log file and the status file must say why, too
        events.emit(ProcessError(tag=e.tag, message=str(e)))
        return 1


def _run(options: WorkerOptions, events) -> int:
    from hivemind import DHT

    from agora_server.p2p_frames import install_frame_limit

    try:
        config = effective_server_config(load_run_config(options.config), options.batch_size_override)
    except ConfigError as e:
        raise WorkerLaunchError(str(e)) from None
    device = pick_device(config)
    if config.server.cpu_threads:
        torch.set_num_threads(config.server.cpu_threads)

    stop = stop_on_signals()
    identity = ensure_identity(options.key_path)
    host_maddrs = options.listen_maddrs
    session = weights = peer_access = validator = None
    if options.auth_server:
        host_maddrs, membership = join_run(options, config, identity, host_maddrs, events, stop)
        session, weights, validator = membership.session, membership.weights, membership.validator
        stage, peer_access = session.access.stage, session.peer_access
    elif options.stage is None:
        raise WorkerLaunchError("no stage to serve: pass --auth_server (the coordinator assigns one) or --stage <name> for a run without a coordinator")
    else:
        stage = options.stage
    spec = config.stage(stage)
    install_frame_limit()  # before the DHT forks its processes: they keep it
    dht = DHT(
        initial_peers=options.initial_peers,
        host_maddrs=host_maddrs,
        announce_maddrs=options.announce_maddrs,
        identity_path=str(identity),
        record_validators=[validator] if validator else [],
        start=True,
        startup_timeout=60,
    )
    if peer_access is not None:
        peer_access.on_renew(lambda token: validator.renew_in(dht, token))
    # its own thread and connection: heartbeats and renewals never wait for a checkpoint upload
    uploader = CheckpointUploader(session.client.separate(), lambda: session.access, events.emit) if session is not None else None
    worker = pusher = None
    try:
        worker = build_worker(
            run=config.run_name,
            seed=config.seed,
            model=config.model,
            spec=spec,
            boundary=config.boundary,
            server=config.server,
            dht=dht,
            device=device,
            events=events,
            initial_state=weights,
            on_checkpoint=uploader.submit if uploader is not None else None,
            access=peer_access,
        )
        pusher = start_metrics_push(events, options.prom_gateway, config, worker.spec.name, worker.peer_id)
        if session is not None:
            events.subscribe(session)
            session.start(worker.stats())  # before any request can arrive
            uploader.start()
        try:
            worker.start()
        except StateDownloadTooSlow as e:
            raise WorkerLaunchError(f"{known.DOWNLOAD_TOO_SLOW.template} ({e})", tag="DOWNLOAD") from None
        worker.serve(stop)
    finally:
        if worker is not None:
            verdict = worker.halted
            reason = verdict.message if verdict else "signal received" if stop.is_set() else "error"
            worker.shutdown(reason)
        if uploader is not None:
            uploader.stop()
        if session is not None:  # after the worker's final counters: its last heartbeat carries them
            session.stop()
        if pusher is not None:
            pusher.stop()
        dht.shutdown()
    return 1 if worker.halted else 0


def join_run(options: WorkerOptions, config: RunConfig, identity_path, host_maddrs: list[str], events, stop):
    """Get admitted by the coordinator before the p2p daemon starts; returns the maddrs to listen on
    (a free port chosen if none was given: the port test needs the real one) and the Membership."""
    from agora.membership.client import AdmissionError, CoordinatorUnavailable
    from agora.membership.join import WorkerRole, join

    token = options.token
    if not token:
        raise WorkerLaunchError("--auth_server needs your HuggingFace token: pass --token or set AGORA_TOKEN")
    host, port = tcp_listen_address(host_maddrs[0])
    if port == 0:
        port = free_port(host)
        host_maddrs = [host_maddrs[0].replace("/tcp/0", f"/tcp/{port}", 1), *host_maddrs[1:]]
    role = WorkerRole(host=host, port=port, wait_timeout=options.auth_timeout, email=options.email, heartbeat_interval=options.heartbeat_interval)
    try:
        membership = join(role, config, coordinator_url=options.auth_server, token=token, identity_path=identity_path, emit=events.emit, stop=stop)
    except CoordinatorUnavailable as e:
        raise WorkerLaunchError(COORDINATOR_UNREACHABLE_MESSAGE.format(url=options.auth_server, error=e.reason), tag="AUTH") from None
    except AdmissionError as e:
        raise WorkerLaunchError(str(e), tag="AUTH") from None
    return host_maddrs, membership


def tcp_listen_address(maddr: str) -> tuple[str, int]:
    parts = maddr.strip("/").split("/")
    try:
        return parts[parts.index("ip4") + 1], int(parts[parts.index("tcp") + 1])
    except (ValueError, IndexError):
        raise WorkerLaunchError(f"--host_maddrs {maddr} is not /ip4/<address>/tcp/<port>; the coordinator's port test needs one") from None

