"""The coordinator gives each trainer identity its own shard of the run's data: distinct shards for
distinct keys, the same shard for the same key after a restart (its own or the coordinator's), no
more trainers than the run config's trainer.data_shards, and a lapsed trainer's shard to a newcomer."""

from __future__ import annotations

import base64

import yaml

from tests.coordinator.conftest import RUN_CONFIG


def two_shard_run(tmp_path) -> str:
    run = yaml.safe_load(RUN_CONFIG.read_text())
    run["trainer"]["data_shards"] = 2
    path = tmp_path / "two-shard-run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def ask(coord, trainer):
    body = {"peer_id": trainer.peer_id, "public_key": base64.b64encode(trainer.identity.public_key_protobuf).decode()}
    return coord.http.put("/api/trainer_access", json=body, headers=trainer.auth)


def shard_of(coord, trainer) -> tuple[int, int]:
    answer = ask(coord, trainer)
    assert answer.status_code == 200, answer.text
    return answer.json()["data_shard"], answer.json()["data_shards"]


def test_trainers_get_distinct_shards_that_outlive_restarts_and_no_more_than_the_run_has(harness, tmp_path):
    settings = dict(operators=["bob"], run_config=two_shard_run(tmp_path))
    coord = harness.start(**settings)
    first, second, third = harness.node("bob"), harness.node("bob"), harness.node("bob")
    assert shard_of(coord, first) == (0, 2)
    assert shard_of(coord, second) == (1, 2)

    refused = ask(coord, third)
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith("All 2 data shards of this run are held by other trainers")
    assert "trainer.data_shards" in refused.json()["detail"], "the refusal says how to add a trainer"

    harness.clock.advance(600)
    assert shard_of(coord, first) == (0, 2), "a renewal keeps the shard"
    harness.stop_all()
    coord = harness.start(**settings)  # the same database: the shards are remembered
    assert shard_of(coord, second) == (1, 2), "a trainer restarted with its key reads its shard again"

    harness.clock.advance(1000)
    assert shard_of(coord, first) == (0, 2)
    harness.clock.advance(801)  # second's access (renewed 1801 s ago) has lapsed; first's has not
    assert shard_of(coord, third) == (1, 2), "a lapsed trainer's shard goes to the next one"
    assert ask(coord, second).status_code == 409, "its former holder now finds every shard taken"
    assert shard_of(coord, first) == (0, 2)


def test_a_run_with_fewer_shards_moves_a_trainer_off_a_shard_it_no_longer_has(harness, tmp_path):
    coord = harness.start(operators=["bob"], run_config=two_shard_run(tmp_path))
    first, second = harness.node("bob"), harness.node("bob")
    assert shard_of(coord, first) == (0, 2) and shard_of(coord, second) == (1, 2)
    harness.stop_all()
    coord = harness.start(operators=["bob"])  # the shipped test run: one shard
    assert ask(coord, second).status_code == 409, "shard 0 is still first's"
    harness.clock.advance(1801)
    assert shard_of(coord, second) == (0, 1)
