"""Periodic checkpoints are written off the compute thread: it takes a snapshot and goes on serving while
the file is written, one write at a time, and a crash mid-write leaves the previous checkpoint as it was."""

import io
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from agora_server.server.checkpoint import FILES_AT_ONCE, load_checkpoint, previous_path, read_checkpoint
from agora_server.server.checkpoint_writer import CheckpointWriter
from agora_server.server.resume import OwnCheckpoint
from agora_server.telemetry.events import CheckpointFailed, CheckpointSkipped
from tests.unit.test_checkpoint import backend, train

REPO = Path(__file__).resolve().parents[2]


def test_the_compute_thread_keeps_serving_while_a_slow_write_is_in_progress(tmp_path):
    path = tmp_path / "run" / "head" / "peer.pt"
    events = []
    own = OwnCheckpoint(path, None, "head", events.append)
    stage = backend()
    train(stage, 1)
    assert own.save(stage.state_dict())
    train(stage, 1)
    # a named pipe where the checkpoint is written: the write stalls until this test reads it, as on a
    # disk far slower than training
    tmp = path.with_suffix(".tmp")
    os.mkfifo(tmp)
    writer = CheckpointWriter(own, "head", events.append)
    compute = ThreadPoolExecutor(max_workers=1)
    written = []
    try:
        started = compute.submit(writer.start, stage.state_dict, epoch=2, next_try=4, then=lambda: written.append(2))
        assert started.result(30)
        at_snapshot = {name: w.clone() for name, w in stage.weights.named_masters}

        compute.submit(train, stage, 3).result(60)  # forward, backward and optimizer steps, the write still stalled
        assert writer.writing and stage.progress.epoch == 5
        assert any(not torch.equal(at_snapshot[name], w) for name, w in stage.weights.named_masters)
        assert not compute.submit(writer.start, stage.state_dict, epoch=5, next_try=7).result(30)
        (skipped,) = [e for e in events if isinstance(e, CheckpointSkipped)]
        assert (skipped.stage, skipped.epoch, skipped.next_try) == ("head", 5, 7)
    finally:
        with open(tmp, "rb") as stalled:  # let the write through (on failure too: the writing thread must end)
            data = stalled.read()
        compute.shutdown()
    assert writer.wait(60)

    snapshot = torch.load(io.BytesIO(data), weights_only=True)
    assert snapshot["epoch"] == 2, "the state of when the checkpoint fell due, not of when it was written"
    assert all(torch.equal(snapshot["model"][name], at_snapshot[name]) for name in at_snapshot)
    # a named pipe cannot be synced to disk: this write fails, and fails cleanly
    (failed,) = [e for e in events if isinstance(e, CheckpointFailed)]
    assert "previous one is kept" in failed.reason and written == []
    assert load_checkpoint(path)["epoch"] == 1

    tmp.unlink()
    assert writer.start(stage.state_dict, epoch=5, next_try=7, then=lambda: written.append(5)) and writer.wait(60)
    assert written == [5] and load_checkpoint(path)["epoch"] == 5 and load_checkpoint(previous_path(path))["epoch"] == 1


CRASHING_WRITE = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import torch
    from agora_server.server.checkpoint_writer import CheckpointWriter
    from agora_server.server.resume import OwnCheckpoint

    own = OwnCheckpoint(Path(sys.argv[1]), None, "head", print)
    assert own.save({"model": {"w": torch.full((1000,), 1.0)}, "optimizer": {}, "epoch": 1})
    # the process dies (SIGXFSZ) the moment the checkpoint file grows past 1 MiB: a crash mid-write
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    writer = CheckpointWriter(own, "head", print)
    writer.start(lambda: {"model": {"w": torch.full((2**20,), 2.0)}, "optimizer": {}, "epoch": 2}, epoch=2, next_try=3)
    writer.wait()
    print("the write was not interrupted")
""")


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "run" / "head" / "peer.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "agora" / "src"), str(REPO / "agora_server" / "src")])}
    done = subprocess.run([sys.executable, "-c", CRASHING_WRITE, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGXFSZ, done.stdout + done.stderr
    assert 0 < path.with_suffix(".tmp").stat().st_size <= 2**20, "it died with a partial file written"

    loaded = read_checkpoint(path)
    assert loaded.path == path and loaded.unreadable == () and loaded.state["epoch"] == 1
    assert torch.equal(loaded.state["model"]["w"], torch.full((1000,), 1.0))

    restarted = OwnCheckpoint(path, None, "head", print)  # the next write replaces the partial file
    assert restarted.start.state["epoch"] == 1
    assert restarted.save({"model": {"w": torch.full((1000,), 3.0)}, "optimizer": {}, "epoch": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["peer.prev", "peer.pt"] and FILES_AT_ONCE == 3
    assert load_checkpoint(path)["epoch"] == 3



def test_a_skipped_checkpoint_and_a_continued_upload_read_clearly():
    from agora_server.telemetry import events as ev
    from agora_server.telemetry.console import console_lines

    (skipped,) = console_lines(ev.CheckpointSkipped(stage="tail", epoch=40, next_try=50))
    assert skipped.startswith("[SERVER] Checkpoint at step 40 skipped: the previous one is still being written")
    assert skipped.endswith("the next is tried at step 50")
    # the rate counts only what this request sent, not the bytes the coordinator already held
    (line,) = console_lines(ev.CheckpointUploadProgress(stage="tail", epoch=40, sent_bytes=12_000_000_000,
                                                         total_bytes=24_000_000_000, seconds=100.0, resumed_at=10_000_000_000))
    assert "50% of 24,000 MB, 20.0 MB/s, 600s left" in line
