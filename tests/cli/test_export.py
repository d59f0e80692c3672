"""The model leaves the swarm as a standard checkpoint: stages trained a few steps and saved as workers
save them, exported, loaded with ``transformers.AutoModelForCausalLM``, give the composed stages' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml

from agora.cli.main import main as cli_main
from agora.config import RunConfig, load_run_config
from agora_server.data.tokenizer import load_tokenizer
from agora_server.models import PipelineStage, build_boundary_codec
from agora_server.server.backend import StageBackend
from agora_server.server.checkpoint import checkpoint_path, save_checkpoint


def build_stages(config: RunConfig) -> list[PipelineStage]:
    codec = build_boundary_codec(config.boundary, config.model, config.seed, torch.device("cpu"))
    return [PipelineStage(config.model, spec, codec, config.seed) for spec in config.stages]


def composed_logits(stages: list[PipelineStage], tokens: torch.Tensor) -> torch.Tensor:
    boundary = None
    for stage in stages[:-1]:
        boundary = stage(tokens, boundary)
    tail = stages[-1]
    return tail.lm_head(tail.norm(tail.run_layers(tail.enter(tokens, boundary))))


def train_a_few_steps(stages: list[PipelineStage], config: RunConfig, steps: int = 3) -> None:
    """Moves every weight off its initialisation, the subspace biases (initialised to zero) included."""
    params = [p for stage in stages for p in stage.parameters()]
    optimizer = torch.optim.AdamW(params, lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, config.model.vocab_size, (2, 32), generator=gen)
        logits = composed_logits(stages, tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def save_as_workers_do(stages: list[PipelineStage], config: RunConfig, directory: Path) -> None:
    for epoch, stage in enumerate(stages):
        state = StageBackend(stage, config.server, torch.device("cpu")).state_dict()
        state["epoch"] = 10 + epoch
        save_checkpoint(checkpoint_path(directory, config.run_name, stage.spec.name, f"peer-{stage.spec.name}"), state)


@pytest.mark.parametrize("codec", ["dense", "subspace"])
def test_an_exported_run_loads_with_transformers_and_gives_the_stages_logits(tmp_path, codec, capsys):
    config_file = tmp_path / "run.yaml"
    raw = load_run_config("local-tiny", {"boundary": {"codec": codec}}).model_dump(mode="json")
    config_file.write_text(yaml.safe_dump(raw))
    config = load_run_config(config_file)
    torch.manual_seed(0)
    stages = build_stages(config)
    train_a_few_steps(stages, config)
    if codec == "subspace":
        assert stages[0].layers["0"].self_attn.o_proj.bias.abs().max() > 0, "the biases must be trained for the fold to be tested"
    save_as_workers_do(stages, config, tmp_path / "checkpoints")

    out = tmp_path / "hf"
    code = cli_main(["export", "--config", str(config_file), "--checkpoints", str(tmp_path / "checkpoints"), "--out", str(out), "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file()

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.rms_norm_eps == config.model.norm_eps
    assert model.config.rope_parameters["rope_theta"] == config.model.rope_theta
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def main():\n    return 0\n"
    assert tokenizer(text)["input_ids"] == load_tokenizer(config.data.tokenizer).encode(text).ids
    tokens = torch.tensor([tokenizer(text)["input_ids"] * 4])[:, : config.data.seq_len]
    with torch.no_grad():
        expected = composed_logits(stages, tokens)
        actual = model(tokens).logits
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_export_names_the_stage_it_cannot_find(tmp_path, capsys):
    code = cli_main(["export", "--config", "local-tiny", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert code == 1
    assert "no readable checkpoint of stage head" in capsys.readouterr().err
