"""The GPU check of the 8B stages is prepared for a session that has a GPU: its code path runs here on
the CPU with the tiny model, so it cannot rot before one is lent."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli.conftest import REPO


def test_the_gpu_check_runs_each_stage_to_an_optimizer_step_on_the_cpu(tmp_path):
    output = tmp_path / "stages.json"
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_stages.py"), "--config", "local-tiny", "--device", "cpu", "--seq-len", "64",
         "--requests", "2", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(output.read_text())
    assert set(result["stages"]) == {"head", "body1", "tail"}
    for stage in result["stages"].values():
        assert stage["micro_batch"] == [4, 64] and stage["planned_gpu_gib"] > 0 and stage["backward_request_tokens_per_s"] > 0
    assert result["all_within_budget"]
