"""The convergence benchmark's emulation of the swarm is only worth its many seeds if its dynamics are
right: with nothing in flight but one micro-batch and gradients averaged, it must be synchronous
training exactly; with micro-batches in flight and workers stepping alone, it must not be."""

from __future__ import annotations

import sys

import pytest

from tests.cli.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
convergence = pytest.importorskip("convergence")
swarm_emulation = pytest.importorskip("swarm_emulation")


@pytest.fixture(scope="module")
def setting():
    from agora_server.data import PackedBatches, validation_batches

    args = convergence.parse_args(["--steps", "24", "--target-batch", "8"])
    config = convergence.run_config(args, {"name": "adamw"}, 0, "emulation-test")
    batches = [b for _, b in zip(range(args.steps), PackedBatches(config.data, convergence.MICRO_BATCH))]
    return config, batches, validation_batches(config.data, convergence.MICRO_BATCH, 2)


def emulate(setting, **swarm):
    config, batches, val = setting
    return swarm_emulation.emulate(config, swarm_emulation.EmulatedSwarm(**swarm), batches, val, convergence.evaluate)


def test_one_micro_batch_in_flight_with_averaged_gradients_is_synchronous_training(setting):
    config, batches, val = setting
    sync = convergence.train_sync(config, batches, val, eval_every=100)
    emulated = emulate(setting, in_flight=1, gradient_averaging_epochs=100)
    assert emulated["final_val_loss"] == sync["final_val_loss"]
    assert emulated["optimizer_steps"] == [sync["epochs"]] * 2


def test_micro_batches_in_flight_and_workers_stepping_alone_change_the_result(setting):
    config, batches, val = setting
    sync = convergence.train_sync(config, batches, val, eval_every=100)
    emulated = emulate(setting, in_flight=4, gradient_averaging_epochs=0, average_every=2)
    assert emulated["final_val_loss"] != sync["final_val_loss"]
    assert emulated["epochs"] == [sync["epochs"]] * 2, "every stage steps once per target batch"
