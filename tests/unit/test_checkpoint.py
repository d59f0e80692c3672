import torch

from agora_server.models import BoundaryConfig, ModelConfig, PipelineStage, build_boundary_codec, split_into_stages
from agora_server.optim import OptimizerConfig
from agora_server.server import ServerConfig, StageBackend
from agora_server.server.checkpoint import FILES_AT_ONCE, CheckpointError, load_checkpoint, save_checkpoint
from agora_server.server.memory_plan import checkpoint_bytes

import pytest

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=48, max_seq_len=16)


def backend(name="nesterov"):
    spec = split_into_stages(2, [1, 1])[0]
    stage = PipelineStage(CONFIG, spec, build_boundary_codec(BoundaryConfig(), CONFIG, 0), 0)
    server = ServerConfig(target_batch_size=2, optimizer=OptimizerConfig(name=name, betas=(0.99, 0.999)))
    return StageBackend(stage, server, torch.device("cpu"))


def train(b, steps):
    for i in range(steps):
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(i))
        b.backward({"tokens": tokens, "grad": torch.randn(2, 8, CONFIG.hidden_size, generator=torch.Generator().manual_seed(i))})


def test_backend_state_round_trips_through_a_checkpoint(tmp_path):
    original = backend()
    train(original, 4)
    path = tmp_path / "run" / "head" / "peer.pt"
    save_checkpoint(path, original.state_dict())

    restored = backend()
    state = load_checkpoint(path)
    restored.load_state_dict(state)
    assert state["epoch"] == 4 and restored.snapshot().samples == 8
    for a, b in zip(original.stage.parameters(), restored.stage.parameters()):
        assert torch.equal(a, b)
    train(original, 1)
    train(restored, 1)  # optimizer moments came back too: the next step is identical
    for a, b in zip(original.stage.parameters(), restored.stage.parameters()):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {}, "epoch": 1})
    save_checkpoint(path, {"model": {}, "epoch": 2})
    path.write_bytes(b"\x00garbage")
    assert load_checkpoint(path)["epoch"] == 1
    path.with_suffix(".prev").write_bytes(b"also garbage")
    with pytest.raises(CheckpointError, match="Delete these files"):
        load_checkpoint(path)


def test_missing_checkpoint_means_a_fresh_start(tmp_path):
    assert load_checkpoint(tmp_path / "none.pt") is None


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {}, "epoch": 1})
    path.with_suffix(".tmp").mkdir()  # the write target cannot be created: the save must fail cleanly
    with pytest.raises(CheckpointError, match="previous one is kept"):
        save_checkpoint(path, {"model": {}, "epoch": 2})
    assert load_checkpoint(path)["epoch"] == 1


def test_a_worker_keeps_at_most_its_budget_of_checkpoint_files_and_drops_the_download_once_it_has_its_own(tmp_path):
    path = tmp_path / "run" / "head" / "peer.pt"
    downloaded = path.with_name("from-coordinator.pt")
    save_checkpoint(downloaded, {"model": {}, "epoch": 1})
    path.with_suffix(".tmp").mkdir(parents=True)  # the first own write fails: the download stays
    with pytest.raises(CheckpointError):
        save_checkpoint(path, {"model": {}, "epoch": 2}, superseded=(downloaded,))
    assert downloaded.exists()
    path.with_suffix(".tmp").rmdir()
    save_checkpoint(path, {"model": {}, "epoch": 2}, superseded=(downloaded,))
    assert not downloaded.exists()
    for epoch in range(3, 7):
        save_checkpoint(path, {"model": {}, "epoch": epoch})
        assert sorted(p.name for p in path.parent.iterdir()) == ["peer.prev", "peer.pt"]
    assert load_checkpoint(path)["epoch"] == 6 and load_checkpoint(path.with_suffix(".prev"))["epoch"] == 5
    assert FILES_AT_ONCE == 3  # the two kept and the one being written: what the preflight's disk figure counts


def test_a_checkpoints_size_is_what_the_disk_budget_counts(tmp_path):
    b = backend()
    train(b, 4)
    path = tmp_path / "c.pt"
    save_checkpoint(path, b.state_dict())
    params = sum(p.numel() for p in b.stage.parameters())
    assert checkpoint_bytes(params) <= path.stat().st_size <= checkpoint_bytes(params) * 1.1 + 64 * 1024
