"""Turns flags, saved settings and (unless --skip_input) answers to questions into one Settings."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from typing import Callable

import questionary

from agora.cli import settings as store
from agora.cli import troubleshooting as known
from agora.ports import parse_port, port_is_free
from agora.cli.settings import Settings, SettingsError

# Settings fields a flag of the same name can set directly.
FLAG_FIELDS = ("token", "email", "host_port", "announce_port", "log_file", "identity_path", "batch_size_override")


class SetupCancelled(RuntimeError):
    """The participant left the wizard (Ctrl+C, or Quit in the summary); nothing was saved."""


class MissingValues(SettingsError):
    """--skip_input without everything it needs; the message names every missing value."""


def choose_gpu_id(args: argparse.Namespace) -> int:
    """--gpu_id if given; otherwise 0, or the only GPU with saved settings so a one-GPU user on GPU 3 just reruns."""
    if args.gpu_id is not None:
        return args.gpu_id
    saved = store.saved_gpu_ids()
    return saved[0] if len(saved) == 1 else 0


def from_flags(base: Settings, args: argparse.Namespace) -> tuple[Settings, set[str]]:
    """Flags override saved values; returns the result and the names of the fields the flags set."""
    given = {name for name in FLAG_FIELDS if getattr(args, name) is not None}
    updates = {name: getattr(args, name) for name in given}
    if args.use_docker:
        updates["use_docker"] = True
        given.add("use_docker")
    return dataclasses.replace(base, **updates), given


def resolve(args: argparse.Namespace, say: Callable[[str], None] = print) -> Settings:
    """The settings to run with, saved for next time (interactive runs save after the summary)."""
    gpu_id = choose_gpu_id(args)
    saved = None
    if args.reconfigure:
        try:
            store.load(gpu_id)
        except SettingsError:
            bad = store.set_aside_unreadable(gpu_id)
            say(f"[SETUP] Kept the unreadable settings file as {bad}")
    else:
        saved = store.load(gpu_id)  # SettingsError: the caller prints it, the file stays untouched
    current, given = from_flags(saved or Settings(gpu_id=gpu_id), args)
    if args.gpu_id is not None:
        given.add("gpu_id")

    if args.skip_input:
        missing = missing_values(current)
        if missing:
            raise MissingValues(known.MISSING_VALUES.format(missing="; ".join(missing)))
        store.save(current)
        return current

    if saved is None:
        say("[SETUP] Agora participant setup. Answers are saved in ~/.agora/ and reused next time.")
        current = ask_all(current, skip=given)
    else:
        say(f"[SETUP] Using saved settings from {store.settings_path(gpu_id)}")
    current = summary_menu(current, say)
    path = store.save(current)
    say(f"[SETUP] Settings saved to {path}")
    return current


def missing_values(s: Settings) -> list[str]:
    missing = []
    if not s.token:
        missing.append("--token (your HuggingFace token)")
    return missing


def _answer(question: questionary.Question):
    value = question.ask()  # None when the participant presses Ctrl+C
    if value is None:
        raise SetupCancelled("Setup cancelled; nothing was saved.")
    return value


def _port_validator(allow_taken: bool = False) -> Callable[[str], bool | str]:
    def validate(text: str) -> bool | str:
        try:
            port = parse_port(text)
        except ValueError as e:
            return str(e)
        if not allow_taken and not port_is_free(port):
            return known.PORT_IN_USE.format(port=port) + " Choose another port."
        return True

    return validate


def _token_validator(text: str) -> bool | str:
    text = text.strip()
    if not text:
        return "A HuggingFace token is needed (create one at huggingface.co/settings/tokens, no permissions needed)."
    if any(c.isspace() for c in text):
        return "A token has no spaces; paste it again."
    return True


def _email_validator(text: str) -> bool | str:
    text = text.strip()
    return True if not text or ("@" in text and "." in text.split("@")[-1]) else "Enter an email address or leave it empty."


def ask_token(s: Settings) -> None:
    s.token = _answer(questionary.password("HuggingFace token (input hidden):", validate=_token_validator)).strip()


def ask_email(s: Settings) -> None:
    s.email = _answer(questionary.text("Email (optional, Enter to skip):", default=s.email or "", validate=_email_validator)).strip() or None


def ask_mode(s: Settings) -> None:
    docker, native = "Docker (recommended)", "Native (this machine's Python)"
    # Docker is the recommended way, but only a sensible default where Docker is installed
    default = docker if s.use_docker or shutil.which("docker") else native
    s.use_docker = _answer(questionary.select("Run the worker with:", choices=[docker, native], default=default)) == docker


def ask_gpu(s: Settings) -> None:
    def validate(text: str) -> bool | str:
        return True if text.strip().isdigit() else "Enter the GPU index (0 for the first GPU, as nvidia-smi lists them)."

    s.gpu_id = int(_answer(questionary.text("GPU id:", default=str(s.gpu_id), validate=validate)))


def ask_host_port(s: Settings) -> None:
    default = store.DEFAULT_PORT + s.gpu_id
    port = parse_port(_answer(questionary.text(f"Host port (default {default}):", default=str(s.port), validate=_port_validator())))
    s.host_port = None if port == default else port


def ask_announce_port(s: Settings) -> None:
    port = parse_port(
        _answer(
            questionary.text(
                "Announce port (the external port, if a port mapping differs from the host port):",
                default=str(s.public_port),
                validate=_port_validator(allow_taken=True),
            )
        )
    )
    s.announce_port = None if port == s.port else port


QUESTIONS: dict[str, Callable[[Settings], None]] = {
    "token": ask_token,
    "email": ask_email,
    "use_docker": ask_mode,
    "gpu_id": ask_gpu,
    "host_port": ask_host_port,
    "announce_port": ask_announce_port,
}


def ask_all(s: Settings, skip: set[str]) -> Settings:
    s = dataclasses.replace(s)
    for name, ask in QUESTIONS.items():
        if name not in skip:
            ask(s)
    return s


def summary_menu(s: Settings, say: Callable[[str], None]) -> Settings:
    s = dataclasses.replace(s)
    start = "Start"
    changes = {
        "Change HuggingFace token": ask_token,
        "Change email": ask_email,
        "Change Docker / native": ask_mode,
        "Change GPU id": ask_gpu,
        "Change host port": ask_host_port,
        "Change announce port": ask_announce_port,
    }
    quit_ = "Quit without saving"
    while True:
        say("")
        say("Settings:")
        for label, value in s.summary():
            say(f"  {label:<18} {value}")
        say("")
        choice = _answer(questionary.select("Start with these settings?", choices=[start, *changes, quit_], default=start, use_shortcuts=True))
        if choice == start:
            return s
        if choice == quit_:
            raise SetupCancelled("Quit; nothing was saved.")
        changes[choice](s)

