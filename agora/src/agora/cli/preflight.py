"""Checks run before a worker starts, each with the guide's message where it has one.

Every check is a small function of plain inputs (versions, byte counts, a port), so the tests can
feed it edge cases; ``run_preflight`` gathers the real inputs from this machine.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from agora.cli import troubleshooting as known
from agora.ports import port_is_free

GB = 1024**3
OK, WARN, FAIL = "ok", "warn", "fail"


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a GPU run asks of a machine (the participant guide's minimums)."""

    python: tuple[int, int] = (3, 11)
    ram_gb_per_gpu: float = 80
    disk_gb: float = 80
    bandwidth_mbps: float = 200


REQUIREMENTS = Requirements()


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    message: str
    fix: str = ""


class PreflightError(RuntimeError):
    """A check failed; the report says which."""


def check_python(version: tuple[int, int], req: Requirements = REQUIREMENTS) -> CheckResult:
    shown = f"{version[0]}.{version[1]}"
    if tuple(version[:2]) == req.python:
        return CheckResult("Python", OK, f"Python {shown}")
    return CheckResult("Python", WARN, f"Python {shown}; runs are tested on Python {req.python[0]}.{req.python[1]}",
                       "If the worker misbehaves, run agora_cli.py with python3.11.")


def pinned_version(package: str, constraints: Path) -> str | None:
    for line in constraints.read_text(encoding="utf-8").splitlines():
        name, _, version = line.strip().partition("==")
        if name.lower() == package and version:
            return version
    return None


def check_torch(installed: str, pinned: str) -> CheckResult:
    """Same major.minor as the pin passes (local labels like +cu128 and patch releases do not matter)."""
    want = ".".join(pinned.split(".")[:2])
    have = ".".join(re.split(r"[+]", installed)[0].split(".")[:2])
    if have == want:
        return CheckResult("PyTorch", OK, f"torch {installed}")
    return CheckResult("PyTorch", FAIL, known.WRONG_TORCH.format(version=want), known.WRONG_TORCH.fix)


def check_cuda(available: bool, allow_cpu: bool) -> CheckResult:
    if available:
        return CheckResult("CUDA", OK, "CUDA available")
    if allow_cpu:
        return CheckResult("CUDA", OK, "no CUDA device; this run config allows the CPU")
    return CheckResult("CUDA", FAIL, known.CUDA_NOT_AVAILABLE.template, known.CUDA_NOT_AVAILABLE.fix)


def check_vram(vram_bytes: int, fits: int, config_max: int, override: int | None) -> tuple[CheckResult, int | None]:
    """``fits``: the largest micro-batch the memory plan fits in ``vram_bytes`` on every stage of the
    run (0: not even one sequence); the run config's ``max_batch_size`` caps it."""
    if fits < 1:
        message = known.GPU_NOT_ELIGIBLE.format(vram_gb=f"{vram_bytes / GB:.0f}")
        return CheckResult("VRAM", FAIL, message, known.GPU_NOT_ELIGIBLE.fix), None
    batch = min(fits, config_max)
    why = f"memory plan: up to {fits} on every stage" + (f", run config allows {config_max}" if config_max < fits else "")
    return _apply_override("VRAM", f"{vram_bytes / GB:.2f} GiB VRAM → batch size {batch} ({why})", batch, override)


def check_cpu_batch(config_max: int, override: int | None) -> tuple[CheckResult, int]:
    return _apply_override("Batch size", f"CPU run → batch size {config_max} (run config)", config_max, override)


def _apply_override(name: str, message: str, tier: int, override: int | None) -> tuple[CheckResult, int | None]:
    if override is None:
        return CheckResult(name, OK, message), tier
    if override > tier:
        return CheckResult(name, FAIL, f"--batch_size_override {override} is above this machine's batch size {tier}",
                           "It may only lower the batch size (when the GPU runs out of memory); pass a smaller value or leave it out."), None
    return CheckResult(name, OK, f"{message}, lowered to {override} by --batch_size_override"), override


def check_ram(total_bytes: int, gpus: int, required: bool, req: Requirements = REQUIREMENTS) -> CheckResult:
    need = req.ram_gb_per_gpu * max(gpus, 1)
    have = total_bytes / GB
    if have >= need:
        return CheckResult("RAM", OK, f"{have:.0f} GB RAM for {gpus} GPU(s)")
    message = known.LOW_RAM.format(have_gb=f"{have:.0f}", gpus=gpus, need_gb=f"{need:.0f}")
    return CheckResult("RAM", FAIL if required else WARN, message, known.LOW_RAM.fix)


