"""Saved settings: modes, masking, a corrupt file (clear error, nothing lost), status facts from a log."""

from __future__ import annotations

import stat

import pytest

from agora.cli import instances, settings
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


def test_status_reads_stage_and_contribution_from_either_log_form(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("[SERVER] Serving stage body1 as QmX\n[PROGRESS] Your contribution: 12 samples\n[PROGRESS] Your contribution: 40 samples\n")
    assert instances.read_log_facts(console) == instances.LogFacts("body1", 40)
    records = tmp_path / "file.log"
    records.write_text(
        "2026-01-01 INFO agora.events: ServerStarted stage='tail' peer_id='Qm' maddrs=()\n"
        "2026-01-01 INFO agora.events: ProgressReport stage='tail' window_seconds=10.0 forward_batches=1 backward_batches=1 total_samples=4 contribution_samples=7\n"
    )
    assert instances.read_log_facts(records) == instances.LogFacts("tail", 7)
    assert instances.read_log_facts(tmp_path / "missing.log") == instances.LogFacts(None, None)
