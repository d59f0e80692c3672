"""One table of error strings: docs/troubleshooting.md (generated from it), the agent skill and the CLI's code must not drift from it."""

from __future__ import annotations

import ast
import re

import pytest

from agora.cli import troubleshooting as known
from tests.cli.conftest import REPO

GUIDE_STRINGS = [
    "Wrong pytorch version. Please install torch", "CUDA is not available. Exiting run.", "GPU is not eligible (GPU VRAM:",
    "Verification failed.", "Port test failed. Make sure your port forwarding is correct", "Authorization timeout after",
    "Invalid HuggingFace token", "This peer_id is already used by another user",
    "This node is already in the authorization queue. Please remove private key from the node and try again.",
    "Download is too slow, please ensure sufficient bandwidth and try again.", "An unknown connection error occurred. Exiting run.",
    "Too many failed all-reduce attempts. Exiting run.", "Failed to connect to CUDA. Exiting run.", "CUDA out of memory",
    "RAM usage exceeded threshold. Exiting run.", "Server exited with -9",
]


def test_the_table_has_every_string_of_the_guide():
    guide = [k.template for k in known.TABLE if k.source == "guide"]
    assert len(guide) == len(GUIDE_STRINGS)
    for text in GUIDE_STRINGS:
        assert any(t.startswith(text) or text in t for t in guide), text


def test_the_troubleshooting_page_is_the_generated_one():
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    assert page == known.troubleshooting_page(), "docs/troubleshooting.md is stale: run python3 scripts/troubleshooting_doc.py"
    assert "docs/troubleshooting.md" in (REPO / "README.md").read_text(), "the README links to it"


@pytest.mark.parametrize("doc", ["docs/troubleshooting.md", ".claude/skills/agora-join/SKILL.md"])
def test_docs_list_every_message_with_its_fix(doc):
    text = (REPO / doc).read_text()
    for entry in known.TABLE:
        assert f"| `{entry.display}` | {entry.fix} |" in text, f"{doc} lacks or changed the row for {entry.key}"
    rows = re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)
    assert sorted(rows) == sorted(k.display for k in known.TABLE), f"{doc} has rows the table does not"


def test_cli_code_uses_the_constants_not_copies_of_the_strings():
    """No module of agora.cli other than the table spells out one of its messages."""
    messages = [k.template.split("{")[0].strip() for k in known.TABLE]
    for path in (REPO / "agora/src/agora/cli").glob("*.py"):
        if path.name == "troubleshooting.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body and isinstance(node.body[0], ast.Expr)}
        literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
        for message in messages:
            assert not any(len(message) > 12 and message in lit for lit in literals), f"{path.name} copies {message!r}"


@pytest.mark.parametrize("line, key", [
    ("[SERVER] CUDA is not available. Exiting run.", "cuda_not_available"),
    ("[AUTH] Authorization timeout after 14400s", "auth_timeout"),
    ("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", "cuda_oom"),
    ("[SERVER] Invalid HuggingFace token", "invalid_token"),
    ("[TRAINING] Training step 3", None),
    ("[SERVER] Lost contact with the coordinator and this node's access expired. Exiting run.", "access_expired"),
    ("[SERVER] Checkpoint not saved: could not write checkpoint /c/x.pt: the disk is full", "checkpoint_not_saved"),
    ("[AUTH] Could not reach the coordinator at https://auth.agora.example (ConnectError: [Errno -2] Name or service not known).",
     "coordinator_unreachable"),
])
def test_worker_output_lines_are_recognised(line, key):
    found = known.match_line(line)
    assert (found.key if found else None) == key


def test_the_workers_own_messages_are_the_tables(tmp_path):
    from agora.worker.run import COORDINATOR_UNREACHABLE_MESSAGE
    from agora_server.server.checkpoint import CheckpointError, read_checkpoint
    from agora_server.telemetry.health import ACCESS_EXPIRED_MESSAGE

    assert ACCESS_EXPIRED_MESSAGE == known.ACCESS_EXPIRED.template
    assert COORDINATOR_UNREACHABLE_MESSAGE == known.COORDINATOR_UNREACHABLE.template
    damaged = tmp_path / "peer.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(damaged)
    assert known.match_line(f"[SERVER] {err.value}") is known.CHECKPOINT_UNREADABLE
