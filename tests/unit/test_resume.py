"""Which state a worker starts from (its own checkpoint, else the stage's state from elsewhere, else
the seed's weights) and how its saves treat the files it started from."""

import pytest

from agora_server.server.checkpoint import CheckpointError, load_checkpoint, previous_path, save_checkpoint
from agora_server.server.resume import OwnCheckpoint
from agora_server.telemetry.events import CheckpointFailed


def own_checkpoint(path, initial_state=None):
    events = []
    return OwnCheckpoint(path, initial_state, "body1", events.append), events


def test_without_any_state_the_worker_starts_from_the_seed(tmp_path):
    checkpoint, _ = own_checkpoint(tmp_path / "peer.pt", tmp_path / "missing.pt")
    assert checkpoint.start is None
    assert checkpoint.start_epoch == 0 and checkpoint.online_seconds_before == 0.0


def test_its_own_checkpoint_wins_over_the_stages_state_from_elsewhere(tmp_path):
    path, shared = tmp_path / "peer.pt", tmp_path / "download.pt"
    save_checkpoint(path, {"model": {}, "optimizer": {}, "epoch": 7, "online_seconds": 90.0})
    save_checkpoint(shared, {"model": {}, "optimizer": {}, "epoch": 12})
    checkpoint, _ = own_checkpoint(path, shared)
    assert checkpoint.start.path == path
    assert checkpoint.start_epoch == 7 and checkpoint.online_seconds_before == 90.0


def test_a_state_from_elsewhere_gives_the_stage_never_another_identitys_counters(tmp_path):
    path, shared = tmp_path / "peer.pt", tmp_path / "download.pt"
    save_checkpoint(shared, {"model": {"w": 1}, "optimizer": {"o": 2}, "epoch": 12, "online_seconds": 500.0, "counters": {"samples": 9}})
    checkpoint, _ = own_checkpoint(path, shared)
    assert checkpoint.start.path == shared
    assert checkpoint.start.state == {"model": {"w": 1}, "optimizer": {"o": 2}, "epoch": 12}
    assert checkpoint.online_seconds_before == 0.0
    assert checkpoint.save({"model": {}, "epoch": 13})
    assert not shared.exists()  # superseded by the worker's own first checkpoint: the disk budget


def test_a_failed_save_is_reported_not_raised_and_the_next_one_keeps_the_good_file(tmp_path):
    path = tmp_path / "peer.pt"
    save_checkpoint(path, {"model": {}, "epoch": 3})
    checkpoint, events = own_checkpoint(path)
    path.with_suffix(".tmp").mkdir()  # the write target cannot be created
    assert not checkpoint.save({"model": {}, "epoch": 4}, next_try=6)
    (failed,) = events
    assert isinstance(failed, CheckpointFailed) and failed.stage == "body1"
    assert failed.reason.endswith("; training goes on and the next checkpoint is tried at step 6")
    path.with_suffix(".tmp").rmdir()
    assert checkpoint.save({"model": {}, "epoch": 6})
    assert load_checkpoint(path)["epoch"] == 6 and load_checkpoint(previous_path(path))["epoch"] == 3


def test_a_worker_resumed_from_the_previous_file_overwrites_the_unreadable_newest_one(tmp_path):
    path = tmp_path / "peer.pt"
    save_checkpoint(path, {"model": {}, "epoch": 3})
    save_checkpoint(path, {"model": {}, "epoch": 4})
    path.write_bytes(b"torn")
    checkpoint, _ = own_checkpoint(path)
    assert checkpoint.start.path == previous_path(path) and checkpoint.start_epoch == 3
    assert checkpoint.save({"model": {}, "epoch": 5})
    # the good .prev it resumed from is still there, not pushed out by the torn file
    assert load_checkpoint(previous_path(path))["epoch"] == 3 and load_checkpoint(path)["epoch"] == 5


def test_files_that_exist_and_cannot_be_read_stop_the_worker(tmp_path):
    path = tmp_path / "peer.pt"
    path.write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="No checkpoint of this worker can be read"):
        own_checkpoint(path)
