"""Runs the worker in Docker through the Docker SDK: one container per GPU, named agora_gpu<N>.

``container_spec`` is a pure function (tested against the SDK's own types); ``launch_in_docker``
talks to the engine: it builds the image from the repository's Dockerfile unless an image with the
same inputs exists, replaces a stopped container of the same name and starts the new one.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from agora.cli import instances
from agora.cli import troubleshooting as known
from agora.cli.run_file import REPO
from agora.cli.settings import Settings
from agora.cli.worker_command import SCRIPT
from agora.peer_options import WorkerOptions

IMAGE = "agora_worker"
MOUNT = "/home/agora"
IMAGE_INPUTS = ("Dockerfile", "constraints.txt", "agora/pyproject.toml", "agora_server/pyproject.toml")
VERSION_LABEL = "agora.image_inputs"
RESTART_POLICY = {"Name": "on-failure", "MaximumRetryCount": 3}
"""Restart after a crash (e.g. -9), but not forever: a refusal such as an invalid token would only repeat."""


class DockerLaunchError(RuntimeError):
    """Docker cannot run the worker; the message says why and what to do."""


def container_name(gpu_id: int) -> str:
    return f"agora_gpu{gpu_id}"


def image_digest() -> str:
    digest = hashlib.sha256()
    for name in IMAGE_INPUTS:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def container_spec(s: Settings, options: WorkerOptions, image: str, repo_dir: str) -> dict:
    """Keyword arguments for ``client.containers.run``."""
    from docker.types import DeviceRequest

    return dict(
        image=image,
        command=["python3.11", SCRIPT, *options.to_argv()],
        name=container_name(s.gpu_id),
        detach=True,
        network_mode="host",  # the worker listens on its host port directly, like a native one
        ipc_mode="host",
        device_requests=[DeviceRequest(device_ids=[str(s.gpu_id)], capabilities=[["gpu"]])],
        # only this GPU is visible inside, so it is device 0 there
        environment={**options.to_env(), "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": f"{MOUNT}/agora/src:{MOUNT}/agora_server/src"},
        volumes={repo_dir: {"bind": MOUNT, "mode": "rw"}},
        working_dir=MOUNT,
        restart_policy=dict(RESTART_POLICY),
        labels={"agora.gpu_id": str(s.gpu_id)},
    )


def docker_client(timeout: float | None = None):
    """A client whose engine has answered a ping; DockerLaunchError with the fix otherwise."""
    import docker

    try:
        client = docker.from_env(**({"timeout": timeout} if timeout else {}))
        client.ping()
    except Exception as e:  # DockerException, connection and permission errors all mean "no engine for us"
        raise DockerLaunchError(known.DOCKER_UNAVAILABLE.format(reason=_short(e)) + "\n" + known.DOCKER_UNAVAILABLE.fix) from None
    return client


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] or type(e).__name__


def ensure_image(client, say: Callable[[str], None]) -> str:
    digest = image_digest()
    tag = f"{IMAGE}:{digest}"
    if client.images.list(filters={"label": f"{VERSION_LABEL}={digest}"}):
        say(f"[DOCKER] Reusing image {tag}")
        return tag
    say(f"[DOCKER] Building image {tag} from the Dockerfile (first time: several minutes)...")
    client.images.build(path=str(REPO), tag=tag, labels={VERSION_LABEL: digest}, rm=True)
    return tag


def launch_in_docker(s: Settings, options: WorkerOptions, say: Callable[[str], None]) -> int:
    import docker.errors

    client = docker_client()
    name = container_name(s.gpu_id)
    try:
        existing = client.containers.get(name)
    except docker.errors.NotFound:
        existing = None
    if existing is not None:
        if existing.status == "running":
            raise DockerLaunchError(f"{name} is already running. Stop it first: python3 agora_cli.py stop --gpu_id {s.gpu_id}")
        existing.remove()
    try:
        image = ensure_image(client, say)
        container = client.containers.run(**container_spec(s, options, image, str(REPO)))
    except docker.errors.DockerException as e:
        raise DockerLaunchError(f"Docker could not start {name}: {_short(e)}") from None
    instances.record(instances.Instance(s.gpu_id, instances.DOCKER, str(REPO / s.log_path), container=container.name))
    say(f"[DOCKER] Started container {name} on GPU {s.gpu_id}, port {s.port}.")
    say(f"[DOCKER] Follow it:  docker logs -f {name}   (verbose log: {s.log_path})")
    say(f"[DOCKER] Stop it:    python3 agora_cli.py stop --gpu_id {s.gpu_id}   (or: docker stop {name} && docker rm {name})")
    return 0


def stop_container(name: str) -> str:
    import docker.errors

    client = docker_client()
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        return "not found"
    container.stop(timeout=30)
    container.remove()
    return "stopped and removed"


def container_state(name: str) -> str:
    import docker.errors

    try:
        client = docker_client()
    except DockerLaunchError:
        return "unknown (Docker engine not reachable)"
    try:
        return client.containers.get(name).status
    except docker.errors.NotFound:
        return "gone"