def check_disk(path: Path, free_bytes: int, required: bool, need_bytes: int | None = None, req: Requirements = REQUIREMENTS) -> CheckResult:
    """``need_bytes``: the run's checkpoint budget and installation (``memory_plan.disk_needed``);
    without it, the guide's figure."""
    have = free_bytes / GB
    need = need_bytes / GB if need_bytes is not None else req.disk_gb
    if have >= need:
        return CheckResult("Disk", OK, f"{have:.0f} GB free (the run needs {need:.0f} GB)")
    message = known.LOW_DISK.format(have_gb=f"{have:.0f}", path=path, need_gb=f"{need:.0f}")
    return CheckResult("Disk", FAIL if required else WARN, message, known.LOW_DISK.fix)


def check_port(port: int) -> CheckResult:
    if port_is_free(port):
        return CheckResult("Port", OK, f"port {port} is free")
    return CheckResult("Port", FAIL, known.PORT_IN_USE.format(port=port), known.PORT_IN_USE.fix)


def measure_bandwidth(timeout: float = 10.0) -> float:
    """Download speed in Mbit/s through speedtest.net's nearest server; raises when none can be reached."""
    import speedtest

    test = speedtest.Speedtest(timeout=timeout, secure=True)
    test.get_best_server()
    return test.download() / 1e6


def check_bandwidth(measure: Callable[[], float] = measure_bandwidth, req: Requirements = REQUIREMENTS) -> CheckResult:
    try:
        mbps = measure()
    except Exception as e:  # speedtest raises many kinds (config, no servers, HTTP); all mean "not measured"
        return CheckResult("Bandwidth", WARN, f"{known.SPEEDTEST_UNREACHABLE.template} ({type(e).__name__})", known.SPEEDTEST_UNREACHABLE.fix)
    if mbps >= req.bandwidth_mbps:
        return CheckResult("Bandwidth", OK, f"{mbps:.0f} Mbit/s download")
    return CheckResult("Bandwidth", WARN, f"{mbps:.0f} Mbit/s download; the run needs {req.bandwidth_mbps:.0f}",
                       "Expect slow downloads and failed all-reduce rounds; a faster connection is needed.")


def seed_address(maddr: str) -> tuple[str, int] | None:
    """(host, port) of /ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/... multiaddrs; None for others."""
    parts = maddr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[2] == "tcp" and parts[3].isdigit():
        return parts[1], int(parts[3])
    return None


def tcp_connect_ms(host: str, port: int, timeout: float) -> float:
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout):
        return (time.perf_counter() - started) * 1000


def check_seeds(seeds: tuple[str, ...], timeout: float = 3.0) -> list[CheckResult]:
    if not seeds:
        return [CheckResult("Seeds", WARN, "run.json lists no seed peers; latency not measured")]
    results = []
    for maddr in seeds:
        address = seed_address(maddr)
        if address is None:
            results.append(CheckResult("Seeds", WARN, f"cannot measure latency to {maddr} (not a TCP multiaddr)"))
            continue
        try:
            ms = tcp_connect_ms(*address, timeout=timeout)
        except OSError as e:
            results.append(CheckResult("Seeds", WARN, f"seed {address[0]}:{address[1]} unreachable ({e.strerror or type(e).__name__})",
                                       "Check outbound connections; the worker needs at least one seed to join the swarm."))
        else:
            results.append(CheckResult("Seeds", OK, f"seed {address[0]}:{address[1]} answers in {ms:.0f} ms"))
    return results


# Names reserved for examples (RFC 2606): a coordinator there is a placeholder, never a run.
_PLACEHOLDER_HOSTS = re.compile(r"(^|\.)(example|invalid)$|(^|\.)example\.(com|net|org)$")


