"""The one table of error strings a participant can meet, with what to do about each.

The CLI prints these messages (preflight, launch, exit explanations) from the constants below;
docs/troubleshooting.md (generated from this table) and `.claude/skills/agora-join/SKILL.md` list every
one of them, and tests/cli/test_troubleshooting.py fails if they drift apart. Messages marked ``guide`` are
the participant guide's exact strings (placeholders in braces); the others are the CLI's own.
"""

from __future__ import annotations

import dataclasses
import re
import string


@dataclasses.dataclass(frozen=True)
class KnownError:
    key: str
    template: str
    """The message; ``{name}`` fields are filled in when it is printed."""
    fix: str
    """What the participant should do, in one or two sentences."""
    source: str = "guide"
    """``guide``: the participant guide's string, printed by the worker or the CLI; ``worker``: the
    worker's own (not in the guide); ``cli``: the CLI's own."""

    @property
    def display(self) -> str:
        """The message as the docs show it, placeholders as <name>."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.template)

    def format(self, **fields) -> str:
        return self.template.format(**fields)

    def pattern(self) -> re.Pattern:
        parts = []
        for literal, field, _, _ in string.Formatter().parse(self.template):
            parts.append(re.escape(literal))
            if field is not None:
                parts.append(r".+?")
        return re.compile("".join(parts))


WRONG_TORCH = KnownError(
    "wrong_torch",
    "Wrong pytorch version. Please install torch {version}",
    "Let the CLI manage the environment: delete `.venv` and run `python3 agora_cli.py` again; it installs the "
    "pinned torch from constraints.txt. For a hand-made environment: `pip install -c constraints.txt torch`.",
)
CUDA_NOT_AVAILABLE = KnownError(
    "cuda_not_available",
    "CUDA is not available. Exiting run.",
    "No usable NVIDIA GPU was found. Check `nvidia-smi` shows the GPU and driver; with Docker, make sure the "
    "NVIDIA Container Toolkit is installed so the container can be given the GPU. No GPU on this machine? See the "
    "whole system train here on the CPU: `python3 agora_cli.py --local --steps 300`.",
)
GPU_NOT_ELIGIBLE = KnownError(
    "gpu_not_eligible",
    "GPU is not eligible (GPU VRAM: {vram_gb} GB).",
    "This GPU has less memory than the run's stages need; `python3 agora_cli.py memory-plan` shows each stage's "
    "need. Use a GPU with at least 24 GB of VRAM, such as an RTX 4090.",
)
VERIFICATION_FAILED = KnownError(
    "verification_failed",
    "Verification failed.",
    "The code does not match the run's released version. Undo local edits (`git status`, `git checkout .`) "
    "and update with `git pull`, then start again.",
)
PORT_TEST_FAILED = KnownError(
    "port_test_failed",
    "Port test failed. Make sure your port forwarding is correct",
    "The coordinator could not connect back to your announced port. Open that TCP port (49200 + GPU id by "
    "default) for inbound traffic in the firewall, router or cloud security group; behind a port mapping "
    "(e.g. RunPod) pass the external port with `--announce_port`.",
)
AUTH_TIMEOUT = KnownError(
    "auth_timeout",
    "Authorization timeout after {seconds}s",
    "The queue was long. Start the node again to rejoin the queue; check the dashboard's wait time first.",
)
INVALID_TOKEN = KnownError(
    "invalid_token",
    "Invalid HuggingFace token",
    "Create a new HuggingFace access token (no permissions needed) and run "
    "`python3 agora_cli.py --reconfigure` (or pass `--token`).",
)
PEER_ID_USED = KnownError(
    "peer_id_used",
    "This peer_id is already used by another user",
    "The identity key file (`private_gpu<ID>.key`) was registered with another HuggingFace account. Use that "
    "account's token, or delete the key file so a new identity is made at the next start.",
)
ALREADY_QUEUED = KnownError(
    "already_queued",
    "This node is already in the authorization queue. Please remove private key from the node and try again.",
    "Another node with the same identity is queued. Delete `private_gpu<ID>.key` and start again.",
)
DOWNLOAD_TOO_SLOW = KnownError(
    "download_too_slow",
    "Download is too slow, please ensure sufficient bandwidth and try again.",
    "The model weights arrived too slowly and the node lost its place. Run on a connection of 200 Mbps or "
    "more, then start again.",
)
UNKNOWN_CONNECTION = KnownError(
    "unknown_connection",
    "An unknown connection error occurred. Exiting run.",
    "The node lost its connection for good. Check the internet connection and that no firewall blocks "
    "outbound traffic, then start again.",
)
ALLREDUCE_FAILED = KnownError(
    "allreduce_failed",
    "Too many failed all-reduce attempts. Exiting run.",
    "Averaging with the other nodes of your stage kept timing out, which points at a slow or unstable "
    "connection. Check the bandwidth (200 Mbps or more) and start again.",
)
CUDA_FAILED = KnownError(
    "cuda_failed",
    "Failed to connect to CUDA. Exiting run.",
    "The GPU failed while training. Check `nvidia-smi`; stop other programs using this GPU, then start again.",
)
CUDA_OOM = KnownError(
    "cuda_oom",
    "CUDA out of memory",
    "The batch size is too large for the free GPU memory. Start again with a smaller one, e.g. "
    "`python3 agora_cli.py --batch_size_override 1`, lowering it until the error stops.",
)
RAM_EXCEEDED = KnownError(
    "ram_exceeded",
    "RAM usage exceeded threshold. Exiting run.",
    "System memory ran short. Close other memory-hungry programs (with Docker: raise the container's memory "
    "limit) and start again.",
)
SERVER_KILLED = KnownError(
    "server_killed",
    "Server exited with -9",
    "The operating system killed the worker, usually for lack of memory or a limit on threads or open files. "
    "Check `free -h`, `ulimit -u` and `ulimit -n`; the run needs 80 GB of RAM per GPU; raise low limits.",
)

# The CLI's own messages.
PORT_IN_USE = KnownError(
    "port_in_use",
    "Port {port} is already in use on this machine.",
    "Another program (or another Agora instance) listens there. Stop it, or pick another port with "
    "`--host_port <PORT>`; each GPU needs its own port.",
    source="cli",
)
MISSING_VALUES = KnownError(
    "missing_values",
    "--skip_input needs values that are neither flags nor saved settings: {missing}",
    "Pass them as flags (e.g. `--token hf_...`), or run once without `--skip_input` to answer the questions "
    "and save them.",
    source="cli",
)
SETTINGS_UNREADABLE = KnownError(
    "settings_unreadable",
    "Saved settings {path} cannot be read: {reason}",
    "The file was left as it is. Fix or delete it, or run with `--reconfigure` (the old file is kept next to "
    "the new one with a `.bad` suffix).",
    source="cli",
)
LOW_RAM = KnownError(
    "low_ram",
    "Not enough RAM: {have_gb} GB for {gpus} GPU(s); the run needs {need_gb} GB.",
    "Use a machine with 80 GB of RAM per GPU, or run fewer GPUs on this one.",
    source="cli",
)
LOW_DISK = KnownError(
    "low_disk",
    "Not enough free disk space: {have_gb} GB free in {path}; the run needs {need_gb} GB.",
    "Free up space (old checkpoints, Docker images: `docker system prune`) or move the repository to a "
    "larger disk.",
    source="cli",
)
SPEEDTEST_UNREACHABLE = KnownError(
    "speedtest_unreachable",
    "Could not reach a speed test server; bandwidth not measured.",
    "Not fatal: the node starts anyway. Make sure the connection gives 200 Mbps or more (e.g. run "
    "`speedtest-cli` later, or a browser speed test); a slow link shows up as failed downloads or all-reduce.",
    source="cli",
)
DOCKER_UNAVAILABLE = KnownError(
    "docker_unavailable",
    "Docker engine not reachable: {reason}",
    "Install Docker and the NVIDIA Container Toolkit and start the engine (`sudo systemctl start docker`; "
    "your user must be allowed to use it), or run natively: `python3 agora_cli.py --reconfigure` and choose "
    "native.",
    source="cli",
)
ACCESS_EXPIRED = KnownError(
    "access_expired",
    "Lost contact with the coordinator and this node's access expired. Exiting run.",
    "The coordinator did not answer until this node's access ran out. Check that the coordinator is up (the "
    "run's dashboard) and reachable from this machine, then start again.",
    source="worker",
)
COORDINATOR_UNREACHABLE = KnownError(
    "coordinator_unreachable",
    "Could not reach the coordinator at {url} ({error}).",
    "The address is `auth_server` in run.json (or the file given with `--run_json`); the shipped run.json holds "
    "a placeholder. Put the run's coordinator address there (the run's announcement or dashboard gives it), "
    "and check that this machine can reach it. No run to join yet? `python3 agora_cli.py --local --steps 300` "
    "runs a whole swarm on this machine.",
    source="worker",
)
PLACEHOLDER_COORDINATOR = KnownError(
    "placeholder_coordinator",
    "{path} names no real coordinator: auth_server is the placeholder {url}.",
    "Put the address of the run you join into run.json (`auth_server`, from the run's announcement or dashboard), "
    "or point `--run_json` at the run's file. To try Agora on this machine first: `python3 agora_cli.py --local "
    "--steps 300`.",
    source="cli",
)
UNUSUAL_TOKEN = KnownError(
    "unusual_token",
    "This does not look like a HuggingFace token (hf_ followed by 34 letters and digits).",
    "Copy the token again from huggingface.co/settings/tokens (a typo or a cut-off paste is the usual cause). "
    "If your run accepts other tokens (a local token file), pass `--any_token`.",
    source="cli",
)
CHECKPOINT_NOT_SAVED = KnownError(
    "checkpoint_not_saved",
    "Checkpoint not saved: {reason}",
    "Not fatal: training goes on and the last good checkpoint is kept. Free disk space where the checkpoints "
    "go (the message names the directory), or set `server.checkpoint_dir` in the run config to a disk with room.",
    source="worker",
)
CHECKPOINT_UNREADABLE = KnownError(
    "checkpoint_unreadable",
    "No checkpoint of this worker can be read ({files}).",
    "The files are left as they are. Delete them to start this worker afresh (it then takes the stage's weights "
    "from its peers or the coordinator), or put back a good copy.",
    source="worker",
)

TABLE: tuple[KnownError, ...] = (
    WRONG_TORCH, CUDA_NOT_AVAILABLE, GPU_NOT_ELIGIBLE, VERIFICATION_FAILED, PORT_TEST_FAILED, AUTH_TIMEOUT,
    INVALID_TOKEN, PEER_ID_USED, ALREADY_QUEUED, DOWNLOAD_TOO_SLOW, UNKNOWN_CONNECTION, ALLREDUCE_FAILED,
    CUDA_FAILED, CUDA_OOM, RAM_EXCEEDED, SERVER_KILLED, ACCESS_EXPIRED, COORDINATOR_UNREACHABLE, CHECKPOINT_NOT_SAVED,
    CHECKPOINT_UNREADABLE, PORT_IN_USE, MISSING_VALUES, SETTINGS_UNREADABLE, LOW_RAM, LOW_DISK, SPEEDTEST_UNREACHABLE,
    DOCKER_UNAVAILABLE, PLACEHOLDER_COORDINATOR, UNUSUAL_TOKEN,
)


def match_line(line: str) -> KnownError | None:
    """The known error a worker output line reports, if any."""
    for known in TABLE:
        if known.source in ("guide", "worker") and known.pattern().search(line):
            return known
    return None


def markdown_rows() -> str:
    """The table's rows (`| message | what to do |`), as docs/troubleshooting.md and the agent skill show them."""
    return "\n".join(f"| `{k.display}` | {k.fix} |" for k in TABLE)


def troubleshooting_page() -> str:
    """docs/troubleshooting.md, whole: written by ``scripts/troubleshooting_doc.py``, checked by a test."""
    return (
        "# Troubleshooting\n\n"
        "Messages a participant can meet, from the worker (the participant guide's strings and the worker's own) or\n"
        "from the CLI, and what to do. Generated from the one table in `agora/src/agora/cli/troubleshooting.py` by\n"
        "`python3 scripts/troubleshooting_doc.py`; the CLI prints the same fixes, and a test keeps this page and the\n"
        "agent skill in step with the table. Placeholders are in angle brackets.\n\n"
        "| Message | What to do |\n|---|---|\n" + markdown_rows() + "\n"
    )
