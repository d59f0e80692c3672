"""Builds a worker from the run_server arguments and runs it until a signal arrives."""

from __future__ import annotations

import argparse

import torch

from agora.config import ConfigError, RunConfig, load_run_config
from agora.identity import default_identity_path, ensure_identity
from agora.processes import setup_process, start_metrics_push, stop_on_signals

DEFAULT_PORT = 49200


class WorkerLaunchError(RuntimeError):
    """The worker cannot start; the message says why and what to do."""


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


def run_worker(args: argparse.Namespace) -> int:
    from hivemind import DHT

    log_file = args.log_file or f"logs/server_gpu{args.gpu_id}.log"
    events = setup_process(log_file)
    try:
        config = effective_server_config(load_run_config(args.config), args.batch_size_override)
    except ConfigError as e:
        raise WorkerLaunchError(str(e)) from None
    if args.stage is None:
        raise WorkerLaunchError("no stage assigned: pass --stage <name> (stage assignment by the coordinator is not available yet)")
    spec = config.stage(args.stage)
    device = pick_device(config)
    if config.server.cpu_threads:
        torch.set_num_threads(config.server.cpu_threads)

    stop = stop_on_signals()
    identity = ensure_identity(args.identity_path or default_identity_path(args.gpu_id))
    host_maddrs = args.host_maddrs or [f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT + args.gpu_id}"]
    dht = DHT(
        initial_peers=args.initial_peers,
        host_maddrs=host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=str(identity),
        start=True,
        startup_timeout=60,
    )
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
        )
        pusher = start_metrics_push(events, args.prom_gateway, config, worker.spec.name, worker.peer_id)
        worker.start()
        worker.serve(stop)
    finally:
        if worker is not None:
            verdict = worker.halted
            reason = verdict.message if verdict else "signal received" if stop.is_set() else "error"
            worker.shutdown(reason)
        if pusher is not None:
            pusher.stop()
        dht.shutdown()
    return 1 if worker.halted else 0

