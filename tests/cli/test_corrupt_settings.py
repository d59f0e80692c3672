"""A corrupt settings file, met by the real CLI in a terminal: a clear error that names the file and what
to do, the file left byte for byte as it was, and no secret from it on the screen."""

from __future__ import annotations

import stat

import pexpect
import pytest

from tests.cli.conftest import free_port

SECRET = "hf_secretSECRET0123456789abcd"


@pytest.mark.parametrize(
    ("content", "reason", "args"),
    [
        (f'{{"token": "{SECRET}", "host_port": 492', "it is not valid JSON (Expecting ',' delimiter at line 1, column", ()),
        (f'{{"token": "hf_x", "host_port": "{SECRET}"}}', "host_port must be a whole number, found text", ("--skip_input",)),
        (f'["{SECRET}"]', "it must hold a JSON object ({...}), not a list", ("--skip_input",)),
        ("", "the file is empty", ()),
    ],
    ids=["truncated", "wrong-type", "not-an-object", "empty"],
)
def test_a_corrupt_settings_file_stops_the_cli_and_is_left_as_it_was(participant, content, reason, args):
    path = participant.home / ".agora" / "settings_gpu0.json"
    path.parent.mkdir(mode=0o700)
    path.write_text(content)
    before = path.read_bytes()

    child = participant.spawn(*args)
    child.expect(pexpect.EOF)
    child.close()
    said = participant.transcript(child)
    assert child.exitstatus == 2, said
    assert f"[SETUP] Saved settings {path} cannot be read: {reason}" in said
    assert "[SETUP] The file was left as it is. Fix or delete it, or run with `--reconfigure`" in said
    assert "HuggingFace token" not in said, "asked questions instead of stopping"
    assert SECRET not in said
    assert path.read_bytes() == before and sorted(path.parent.iterdir()) == [path], "nothing written in ~/.agora"


def test_reconfigure_keeps_the_corrupt_file_aside_and_writes_a_new_one(participant):
    path = participant.home / ".agora" / "settings_gpu0.json"
    path.parent.mkdir(mode=0o700)
    path.write_text(f'{{"token": "{SECRET}", "host_')
    path.chmod(0o644)  # edited by hand
    before = path.read_bytes()

    child = participant.spawn("--reconfigure", "--skip_input", "--token", "hf_newtokenNEWTOKEN0000wxyzABCDEFGHIJ",
                              "--host_port", str(free_port()), "--preflight_only")
    child.expect(pexpect.EOF)
    child.close()
    said = participant.transcript(child)
    assert f"[SETUP] Kept the unreadable settings file as {path}.bad" in said
    bad = path.with_name(path.name + ".bad")
    assert bad.read_bytes() == before and stat.S_IMODE(bad.stat().st_mode) == 0o600
    assert participant.settings()["token"] == "hf_newtokenNEWTOKEN0000wxyzABCDEFGHIJ"
    assert SECRET not in said and "hf_newtokenNEWTOKEN0000wxyzABCDEFGHIJ" not in said
