"""The coordinator's stages come from the run config; a coordinator config may only restate them (to set needs)."""

from __future__ import annotations

import pytest
import yaml

from agora import run_coordinator

from .conftest import RUN_CONFIG
from .test_api import join


def test_a_config_that_names_no_stages_assigns_workers_to_every_stage_of_the_run(harness, listener):
    assert harness.config().stages is None
    coord = harness.start(queue={"max_active_per_user": 10})
    assert [join(coord, harness.node(), listener.port).json()["stage"] for _ in range(3)] == ["head", "body1", "tail"]
    info = coord.http.get("/api/run_info").json()
    assert [(s["name"], s["need"], s["workers"]) for s in info["stages"]] == [("head", 1, 1), ("body1", 1, 1), ("tail", 1, 1)]


@pytest.mark.parametrize("listed", [["head", "tail"], ["head", "body1", "body2", "tail"], ["head", "tail", "body1"]],
                         ids=["missing", "extra", "wrong order"])
def test_a_stage_list_that_disagrees_with_the_run_config_is_refused_at_start(harness, tmp_path, capsys, listed):
    config = harness.config(stages=[{"name": name} for name in listed]).model_dump(mode="json")
    path = tmp_path / "coordinator.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_coordinator.main(["--config", str(path), "--port", "0"]) == 2
    said = capsys.readouterr().err
    assert f"lists stages {', '.join(listed)} but run config {RUN_CONFIG} has stages head, body1, tail" in said, said
    assert "list exactly those, in that order, or remove `stages`" in said
    assert not (tmp_path / "coordinator.db").exists(), "refused before it opened its database"


def test_a_stage_list_that_restates_the_run_config_sets_the_needs(harness, listener):
    coord = harness.start(stages=[{"name": "head", "need": 2}, {"name": "body1"}, {"name": "tail"}])
    info = coord.http.get("/api/run_info").json()
    assert [(s["name"], s["need"]) for s in info["stages"]] == [("head", 2), ("body1", 1), ("tail", 1)]


def test_without_a_run_config_the_coordinator_does_not_start(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default database and key paths are relative
    assert run_coordinator.main(["--port", "0"]) == 2
    assert "run_config\n  Field required" in capsys.readouterr().err
    assert run_coordinator.main(["--run_config", "no-such-run", "--port", "0"]) == 2
    assert "run_config: run config 'no-such-run' is neither a file nor a shipped config" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "refused before it wrote a database or a key"
