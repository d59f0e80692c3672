"""`python3 agora_cli.py status` and `stop [--gpu_id N]`: the workers this machine runs, without ps or docker rm."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from agora.cli import instances
from agora.worker.status import FAILED, STOPPING, WorkerStatus, read_status, status_path_for

STOP_GRACE_SECONDS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agora_cli.py", description="Check or stop the Agora workers on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="each worker: GPU, stage, state, contribution, log, and its node on the run's dashboard")
    stop = sub.add_parser("stop", help="stop the workers (all, or one GPU's)")
    stop.add_argument("--gpu_id", type=int, default=None, help="stop only this GPU's worker")
    return parser


def state_of(instance: instances.Instance, status: WorkerStatus | None) -> str:
    """What the worker is doing, as the worker itself last said (its status file), or how it ended."""
    if instance.mode == instances.DOCKER:
        from agora.cli.docker_launch import container_state

        container = container_state(instance.container or "")
        return f"{status.state} (container {container})" if status and container == "running" else f"container {container}"
    if instances.native_alive(instance):
        # a status file from an earlier run of this GPU says nothing about this one
        return status.state if status is not None and status.pid == instance.pid else "starting"
    if instance.stop_requested:
        return "stopped (agora_cli.py stop)"
    if instance.exit_code is None:
        return "not running"
    return "stopped" if instance.exit_code == 0 else f"exited with code {instance.exit_code}"


def status() -> int:
    found = instances.recorded()
    if not found:
        print("No Agora worker was started on this machine (for this user). Start one with: python3 agora_cli.py")
        return 0
    rows = [("GPU", "MODE", "STAGE", "STATE", "CONTRIBUTION", "LOG")]
    notes = []
    for inst in found:
        current = read_status(status_path_for(inst.log_file))
        if current is not None and inst.mode == instances.NATIVE and current.pid != inst.pid:
            current = None  # written by an earlier worker of this GPU
        contribution = f"{current.contribution_samples} samples" if current and current.contribution_samples is not None else "-"
        rows.append((str(inst.gpu_id), inst.mode, (current and current.stage) or "-", state_of(inst, current), contribution, inst.log_file))
        if current and current.message and current.state in (FAILED, STOPPING):
            notes.append(f"GPU {inst.gpu_id}: {current.message}")
        if current and current.dashboard_url:
            notes.append(f"GPU {inst.gpu_id}: this node on the run's dashboard: {current.dashboard_url}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    for note in notes:
        print(note)
    return 0


def stop_native(instance: instances.Instance, grace: float = STOP_GRACE_SECONDS) -> str:
    """SIGTERM to the worker's group (its launcher, if still attached, explains the exit), SIGKILL after grace."""
    if not instances.native_alive(instance):
        return "was not running"
    instances.update(instance.gpu_id, stop_requested=True)  # before the signal: its launcher reads it at the exit
    os.killpg(instance.pgid, signal.SIGTERM)
    gone = threading.Event()
    waiter = threading.Thread(target=_wait_group_gone, args=(instance, gone), daemon=True)
    waiter.start()
    if gone.wait(grace):
        return "stopped"
    try:
        os.killpg(instance.pgid, signal.SIGKILL)
    except ProcessLookupError:
        return "stopped"
    return f"killed (did not stop within {grace:.0f}s)"


def _wait_group_gone(instance: instances.Instance, gone: threading.Event) -> None:
    import psutil

    # the group leader is the worker; wait for it (not our child, so psutil polls it for us)
    try:
        psutil.Process(instance.pgid).wait()
    except psutil.NoSuchProcess:
        pass
    gone.set()


def stop(gpu_id: int | None) -> int:
    targets = [i for i in instances.recorded() if gpu_id is None or i.gpu_id == gpu_id]
    if not targets:
        which = f"on GPU {gpu_id}" if gpu_id is not None else "on this machine"
        print(f"No Agora worker is recorded {which}; `python3 agora_cli.py status` lists them.")
        return 1 if gpu_id is not None else 0
    code = 0
    for inst in targets:
        if inst.mode == instances.DOCKER:
            from agora.cli.docker_launch import DockerLaunchError, stop_container

            try:
                outcome = stop_container(inst.container or "")
            except DockerLaunchError as e:
                print(f"GPU {inst.gpu_id}: {e}")
                code = 1
                continue
            instances.forget(inst.gpu_id)
        else:
            outcome = stop_native(inst)
            if outcome == "was not running":
                instances.forget(inst.gpu_id)  # nothing left to report on
        print(f"GPU {inst.gpu_id} ({inst.mode}): {outcome}")
    return code


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return status() if args.command == "status" else stop(args.gpu_id)
