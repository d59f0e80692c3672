"""The production run on paper: every stage of llama-8b fits a 24 GB GPU and 80 GB of host memory, and
the preflight takes a real RTX 4090 (24,563 MiB reported) from the same plan."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agora.cli import preflight as pf
from agora.cli.memory_plan import largest_batch_everywhere
from agora.config import load_run_config
from tests.cli.conftest import REPO

RTX_4090_BYTES = 24_563 * 2**20
"""What torch reports as an RTX 4090's total memory: 23.99 GiB."""


@pytest.fixture(scope="module")
def llama_8b():
    return load_run_config("llama-8b")


def test_every_llama_8b_stage_fits_a_24_gib_gpu_and_80_gb_of_host_memory():
    printed = subprocess.run(
        [sys.executable, str(REPO / "agora_cli.py"), "memory-plan", "--config", "llama-8b", "--vram-gib", "24", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    stages = json.loads(printed)["stages"]
    assert [s["name"] for s in stages] == ["head", "body1", "body2", "body3", "body4", "body5", "tail"]
    for stage in stages:
        assert stage["gpu_gib"] <= 22, stage
        assert stage["host_gib"] <= 80, stage
        assert stage["max_batch"] >= 1, stage
    assert sum(s["params"] for s in stages) > 5e9, "the production model, not a toy"


def test_the_table_names_every_stage_and_the_verdict():
    printed = subprocess.run(
        [sys.executable, str(REPO / "agora_cli.py"), "memory-plan", "--config", "llama-8b", "--vram-gib", "16"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "bfloat16 weights, float32 master weights and optimizer state on the CPU" in printed
    for name in ("head", "body3", "tail"):
        assert f"\n{name} " in printed
    assert "does not fit" in printed, "the tail needs more than a 16 GiB GPU leaves"


def test_the_preflight_accepts_an_rtx_4090_and_refuses_a_card_the_plan_does_not_fit(llama_8b):
    fits = largest_batch_everywhere(llama_8b, RTX_4090_BYTES)
    assert fits >= 1
    result, batch = pf.check_vram(RTX_4090_BYTES, fits, llama_8b.server.max_batch_size, None)
    assert result.status == pf.OK and batch == 1, result

    small = 16 * 2**30
    result, batch = pf.check_vram(small, largest_batch_everywhere(llama_8b, small), llama_8b.server.max_batch_size, None)
    assert result.status == pf.FAIL and batch is None
    assert result.message == "GPU is not eligible (GPU VRAM: 16 GB)."


def test_production_boundaries_are_compressed_at_the_modelled_rate(llama_8b):
    assert llama_8b.boundary.codec == "subspace"
    assert llama_8b.boundary_width == llama_8b.model.hidden_size // 100
    assert llama_8b.server.precision.dtype == "bfloat16" and llama_8b.server.precision.master_weights == "cpu"


def test_the_disk_a_worker_needs_is_three_checkpoints_of_the_largest_stage_and_fits_the_guides_80_gb(llama_8b):
    from agora.cli.memory_plan import INSTALL_BYTES, disk_needed, plan_run
    from agora_server.server.memory_plan import checkpoint_bytes

    tail = next(plan for plan in plan_run(llama_8b, None) if plan.name == "tail")
    need = disk_needed(llama_8b)
    assert need == 3 * checkpoint_bytes(tail.params) + INSTALL_BYTES
    assert checkpoint_bytes(tail.params) > 20 * 2**30, "a tail checkpoint with its optimizer state is over 20 GiB"
    assert need <= 80 * 2**30
    assert pf.check_disk(REPO, need - 1, required=True, need_bytes=need).status == pf.FAIL
    assert pf.check_disk(REPO, need, required=True, need_bytes=need).status == pf.OK
