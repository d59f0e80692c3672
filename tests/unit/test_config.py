import pytest

from agora.config import ConfigError, load_run_config, shipped_config_names


def test_shipped_configs_load_and_split():
    assert {"local-tiny", "llama-8b"} <= set(shipped_config_names())
    tiny = load_run_config("local-tiny")
    assert [s.name for s in tiny.stages] == ["head", "body1", "tail"]
    big = load_run_config("llama-8b")
    assert [s.num_layers for s in big.stages] == [6, 4, 4, 4, 4, 4, 6]
    assert not big.server.allow_cpu and tiny.server.allow_cpu


def test_llama_8b_averages_with_the_reference_runs_settings_in_bounded_groups():
    averaging = load_run_config("llama-8b").server.averaging
    # the reference figures (shared/reference/algorithms.md): 5% every 20 steps, matchmaking 25-40 s,
    # averaging timeout 60-150 s, sender timeout 10-30 s
    assert (averaging.fraction, averaging.average_every) == (0.05, 20)
    assert 25 <= averaging.matchmaking_time <= 40
    assert 60 <= averaging.averaging_timeout <= 150
    assert 10 <= averaging.sender_timeout <= 30
    assert averaging.target_group_size is not None and averaging.target_group_size <= 16
    tail_round_bytes = 1.91e9 * averaging.fraction * 4  # float32 masters of the largest stage, one way
    assert tail_round_bytes / (200e6 / 8) * 2 <= averaging.averaging_timeout, "a round fits at 200 Mbit/s with room"


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="local-tiny"):
        load_run_config("no-such-run")


def test_corrupt_yaml_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(path)


def test_unknown_field_and_inconsistent_values_are_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_name: x\nmodel: {num_layers: 4, hiden_size: 3}\nstage_layers: [2, 2]\n")
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        load_run_config(path)
    path.write_text("run_name: x\nmodel: {num_layers: 4}\nstage_layers: [2, 1]\n")
    with pytest.raises(ConfigError, match="add up to 3"):
        load_run_config(path)


def test_trainer_batch_must_fit_the_workers():
    with pytest.raises(ConfigError, match="micro_batch_size 16 exceeds"):
        load_run_config("local-tiny", {"trainer": {"micro_batch_size": 16}})


def test_overrides_merge_into_nested_sections():
    config = load_run_config("local-tiny", {"server": {"optimizer": {"lr": 0.5}}})
    assert config.server.optimizer.lr == 0.5
    assert config.server.max_batch_size == 8  # untouched siblings survive the merge
