"""The peer flags are defined once (agora.peer_options): every entry point takes the shared ones with the
same help and default, and the command lines launchers build parse back to the options they came from,
with the token in the environment only."""

from __future__ import annotations

import dataclasses
import importlib
import io

import pytest

from agora import peer_options as po
from agora.cli.run_file import REPO, RunFile
from agora.cli.settings import Settings
from agora.cli.worker_command import worker_options
from agora.config import load_run_config
from agora.local_swarm import LocalSwarm

SEED = "/ip4/1.2.3.4/tcp/31337/p2p/QmSeed"
TOKEN = "hf_optionstoken1234abcdEFGH5678ijklMN"
SHARED = (po.CONFIG, po.INITIAL_PEERS, po.HOST_MADDRS, po.ANNOUNCE_MADDRS, po.IDENTITY_PATH, po.LOG_FILE,
          po.AUTH_SERVER, po.TOKEN, po.PROM_GATEWAY)
ENTRY_POINTS = {
    # module: (the least command line it takes, the shared flags it takes, its own defaults where they differ from the flag's)
    "agora.run_server": (["--config", "local-tiny"], {f.name for f in SHARED}, {}),
    "agora.run_seed": (["--identity_path", "seed.key"], {"config", "initial_peers", "host_maddrs", "announce_maddrs", "identity_path", "log_file"},
                       {"host_maddrs": po.LOOPBACK_MADDRS}),
    "agora.trainer.__main__": (["--config", "local-tiny", "--initial_peers", SEED], {f.name for f in SHARED} - {"announce_maddrs"},
                               {"host_maddrs": po.LOOPBACK_MADDRS, "identity_path": po.TRAINER_IDENTITY}),
}


def given(flag: po.Flag) -> tuple[list[str], object]:
    """A command-line value for the flag, and what it parses to."""
    return ([SEED, "/ip4/5.6.7.8/tcp/1/p2p/QmOther"], (SEED, "/ip4/5.6.7.8/tcp/1/p2p/QmOther")) if flag.nargs else (["given"], "given")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_takes_the_shared_flags_with_one_help_and_one_default(module, monkeypatch, capsys):
    monkeypatch.delenv(po.TOKEN_ENV, raising=False)
    parse_args = importlib.import_module(module).parse_args
    least, takes, own_defaults = ENTRY_POINTS[module]
    options = parse_args(least)
    assert {f.name for f in dataclasses.fields(options)} & {f.name for f in SHARED} == takes
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag in (f for f in SHARED if f.name in takes):
        assert flag.help in shown, (module, flag.name)
        if f"--{flag.name}" not in least:
            assert getattr(options, flag.name) == own_defaults.get(flag.name, flag.default), (module, flag.name)
        text, value = given(flag)
        # given twice, the last one counts: the value comes through whether or not the least line has the flag
        assert getattr(parse_args([*least, f"--{flag.name}", *text]), flag.name) == value, (module, flag.name)


def test_the_cli_and_the_worker_share_the_defaults_of_port_log_and_key():
    for gpu_id in (0, 3):
        s, worker = Settings(gpu_id=gpu_id), po.WorkerOptions(config="local-tiny", gpu_id=gpu_id)
        assert worker.listen_maddrs == [f"/ip4/0.0.0.0/tcp/{s.port}"] and s.port == 49200 + gpu_id
        assert worker.log_path == s.log_path == f"logs/server_gpu{gpu_id}.log"
        assert worker.key_path == s.key_path == f"private_gpu{gpu_id}.key"


def parses_back(options: po.PeerOptions, module: str, monkeypatch) -> po.PeerOptions:
    """What the role's entry point makes of the command line and environment a launcher gives it."""
    monkeypatch.delenv(po.TOKEN_ENV, raising=False)
    for name, value in options.to_env().items():
        monkeypatch.setenv(name, value)
    return importlib.import_module(module).parse_args(options.to_argv())


def test_the_participant_cli_worker_command_parses_back_to_its_options_without_the_token_in_it(monkeypatch):
    run = RunFile("agora/src/agora/configs/llama-8b.yaml", "https://auth.example", "gw.example:9091", (SEED,), REPO / "run.json")
    s = Settings(gpu_id=2, token=TOKEN, email="me@example.org", host_port=40000, announce_port=41000)
    options = worker_options(s, run, run.run_config, batch_size=2, config_max_batch=4, public_ip="203.0.113.7")
    assert options.batch_size_override == 2 and options.announce_maddrs == ("/ip4/203.0.113.7/tcp/41000",)
    assert TOKEN not in " ".join(options.to_argv()) and options.to_env() == {po.TOKEN_ENV: TOKEN}
    assert TOKEN not in repr(options), "options get printed; the token must not be"
    assert parses_back(options, "agora.run_server", monkeypatch) == options


@pytest.mark.parametrize("coordinator", [False, True])
def test_the_local_swarm_command_lines_parse_back_to_their_options(coordinator, tmp_path, monkeypatch):
    with LocalSwarm("local-tiny", load_run_config("local-tiny"), log_dir=tmp_path, output=io.StringIO(), prom_gateway="127.0.0.1:9091",
                    coordinator=coordinator) as swarm:
        swarm.seed_maddrs = [SEED]
        if coordinator:
            swarm.coordinator_url, swarm._token = "http://127.0.0.1:1", TOKEN
            # a base64url key starts with "-" one time in 64: argparse must not take it for a flag
            swarm.coordinator_public_key = "-G_yhUSQjOKpMnFn"
        worker = swarm.worker_options("body1", 1)
        assert (worker.stage, worker.auth_server) == ((None, "http://127.0.0.1:1") if coordinator else ("body1", None))
        for options, module in ((worker, "agora.run_server"), (swarm._trainer_options(), "agora.trainer.__main__")):
            assert TOKEN not in " ".join(options.to_argv())
            assert parses_back(options, module, monkeypatch) == options
        if coordinator:
            seed = po.SeedOptions(identity_path="seed.key", coordinator_public_key=swarm.coordinator_public_key, config="local-tiny")
            assert parses_back(seed, "agora.run_seed", monkeypatch) == seed


def test_contradicting_options_are_refused_when_built_and_when_parsed(capsys):
    from agora.run_server import parse_args

    with pytest.raises(po.OptionsError, match="--stage is for runs without a coordinator"):
        po.WorkerOptions(config="local-tiny", auth_server="http://127.0.0.1:1", stage="head")
    with pytest.raises(po.OptionsError, match="--rank is for runs without a coordinator"):
        po.TrainerOptions(config="local-tiny", initial_peers=(SEED,), auth_server="http://127.0.0.1:1", rank=1)
    with pytest.raises(po.OptionsError, match="--rank must be 0 or more"):
        po.TrainerOptions(config="local-tiny", initial_peers=(SEED,), rank=-1)
    with pytest.raises(SystemExit):
        parse_args(["--config", "local-tiny", "--batch_size_override", "0"])
    assert "--batch_size_override must be at least 1" in capsys.readouterr().err
