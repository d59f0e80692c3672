"""Storage faults against real worker processes: a disk that fills up while the worker checkpoints, and
checkpoint files that cannot be read at start. Each gives a clear message and keeps the last good state."""

import os
import signal
from pathlib import Path

import psutil
import torch

from agora_server.telemetry import events as ev
from tests.helpers.polling import wait_until
from tests.helpers.swarms import wait_for_worker_step

WORKER = "body1#0"
FAST_CHECKPOINTS = {"server": {"checkpoint_every": 2}}  # local-tiny epochs last about a second


def epoch_of(path: Path) -> int | None:
    """The epoch in exactly this file (no fallback to .prev); None while it is briefly missing or absent."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    except FileNotFoundError:
        return None


def wait_for_checkpoint(swarm, timeout: float) -> Path:
    directory = Path(swarm.config.server.checkpoint_dir) / swarm.config.run_name / "body1"
    found = wait_until(lambda: next(directory.glob("*.pt"), None), timeout)
    assert found, f"timed out after {timeout:.0f}s waiting for a first checkpoint in {directory}"
    return found


def wait_for_failure(swarm, text: str, timeout: float) -> str:
    """The reason of the first failed save whose reason says ``text``."""
    failed = swarm.wait_for(WORKER, ev.CheckpointFailed, lambda e: text in e.reason, timeout=timeout)
    assert failed, f"timed out after {timeout:.0f}s waiting for a failed save saying {text!r}"
    return failed.reason


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(swarm_harness):
    swarm = swarm_harness.create(FAST_CHECKPOINTS)
    swarm.start()
    path = wait_for_checkpoint(swarm, 240)
    tmp = path.with_suffix(".tmp")
    worker = psutil.Process(swarm.process(WORKER).popen.pid)  # the process that saves (its DHT runs in a child)
    limit = path.stat().st_size // 2
    log = swarm.log_dir / "server_body1_0.log"
    assert log.stat().st_size < limit // 2, "the limit must leave room for the worker's own log"
    original = worker.rlimit(psutil.RLIMIT_FSIZE)

    # a file size limit (Python ignores SIGXFSZ, so writes fail with EFBIG): needs no root, unlike a full tmpfs
    worker.rlimit(psutil.RLIMIT_FSIZE, (limit, original[1]))
    too_large = wait_for_failure(swarm, "larger than this process may write", 60)
    assert f"could not write checkpoint {path}" in too_large and f"the previous one is kept: {path}" in too_large
    assert "training goes on" in too_large
    kept = epoch_of(path)
    assert kept is not None and not tmp.exists(), "the partial file is removed and the good one still loads"

    # ENOSPC itself: the next write goes to /dev/full, which answers every write with "No space left on device"
    assert wait_until(lambda: _plant(tmp, "/dev/full"), 30), f"{tmp} never was free for the /dev/full link"
    full = wait_for_failure(swarm, "the disk is full", 60)
    assert f"the previous one is kept: {path}" in full and "server.checkpoint_dir" in full
    assert not tmp.is_symlink() and not tmp.exists() and epoch_of(path) == kept
    assert "training goes on and the next checkpoint is tried at step " in full
    stepped = swarm.events_of(WORKER, ev.OptimizerStepped)[-1].step
    assert wait_for_worker_step(swarm, WORKER, stepped + 2, 60), "the worker trains on after failed saves"
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE

    worker.rlimit(psutil.RLIMIT_FSIZE, original)  # space again: the next save succeeds and the old one becomes .prev
    assert wait_until(lambda: (epoch_of(path) or 0) > kept, 60), "no newer checkpoint once writes work again"
    assert epoch_of(path.with_suffix(".prev")) >= kept and not tmp.exists()


def _plant(tmp: Path, target: str) -> bool:
    try:
        tmp.symlink_to(target)  # fails while a (failing) save still has its partial file there
    except FileExistsError:
        return False
    return True


def stop_worker(swarm, process) -> None:
    os.kill(process.popen.pid, signal.SIGTERM)  # a clean stop: the worker checkpoints on the way out
    assert process.popen.wait(90) == 0
    process.pump.join(5)


def test_unreadable_checkpoints_fall_back_to_the_previous_one_or_stop_the_worker_untouched(swarm_harness):
    swarm = swarm_harness.create(FAST_CHECKPOINTS)
    swarm.start()
    path = wait_for_checkpoint(swarm, 240)
    previous = path.with_suffix(".prev")
    assert wait_until(previous.exists, 60), "no second periodic checkpoint"
    swarm.kill("trainer")  # training is done for this test; a trainer missing a stage takes a while to stop
    stop_worker(swarm, swarm.process(WORKER))
    previous_epoch = epoch_of(previous)

    # the newest file cut short (a crash mid-copy, a full disk on a file system without atomic rename)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    restarted = swarm.start_worker("body1", 0)  # same identity file, so the same checkpoint files
    loaded = swarm.wait_for(WORKER, ev.CheckpointLoaded, timeout=120, since=restarted.first_event)
    assert loaded and loaded.unreadable == (f"{path}: the file is damaged or incomplete",), loaded
    assert (loaded.stage, loaded.epoch, loaded.path) == ("body1", previous_epoch, str(previous))
    stop_worker(swarm, restarted)
    assert epoch_of(path) >= previous_epoch, "the stop's checkpoint replaced the unreadable file"
    assert epoch_of(previous) == previous_epoch, "and did not push the good previous one out"

    # neither file readable: the worker refuses to start rather than train from scratch over them
    path.write_bytes(b"not a checkpoint")
    previous.write_bytes(b"")
    before = {p: p.read_bytes() for p in (path, previous)}
    failed = swarm.start_worker("body1", 0)
    assert failed.popen.wait(120) == 1, "a worker with only unreadable checkpoints must not start"
    failed.pump.join(5)
    said = "\n".join(e.message for e in swarm.events_of(WORKER, ev.ProcessError, since=failed.first_event))
    assert "No checkpoint of this worker can be read" in said and "Delete these files to start this worker afresh" in said, said
    assert f"{path}: the file is damaged or incomplete" in said and f"{previous}: the file is empty" in said, said
    assert {p: p.read_bytes() for p in (path, previous)} == before, "the unreadable files are left as they were"