def is_placeholder(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return bool(_PLACEHOLDER_HOSTS.search(host.lower()))


def fetch_run_info(url: str, timeout: float = 5.0) -> dict:
    """The coordinator's public /api/run_info; OSError or ValueError when it does not answer with one."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/run_info", timeout=timeout) as answer:
        return json.loads(answer.read(1 << 20))


def check_coordinator(url: str | None, run_file: Path, fetch: Callable[[str], dict] = fetch_run_info) -> CheckResult:
    """The run's coordinator (``auth_server`` of run.json): a placeholder fails, silence is a warning
    (the worker tries anyway, and says the same if it fails), an answer shows the run and its dashboard."""
    if not url:
        return CheckResult("Coordinator", WARN, f"{run_file} names no coordinator (auth_server); the worker will not join a run",
                           "Use the run.json of the run you join.")
    if is_placeholder(url):
        return CheckResult("Coordinator", FAIL, known.PLACEHOLDER_COORDINATOR.format(path=run_file, url=url), known.PLACEHOLDER_COORDINATOR.fix)
    try:
        info = fetch(url)
        stages = info["stages"]
        serving = sum(int(s.get("serving", s.get("workers", 0))) for s in stages)
        name = info["run_name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = getattr(e, "reason", None) or e
        return CheckResult("Coordinator", WARN, f"the coordinator at {url} (auth_server in {run_file}) did not answer ({reason})",
                           known.COORDINATOR_UNREACHABLE.fix)
    return CheckResult("Coordinator", OK, f"run {name} at {url}: {serving} node(s) serving, {info.get('queue_length', 0)} waiting;"
                                          f" dashboard {url.rstrip('/')}/")


def check_docker_engine() -> CheckResult:
    from agora.cli.docker_launch import DockerLaunchError, docker_client

    try:
        docker_client(timeout=5)
    except DockerLaunchError as e:
        return CheckResult("Docker", FAIL, str(e).splitlines()[0], known.DOCKER_UNAVAILABLE.fix)
    return CheckResult("Docker", OK, "the Docker engine answers")


@dataclasses.dataclass(frozen=True)
class PreflightInput:
    """Everything run_preflight needs to know about the run and this participant's settings."""

    gpu_id: int
    port: int
    use_docker: bool
    allow_cpu: bool
    config_max_batch: int
    batch_for_vram: Callable[[int], int]
    """VRAM in bytes → the largest micro-batch every stage fits (the run's memory plan)."""
    batch_size_override: int | None
    seeds: tuple[str, ...]
    gpus_on_machine: int
    workdir: Path
    constraints: Path
    auth_server: str | None = None
    run_file: Path = Path("run.json")
    disk_bytes: int | None = None
    """Free disk the run needs (checkpoints and installation); None: the guide's figure."""


@dataclasses.dataclass
class PreflightReport:
    results: list[CheckResult]
    batch_size: int | None

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAIL]


def run_preflight(inp: PreflightInput, emit: Callable[[CheckResult], None], bandwidth: Callable[[], CheckResult] = check_bandwidth) -> PreflightReport:
    import psutil
    import torch

    results: list[CheckResult] = []

    def add(result: CheckResult) -> None:
        results.append(result)
        emit(result)

    # first the checks that decide whether anything else is worth checking
    if inp.use_docker:
        add(check_docker_engine())
    add(check_coordinator(inp.auth_server, inp.run_file))
    if not inp.use_docker:  # the image brings its own Python and torch
        add(check_python(sys.version_info[:2]))
        pinned = pinned_version("torch", inp.constraints)
        if pinned:
            add(check_torch(torch.__version__, pinned))
    cuda = torch.cuda.is_available() and inp.gpu_id < torch.cuda.device_count()
    add(check_cuda(cuda, inp.allow_cpu))
    batch: int | None = None
    if cuda:
        vram = torch.cuda.get_device_properties(inp.gpu_id).total_memory
        result, batch = check_vram(vram, inp.batch_for_vram(vram), inp.config_max_batch, inp.batch_size_override)
        add(result)
    elif inp.allow_cpu:
        result, batch = check_cpu_batch(inp.config_max_batch, inp.batch_size_override)
        add(result)
    gpu_run = not inp.allow_cpu
    add(check_ram(psutil.virtual_memory().total, inp.gpus_on_machine, required=gpu_run))
    add(check_disk(inp.workdir, shutil.disk_usage(inp.workdir).free, required=gpu_run, need_bytes=inp.disk_bytes))
    add(check_port(inp.port))
    add(bandwidth())
    for result in check_seeds(inp.seeds):
        add(result)
    return PreflightReport(results, batch)
