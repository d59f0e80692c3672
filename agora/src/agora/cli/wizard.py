"""Turns flags, saved settings and (unless --skip_input) answers to questions into one Settings.

Answers are checked after they are entered and a problem is printed on the line under the question,
which is then asked again (prompt_toolkit's own validation draws it at the bottom of the terminal,
far from the prompt). The token, email and Docker/native choice are the participant's, not the
GPU's: a GPU without saved settings starts from another GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import sys
from typing import Callable

import questionary

from agora.cli import settings as store
from agora.cli import troubleshooting as known
from agora.ports import parse_port, port_is_free
from agora.cli.settings import Settings, SettingsError
from agora.peer_options import TOKEN_ENV, default_port

# Settings fields a flag of the same name can set directly.
FLAG_FIELDS = ("token", "email", "host_port", "announce_port", "log_file", "identity_path", "batch_size_override")
READ_STDIN = "-"
"""``--token -``: read the token from standard input (hidden when it is a terminal), never from the command line."""


class SetupCancelled(RuntimeError):
    """The participant left the wizard; nothing was saved. ``exit_code``: 0 for Quit in the summary
    (a choice, not a failure), 130 for Ctrl+C."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class MissingValues(SettingsError):
    """--skip_input without everything it needs; the message names every missing value."""


class UnusualToken(SettingsError):
    """A token given by flag, environment or stdin that does not look like a HuggingFace token."""


def choose_gpu_id(args: argparse.Namespace) -> int:
    """--gpu_id if given; otherwise 0, or the only GPU with saved settings so a one-GPU user on GPU 3 just reruns."""
    if args.gpu_id is not None:
        return args.gpu_id
    saved = store.saved_gpu_ids()
    return saved[0] if len(saved) == 1 else 0


def given_token(args: argparse.Namespace) -> str | None:
    """The token of this invocation: ``--token`` (``-`` reads stdin), else the environment; None if neither."""
    if args.token == READ_STDIN:
        if sys.stdin.isatty():
            return getpass.getpass("HuggingFace token (input hidden): ").strip() or None
        return sys.stdin.readline().strip() or None
    return args.token or os.environ.get(TOKEN_ENV) or None


def from_flags(base: Settings, args: argparse.Namespace) -> tuple[Settings, set[str]]:
    """Flags (and a token from the environment or stdin) override saved values; returns the result and
    the names of the fields they set."""
    updates = {name: getattr(args, name) for name in FLAG_FIELDS if name != "token" and getattr(args, name) is not None}
    token = given_token(args)
    if token is not None:
        if not args.any_token and not store.looks_like_hf_token(token):
            raise UnusualToken(known.UNUSUAL_TOKEN.template)
        updates["token"] = token
    if args.use_docker:
        updates["use_docker"] = True
    return dataclasses.replace(base, **updates), set(updates)


def resolve(args: argparse.Namespace, say: Callable[[str], None] = print) -> Settings:
    """The settings to run with, saved for next time (interactive runs save after the summary)."""
    gpu_id = choose_gpu_id(args)
    saved = None
    try:
        saved = store.load(gpu_id)
    except SettingsError:
        if not args.reconfigure:
            raise  # the caller prints it, the file stays untouched
        bad = store.set_aside_unreadable(gpu_id)
        say(f"[SETUP] Kept the unreadable settings file as {bad}")
    start = saved or Settings(gpu_id=gpu_id)
    shared = store.shared_from_other_gpu(gpu_id) if saved is None else None
    if shared is not None:
        other, values = shared
        start = dataclasses.replace(start, **values)
        say(f"[SETUP] Reusing the token, email and Docker/native choice saved for GPU {other}.")
    current, given = from_flags(start, args)
    if args.gpu_id is not None:
        given.add("gpu_id")

    if args.skip_input:
        missing = missing_values(current)
        if missing:
            raise MissingValues(known.MISSING_VALUES.format(missing="; ".join(missing)))
        path = store.save(current)
        say(f"[SETUP] Settings saved to {path}: " + "; ".join(f"{label} {value}" for label, value in current.summary()))
        return current

    asker = Asker(say, any_token=args.any_token)
    if saved is None or args.reconfigure:
        if saved is None:
            say("[SETUP] Agora participant setup. Answers are saved in ~/.agora/ and reused next time.")
        else:
            say(f"[SETUP] Asking every setting again; Enter keeps the value saved in {store.settings_path(gpu_id)}.")
        # values reused from another GPU are not asked again (the summary can still change them)
        reused = set(store.SHARED_FIELDS) if shared is not None else set()
        current = asker.ask_all(current, skip=given | reused, keep_token=saved is not None)
    else:
        say(f"[SETUP] Using saved settings from {store.settings_path(gpu_id)}")
    current = asker.summary_menu(current)
    path = store.save(current)
    say(f"[SETUP] Settings saved to {path}")
    return current


def missing_values(s: Settings) -> list[str]:
    missing = []
    if not s.token:
        missing.append(f"--token (your HuggingFace token; or set {TOKEN_ENV}, or pass --token - to read it from stdin)")
    return missing


