"""The wizard driven through a real pseudo-terminal, as a participant types it (pexpect)."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys

import pexpect

from tests.cli.conftest import REPO, free_port, write_run_json

def hf_token(tag: str) -> str:
    """A token of the HuggingFace shape (hf_ and 34 letters and digits) ending in ``tag``."""
    return "hf_" + "T" * (34 - len(tag)) + tag


TOKEN = hf_token("wxyz")
CLEAR = "\x15"  # Ctrl+U: clear the prompt's pre-filled default


def answer_first_run(child: pexpect.spawn, port: int, email: str = "me@example.org") -> None:
    child.expect("HuggingFace token")
    child.sendline(TOKEN)
    child.expect("Email")
    child.sendline(email)
    child.expect("Run the worker with")
    child.send("\r")  # no Docker engine answers here: native is the default
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

    # status says what the worker does while it waits for the (silent) coordinator
    child.expect(r"\[AUTH\] Joining the run through the coordinator at " + re.escape(silent_coordinator))
    line = status_line(participant)
    assert "native" in line and " joining " in line and str(participant.workdir / "logs" / "server_gpu0.log") in line, line

    instance = participant.instance()
    assert instance["pid"] == worker_pid and instance["pgid"] == worker_pid
    os.killpg(worker_pid, signal.SIGKILL)  # as the OS does when memory runs out
    child.expect(r"Server exited with -9")
    child.expect("free -h")  # the table's advice follows
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert " exited with code -9 " in status_line(participant)

    assert TOKEN not in participant.transcript(child)
    saved = participant.settings()
    assert saved["token"] == TOKEN and saved["host_port"] == port and saved["use_docker"] is False
    assert saved["email"] == "other@example.org"
    home = participant.home / ".agora"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "settings_gpu0.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "instance_gpu0.json").stat().st_mode) == 0o600 and participant.instance()["exit_code"] == -9


def status_line(participant) -> str:
    """GPU 0's row of `agora_cli.py status`."""
    status = subprocess.run([sys.executable, str(REPO / "agora_cli.py"), "status"], env=participant.env(),
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in status.stdout.splitlines() if line.startswith("0 ")]
    assert status.returncode == 0 and lines, status.stdout + status.stderr
    return lines[0] + " "


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


def test_reconfigure_asks_everything_again_with_the_saved_values_filled_in(participant, monkeypatch):
    old_port = free_port()
    save_settings(participant, monkeypatch, token=TOKEN, email="me@example.org", use_docker=False, host_port=old_port)
    new_port = free_port()
    again = participant.spawn("--reconfigure", "--preflight_only")
    again.expect("Enter keeps hf_…wxyz")  # asked from scratch, the saved token one key away
    again.send("\r")
    again.expect("Email")
    again.expect("me@example.org")  # pre-filled
    again.send("\r")
    again.expect("Run the worker with")
    again.send("\r")  # the saved choice (native) is the default, whatever this machine has
    again.expect("GPU id")
    again.send("\r")
    again.expect("Host port")
    again.expect(str(old_port))
    again.send(CLEAR + f"{new_port}\r")
    again.expect("Announce port")
    again.send(CLEAR + "50123\r")
    again.expect("Start with these settings")
    assert "hf_…wxyz" in again.before and "50123" in again.before and "me@example.org" in again.before
    again.send("\r")
    again.expect("All checks passed")
    again.expect(pexpect.EOF)
    saved = participant.settings()
    assert saved["token"] == TOKEN and saved["email"] == "me@example.org" and saved["use_docker"] is False
    assert saved["host_port"] == new_port and saved["announce_port"] == 50123
    assert TOKEN not in participant.transcript(again)


def test_skip_input_names_every_missing_value_and_never_prompts(participant):
    child = participant.spawn("--skip_input")
    child.expect(pexpect.EOF)
    child.close()
    out = participant.transcript(child)
    assert child.exitstatus == 2
    assert "--skip_input needs values that are neither flags nor saved settings: --token (your HuggingFace token" in out
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
        child.send("\r")
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
    children = {gpu: participant.spawn("--skip_input", "--gpu_id", str(gpu), "--token", hf_token(f"gpu{gpu}"), timeout=150) for gpu in (0, 1)}
    for gpu, child in children.items():
        child.expect(f"ok   Port\\s+port {49200 + gpu} is free")
        child.expect(f"Started the worker on GPU {gpu}")
        child.expect(r"Could not reach the coordinator at http://127\.0\.0\.1:\d+ \(ConnectError")  # nothing listens there
        child.expect(r"Server exited with 1")
        child.expect(f"The address came from auth_server in {participant.run_json}")
        child.expect(pexpect.EOF)
    for gpu in (0, 1):
        assert participant.settings(gpu)["token"] == hf_token(f"gpu{gpu}")
        assert (participant.workdir / f"private_gpu{gpu}.key").exists()
        assert (participant.workdir / "logs" / f"server_gpu{gpu}.log").exists()
        assert hf_token(f"gpu{gpu}") not in participant.transcript(children[gpu])


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


