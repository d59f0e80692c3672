"""The wizard driven through a real pseudo-terminal, as a participant types it (pexpect)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import pexpect

from tests.cli.conftest import REPO, free_port, write_run_json

TOKEN = "hf_testtokenABCDEFGH1234wxyz"
CLEAR = "\x15"  # Ctrl+U: clear the prompt's pre-filled default


def answer_first_run(child: pexpect.spawn, port: int, email: str = "me@example.org") -> None:
    child.expect("HuggingFace token")
    child.sendline(TOKEN)
    child.expect("Email")
    child.sendline(email)
    child.expect("Run the worker with")
    child.send("\x1b[B")  # arrow down: Native
    child.send("\r")
    child.expect("GPU id")
    child.send("\r")
    child.expect("Host port")
    child.send(CLEAR + f"{port}\r")
    child.expect("Announce port")
    child.send("\r")


def test_first_run_saves_settings_launches_and_explains_a_killed_worker(participant, silent_coordinator):
    write_run_json(participant.run_json, silent_coordinator)
    port = free_port()
    child = participant.spawn()
    answer_first_run(child, port)
    child.expect("Start with these settings")
    summary = child.before
    assert "hf_…wxyz" in summary and "me@example.org" in summary and str(port) in summary
    child.send("3")  # shortcut of "Change email" in the summary menu
    child.send("\r")
    child.expect("Email")
    child.send(CLEAR + "other@example.org\r")
    child.expect("Start with these settings")
    assert "other@example.org" in child.before
    child.send("\r")  # Start
    child.expect(r"Settings saved to (\S+)")
    child.expect(r"\[SERVER\] Started the worker on GPU 0 \(pid (\d+)\)")
    worker_pid = int(child.match.group(1))

    # status sees it while it waits for the (silent) coordinator
    status = subprocess.run([sys.executable, str(REPO / "agora_cli.py"), "status"], env=participant.env(),
                            capture_output=True, text=True, timeout=60)
    line = [l for l in status.stdout.splitlines() if l.startswith("0 ")]
    assert line and "native" in line[0] and "running" in line[0] and str(participant.workdir / "logs" / "server_gpu0.log") in line[0], status.stdout

    instance = participant.instance()
    assert instance["pid"] == worker_pid and instance["pgid"] == worker_pid
    os.killpg(worker_pid, signal.SIGKILL)  # as the OS does when memory runs out
    child.expect(r"Server exited with -9")
    child.expect("free -h")  # the table's advice follows
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1

    assert TOKEN not in participant.transcript(child)
    saved = participant.settings()
    assert saved["token"] == TOKEN and saved["host_port"] == port and saved["use_docker"] is False
    assert saved["email"] == "other@example.org"
    home = participant.home / ".agora"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "settings_gpu0.json").stat().st_mode) == 0o600
    assert not (home / "instance_gpu0.json").exists(), "the state file outlives its worker"


def save_settings(participant, monkeypatch, **values) -> None:
    """Settings as a previous wizard run saved them (same code path: agora.cli.settings.save)."""
    from agora.cli import settings

    monkeypatch.setenv("HOME", str(participant.home))
    settings.save(settings.Settings(**values))


def test_rerun_reuses_saved_settings(participant, monkeypatch):
    port = free_port()
    save_settings(participant, monkeypatch, token=TOKEN, email="me@example.org", host_port=port)
    again = participant.spawn("--preflight_only")
    again.expect("Using saved settings")
    again.expect("Start with these settings")
    assert "HuggingFace token (input hidden)" not in again.before, "asked again instead of reusing"
    assert "hf_…wxyz" in again.before and str(port) in again.before and "me@example.org" in again.before
    again.send("\r")
    again.expect(r"\[PREFLIGHT\] ok   Port\s+port %d is free" % port)
    again.expect("All checks passed")
    again.expect(pexpect.EOF)
    again.close()
    assert again.exitstatus == 0
    assert TOKEN not in participant.transcript(again)


def test_reconfigure_asks_everything_again(participant, monkeypatch):
    save_settings(participant, monkeypatch, token=TOKEN, email="me@example.org")
    new_port = free_port()
    again = participant.spawn("--reconfigure", "--preflight_only")
    again.expect("HuggingFace token")  # asked from scratch despite saved settings
    again.sendline("hf_anothertoken0000qrst")
    again.expect("Email")
    assert "me@example.org" not in again.buffer
    again.send(CLEAR + "\r")
    again.expect("Run the worker with")
    again.send("\x1b[B\r")
    again.expect("GPU id")
    again.send("\r")
    again.expect("Host port")
    again.send(CLEAR + f"{new_port}\r")
    again.expect("Announce port")
    again.send(CLEAR + "50123\r")
    again.expect("Start with these settings")
    assert "hf_…qrst" in again.before and "50123" in again.before
    again.send("\r")
    again.expect("All checks passed")
    again.expect(pexpect.EOF)
    saved = participant.settings()
    assert saved["token"] == "hf_anothertoken0000qrst" and saved["email"] is None
    assert saved["host_port"] == new_port and saved["announce_port"] == 50123


def test_skip_input_names_every_missing_value_and_never_prompts(participant):
    child = participant.spawn("--skip_input")
    child.expect(pexpect.EOF)
    child.close()
    out = participant.transcript(child)
    assert child.exitstatus == 2
    assert "--skip_input needs values that are neither flags nor saved settings: --token (your HuggingFace token)" in out
    assert "?" not in out.split("[SETUP]")[0], "prompted despite --skip_input"
    assert not (participant.home / ".agora" / "settings_gpu0.json").exists()


def test_a_port_in_use_is_refused_in_the_wizard(participant):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    try:
        child = participant.spawn()
        child.expect("HuggingFace token")
        child.sendline(TOKEN)
        child.expect("Email")
        child.send("\r")
        child.expect("Run the worker with")
        child.send("\x1b[B\r")
        child.expect("GPU id")
        child.send("\r")
        child.expect("Host port")
        child.send(CLEAR + f"{busy}\r")
        child.expect(f"Port {busy} is already in use on this machine.")
        child.send(CLEAR + "\x03")  # Ctrl+C leaves the wizard
        child.expect("nothing was saved")
        child.expect(pexpect.EOF)
        assert not (participant.home / ".agora" / "settings_gpu0.json").exists()
    finally:
        taken.close()


def test_two_gpus_get_their_own_ports_keys_logs_and_settings(participant):
    children = {gpu: participant.spawn("--skip_input", "--gpu_id", str(gpu), "--token", f"hf_token_for_gpu_{gpu}_xyz{gpu}", timeout=150) for gpu in (0, 1)}
    for gpu, child in children.items():
        child.expect(f"ok   Port\\s+port {49200 + gpu} is free")
        child.expect(f"Started the worker on GPU {gpu}")
        child.expect("did not answer")  # the run.json coordinator does not exist
        child.expect(r"Server exited with 1")
        child.expect(pexpect.EOF)
    for gpu in (0, 1):
        assert participant.settings(gpu)["token"] == f"hf_token_for_gpu_{gpu}_xyz{gpu}"
        assert (participant.workdir / f"private_gpu{gpu}.key").exists()
        assert (participant.workdir / "logs" / f"server_gpu{gpu}.log").exists()
        assert f"hf_token_for_gpu_{gpu}" not in participant.transcript(children[gpu])


def test_ctrl_c_is_forwarded_and_a_second_one_kills_the_worker(participant, silent_coordinator):
    write_run_json(participant.run_json, silent_coordinator)
    child = participant.spawn("--skip_input", "--token", TOKEN, "--host_port", str(free_port()))
    child.expect(r"Started the worker on GPU 0 \(pid (\d+)\)")
    worker = int(child.match.group(1))
    child.sendintr()
    child.expect("Stopping the worker")
    child.sendintr()
    child.expect("Worker stopped")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    try:
        os.killpg(worker, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the worker's process group survived the CLI"
