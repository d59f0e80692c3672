"""The container the CLI asks Docker for, checked against the Docker SDK's own types (no engine here),
and the Dockerfile checked by our own rules (hadolint is not installable on this machine)."""

from __future__ import annotations

import re

import pytest
from docker.models.containers import RUN_CREATE_KWARGS, RUN_HOST_CONFIG_KWARGS, _create_container_args
from docker.types import ContainerConfig, DeviceRequest

from agora.cli.docker_launch import MOUNT, RESTART_POLICY, container_spec
from agora.cli.run_file import REPO, RunFile
from agora.cli.settings import Settings
from agora.cli.worker_command import worker_options

API_VERSION = "1.45"
TOKEN = "hf_dockertoken1234abcd"


def spec_for(gpu_id: int) -> dict:
    run = RunFile("agora/src/agora/configs/llama-8b.yaml", "https://auth.example", "gw.example:9091", ("/ip4/1.2.3.4/tcp/31337/p2p/QmSeed",), REPO / "run.json")
    s = Settings(gpu_id=gpu_id, token=TOKEN, email="me@example.org", use_docker=True)
    options = worker_options(s, run, run.run_config, batch_size=1, config_max_batch=1, public_ip="203.0.113.7")
    return container_spec(s, options, "agora_worker:abc", "/srv/agora")


@pytest.mark.parametrize("gpu_id", [0, 3])
def test_container_spec_is_valid_for_the_sdk_and_asks_for_the_right_gpu_network_and_mount(gpu_id):
    spec = spec_for(gpu_id)
    # containers.run() would split these into create and host-config arguments: nothing may be left over
    assert set(spec) <= set(RUN_CREATE_KWARGS) | set(RUN_HOST_CONFIG_KWARGS) | {"image", "command", "detach", "volumes"}  # volumes: run() turns it into Binds
    created = _create_container_args(dict(spec, version=API_VERSION))
    host = created["host_config"]  # a docker.types.HostConfig, validated by the SDK
    assert host["NetworkMode"] == "host" and host["IpcMode"] == "host"
    assert host["RestartPolicy"] == RESTART_POLICY
    assert host["Binds"] == [f"/srv/agora:{MOUNT}:rw"]
    [request] = host["DeviceRequests"]
    assert isinstance(request, DeviceRequest)
    assert request["DeviceIDs"] == [str(gpu_id)] and request["Capabilities"] == [["gpu"]]
    name = created.pop("name")  # APIClient.create_container sends the name as a query parameter
    config = ContainerConfig(API_VERSION, **created)  # what APIClient.create_container builds
    assert config["HostConfig"] is host
    assert config["Image"] == "agora_worker:abc" and config["WorkingDir"] == MOUNT
    assert name == f"agora_gpu{gpu_id}"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # only that GPU is inside the container
    assert env["AGORA_TOKEN"] == TOKEN
    command = config["Cmd"]
    assert TOKEN not in " ".join(command), "the token must not be visible in the command line"
    assert command[:2] == ["python3.11", "agora/src/agora/run_server.py"]
    joined = " ".join(command)
    for fragment in (f"--gpu_id {gpu_id}", f"--host_maddrs /ip4/0.0.0.0/tcp/{49200 + gpu_id}", f"--announce_maddrs /ip4/203.0.113.7/tcp/{49200 + gpu_id}",
                     "--auth_server https://auth.example", "--prom_gateway gw.example:9091", f"--log_file logs/server_gpu{gpu_id}.log",
                     f"--identity_path private_gpu{gpu_id}.key", "--initial_peers /ip4/1.2.3.4/tcp/31337/p2p/QmSeed"):
        assert fragment in joined
    assert "--batch_size_override" not in joined  # equal to the config's batch size: nothing to lower


def test_worker_command_is_accepted_by_run_server(monkeypatch):
    from agora.run_server import parse_args

    monkeypatch.delenv("AGORA_TOKEN", raising=False)
    spec = spec_for(1)
    args = parse_args(spec["command"][2:])
    assert args.gpu_id == 1 and args.token is None and args.initial_peers == ("/ip4/1.2.3.4/tcp/31337/p2p/QmSeed",)


DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_rules():
    """What we check in place of hadolint: a pinned CUDA runtime base, Python 3.11, installs through
    constraints.txt, no cache or secrets in the image, apt lists cleaned in the same layer."""
    steps = instructions()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", froms[0]), froms
    runs = [arg for op, arg in steps if op == "RUN"]
    for run in runs:
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run
            assert "apt-get update" in run  # never install from a stale cached index layer
        if re.search(r"pip install", run):
            assert "pip==" in run or "--constraint constraints.txt" in run, f"unpinned pip install: {run}"
    assert any("python3.11" in run and "--constraint constraints.txt" in run for run in runs)
    copied = " ".join(arg for op, arg in steps if op in ("COPY", "ADD"))
    assert not any(op == "ADD" for op, _ in steps), "COPY, not ADD (no remote fetches or auto-extraction)"
    assert ".key" not in copied and ".agora" not in copied and "token" not in DOCKERFILE.lower()
    assert not any(op == "USER" and arg.strip() == "root" for op, arg in steps)
    ignored = (REPO / ".dockerignore").read_text().split()
    for must in ("*.key", ".venv", "logs", ".git"):
        assert must in ignored
