"""Saved settings: modes, masking, a corrupt file (clear error, nothing lost), status facts from a log."""

from __future__ import annotations

import stat

import pytest

from agora.cli import settings
from agora.cli.settings import Settings, SettingsError


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_saved_with_private_modes_and_read_back(home):
    path = settings.save(Settings(gpu_id=2, token="hf_secretsecret9876", host_port=50000))
    assert path == home / ".agora" / "settings_gpu2.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = settings.load(2)
    assert loaded.token == "hf_secretsecret9876" and loaded.port == 50000 and loaded.public_port == 50000
    assert Settings(gpu_id=3).port == 49203 and Settings(gpu_id=3).log_path == "logs/server_gpu3.log" and Settings(gpu_id=3).key_path == "private_gpu3.key"


def test_token_is_masked():
    assert settings.mask_token("hf_abcdefghijklmnopWXYZ") == "hf_…WXYZ"
    assert settings.mask_token("short") == "…"
    assert settings.mask_token(None) == "(not set)"
    assert "abcdefgh" not in " ".join(v for _, v in Settings(token="hf_abcdefghijklmnopWXYZ").summary())


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"host_port": "abc"}', '{"colour": "blue"}'])
def test_corrupt_file_gives_a_clear_error_and_stays_untouched(home, content):
    path = home / ".agora" / "settings_gpu0.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(SettingsError, match=r"Saved settings .*settings_gpu0.json cannot be read"):
        settings.load(0)
    assert path.read_text() == content
    bad = settings.set_aside_unreadable(0)
    assert bad.read_text() == content and not path.exists()


def test_the_worker_status_file_follows_the_workers_events(tmp_path):
    from agora.worker.status import WorkerStatusWriter, read_status, status_path_for
    from agora_server.telemetry import events as ev

    path = status_path_for(tmp_path / "logs" / "server_gpu0.log")
    assert path == tmp_path / "logs" / "server_gpu0.status.json"
    writer = WorkerStatusWriter(path)
    assert read_status(path).state == "starting"
    steps = [
        (ev.JoiningRun(coordinator="http://c"), "joining"),
        (ev.AuthQueued(position=2, estimated_wait_seconds=60), "queued"),
        (ev.DownloadProgress(bytes_done=0, bytes_total=None), "downloading"),
        (ev.AccessGranted(username="me", stage="body1", expires_at=0, dashboard_url="http://c/?node=Qm"), "admitted"),
        (ev.ServerStarted(stage="body1", peer_id="Qm", maddrs=()), "training"),
        (ev.WarmupStarted(stage="body1", stage_epoch=5), "warming up"),
        (ev.WarmupComplete(stage="body1", epoch=5, requests_served=0, timed_out=False), "training"),
    ]
    for event, state in steps:
        writer(event)
        assert read_status(path).state == state, event
    writer(ev.ProgressReport(stage="body1", window_seconds=60, forward_batches=1, backward_batches=1, total_samples=8, contribution_samples=40))
    writer(ev.ProcessError(tag="AUTH", message="Could not reach the coordinator"))
    final = read_status(path)
    assert (final.stage, final.contribution_samples, final.dashboard_url) == ("body1", 40, "http://c/?node=Qm")
    assert (final.state, final.message) == ("failed", "Could not reach the coordinator")
    assert read_status(tmp_path / "missing.json") is None


def test_token_shape_and_the_values_shared_between_gpus(home):
    assert settings.looks_like_hf_token("hf_" + "a1B2" * 8 + "c3")
    for bad in ("abc", "hf_short", "hf_" + "a" * 33 + "!", " hf_" + "a" * 34, "api_" + "a" * 34):
        assert not settings.looks_like_hf_token(bad), bad
    assert settings.shared_from_other_gpu(1) is None
    settings.save(Settings(gpu_id=0, token="hf_x", email="me@example.org", use_docker=True, host_port=50000))
    assert settings.shared_from_other_gpu(1) == (0, {"token": "hf_x", "email": "me@example.org", "use_docker": True})
    assert settings.shared_from_other_gpu(0) is None, "a GPU does not share with itself"