def test_a_new_gpu_reuses_the_token_email_and_mode_saved_for_another(participant, monkeypatch):
    save_settings(participant, monkeypatch, gpu_id=0, token=TOKEN, email="me@example.org", use_docker=False)
    port = free_port()
    child = participant.spawn("--gpu_id", "1", "--preflight_only")
    child.expect("Reusing the token, email and Docker/native choice saved for GPU 0")
    child.expect("Host port")  # the GPU's own questions only
    assert "HuggingFace token" not in child.before and "Email" not in child.before and "Run the worker with" not in child.before
    child.send(CLEAR + f"{port}\r")
    child.expect("Announce port")
    child.send("\r")
    child.expect("Start with these settings")
    assert "hf_…wxyz" in child.before and "me@example.org" in child.before
    child.send("\r")
    child.expect("All checks passed")
    child.expect(pexpect.EOF)
    saved = participant.settings(1)
    assert (saved["token"], saved["email"], saved["use_docker"], saved["host_port"]) == (TOKEN, "me@example.org", False, port)
    assert TOKEN not in participant.transcript(child)


def test_a_token_of_the_wrong_shape_is_refused_under_its_question_unless_allowed(participant):
    child = participant.spawn("--preflight_only")
    child.expect(r"HuggingFace token \(input hidden\)")
    child.sendline("abc")
    # the problem is printed on the line under the question (not drawn at the bottom of the terminal)
    child.expect(r"HuggingFace token \(input hidden\):[^\n]*\n[^\n]*! This does not look like a HuggingFace token")
    child.expect(r"HuggingFace token \(input hidden\)")  # asked again
    child.send("\x03")
    child.expect("nothing was saved")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and not (participant.home / ".agora" / "settings_gpu0.json").exists()

    flagged = participant.spawn("--skip_input", "--token", "abc", "--preflight_only")
    flagged.expect(pexpect.EOF)
    flagged.close()
    said = participant.transcript(flagged)
    assert flagged.exitstatus == 2 and "This does not look like a HuggingFace token" in said and "--any_token" in said

    allowed = participant.spawn("--skip_input", "--token", "abc-local-token", "--any_token", "--host_port", str(free_port()), "--preflight_only")
    allowed.expect("All checks passed")
    allowed.expect(pexpect.EOF)
    assert participant.settings()["token"] == "abc-local-token"


def test_quit_in_the_summary_exits_0_and_saves_nothing(participant):
    child = participant.spawn()
    answer_first_run(child, free_port())
    child.expect("Start with these settings")
    child.send("8")  # shortcut of the last entry: Quit without saving
    child.send("\r")
    child.expect("Quit; nothing was saved.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert not (participant.home / ".agora" / "settings_gpu0.json").exists()


def test_skip_input_takes_the_token_from_the_environment_or_stdin_and_says_what_it_saved(participant):
    port = str(free_port())
    env = dict(participant.env(), AGORA_TOKEN=TOKEN)
    from_env = subprocess.run([sys.executable, str(REPO / "agora_cli.py"), "--run_json", str(participant.run_json), "--skip_input",
                               "--host_port", port, "--preflight_only"], cwd=participant.workdir, env=env,
                              capture_output=True, text=True, timeout=120)
    said = from_env.stdout + from_env.stderr
    assert from_env.returncode == 0, said
    saved_line = [line for line in said.splitlines() if line.startswith("[SETUP] Settings saved to ")]
    assert saved_line and "HuggingFace token hf_…wxyz" in saved_line[0] and f"Host port {port}" in saved_line[0], said
    assert participant.settings()["token"] == TOKEN and TOKEN not in said

    other = hf_token("qrst")
    from_stdin = subprocess.run([sys.executable, str(REPO / "agora_cli.py"), "--run_json", str(participant.run_json), "--skip_input",
                                 "--token", "-", "--preflight_only"], cwd=participant.workdir, env=participant.env(),
                                input=other + "\n", capture_output=True, text=True, timeout=120)
    assert from_stdin.returncode == 0, from_stdin.stdout + from_stdin.stderr
    assert participant.settings()["token"] == other and other not in from_stdin.stdout + from_stdin.stderr


def test_a_stop_from_another_terminal_is_reported_as_the_participants(participant, silent_coordinator):
    write_run_json(participant.run_json, silent_coordinator)
    child = participant.spawn("--skip_input", "--token", TOKEN, "--host_port", str(free_port()))
    child.expect(r"Started the worker on GPU 0 \(pid (\d+)\)")
    child.expect(r"\[AUTH\] Joining the run")
    stop = subprocess.run([sys.executable, str(REPO / "agora_cli.py"), "stop"], env=participant.env(),
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and "GPU 0 (native): stopped" in stop.stdout, stop.stdout + stop.stderr
    child.expect(r"Worker stopped \(asked by agora_cli.py stop\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Server exited" not in participant.transcript(child)
    assert " stopped (agora_cli.py stop) " in status_line(participant)