def _answer(question: questionary.Question):
    value = question.ask()  # None when the participant presses Ctrl+C
    if value is None:
        raise SetupCancelled("Setup cancelled; nothing was saved.", 130)
    return value


def _check_port(text: str, allow_taken: bool = False) -> str | None:
    try:
        port = parse_port(text)
    except ValueError as e:
        return str(e)
    if not allow_taken and not port_is_free(port):
        return known.PORT_IN_USE.format(port=port) + " Choose another port."
    return None


def _check_email(text: str) -> str | None:
    text = text.strip()
    return None if not text or ("@" in text and "." in text.split("@")[-1]) else "Enter an email address or leave it empty."


def _check_gpu(text: str) -> str | None:
    return None if text.strip().isdigit() else "Enter the GPU index (0 for the first GPU, as nvidia-smi lists them)."


def docker_engine_answers() -> bool:
    """Whether a Docker engine answers here (not merely whether the docker command is installed)."""
    from agora.cli.docker_launch import DockerLaunchError, docker_client

    try:
        docker_client(timeout=3)
    except DockerLaunchError:
        return False
    return True


class Asker:
    """The questions, each re-asked under its own problem until the answer is usable."""

    def __init__(self, say: Callable[[str], None], any_token: bool = False):
        self.say, self.any_token = say, any_token

    def _ask(self, make: Callable[[str], questionary.Question], default: str, check: Callable[[str], str | None]) -> str:
        while True:
            value = _answer(make(default))
            problem = check(value)
            if problem is None:
                return value
            self.say(f"  ! {problem}")  # right under the question it is about
            default = value  # what was typed stays there to be corrected

    def token(self, s: Settings, keep: bool = False) -> None:
        hint = f"Enter keeps {store.mask_token(s.token)}" if keep and s.token else "input hidden"

        def check(text: str) -> str | None:
            text = text.strip()
            if not text:
                return None if keep and s.token else "A HuggingFace token is needed (create one at huggingface.co/settings/tokens, no permissions needed)."
            if any(c.isspace() for c in text):
                return "A token has no spaces; paste it again."
            if not self.any_token and not store.looks_like_hf_token(text):
                return f"{known.UNUSUAL_TOKEN.template} {known.UNUSUAL_TOKEN.fix}"
            return None

        value = self._ask(lambda _: questionary.password(f"HuggingFace token ({hint}):"), "", check).strip()
        s.token = value or s.token

    def email(self, s: Settings) -> None:
        value = self._ask(lambda d: questionary.text("Email (optional, Enter to skip):", default=d), s.email or "", _check_email)
        s.email = value.strip() or None

    def mode(self, s: Settings, prefer_saved: bool = False) -> None:
        docker, native = "Docker (recommended)", "Native (this machine's Python)"
        # Docker is the recommended way, but only a sensible default where an engine answers
        default = docker if (s.use_docker if prefer_saved else (s.use_docker or docker_engine_answers())) else native
        s.use_docker = _answer(questionary.select("Run the worker with:", choices=[docker, native], default=default)) == docker

    def gpu(self, s: Settings) -> None:
        s.gpu_id = int(self._ask(lambda d: questionary.text("GPU id:", default=d), str(s.gpu_id), _check_gpu))

    def host_port(self, s: Settings) -> None:
        default = default_port(s.gpu_id)
        port = parse_port(self._ask(lambda d: questionary.text(f"Host port (default {default}):", default=d), str(s.port), _check_port))
        s.host_port = None if port == default else port

    def announce_port(self, s: Settings) -> None:
        question = "Announce port (the external port, if a port mapping differs from the host port):"
        port = parse_port(self._ask(lambda d: questionary.text(question, default=d), str(s.public_port),
                                    lambda text: _check_port(text, allow_taken=True)))
        s.announce_port = None if port == s.port else port

    def ask_all(self, s: Settings, skip: set[str], keep_token: bool = False) -> Settings:
        s = dataclasses.replace(s)
        questions: dict[str, Callable[[Settings], None]] = {
            "token": lambda x: self.token(x, keep=keep_token),
            "email": self.email,
            "use_docker": lambda x: self.mode(x, prefer_saved=keep_token),
            "gpu_id": self.gpu,
            "host_port": self.host_port,
            "announce_port": self.announce_port,
        }
        for name, ask in questions.items():
            if name not in skip:
                ask(s)
        return s

    def summary_menu(self, s: Settings) -> Settings:
        s = dataclasses.replace(s)
        start = "Start"
        changes = {
            "Change HuggingFace token": lambda x: self.token(x, keep=True),
            "Change email": self.email,
            "Change Docker / native": lambda x: self.mode(x, prefer_saved=True),
            "Change GPU id": self.gpu,
            "Change host port": self.host_port,
            "Change announce port": self.announce_port,
        }
        quit_ = "Quit without saving"
        while True:
            self.say("")
            self.say("Settings:")
            for label, value in s.summary():
                self.say(f"  {label:<18} {value}")
            self.say("")
            choice = _answer(questionary.select("Start with these settings?", choices=[start, *changes, quit_], default=start, use_shortcuts=True))
            if choice == start:
                return s
            if choice == quit_:
                raise SetupCancelled("Quit; nothing was saved.", 0)
            changes[choice](s)
