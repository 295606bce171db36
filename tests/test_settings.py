"""Config dataclasses built from untyped values: types checked, unknown names refused, flat names routed."""

import pytest

from palm.core.settings import build, flatten, read_file, route
from palm.model.config import ConfigError
from palm.training.finetune import FinetuneConfig
from palm.training.loop import LoopConfig
from palm.training.train import TrainConfig


def test_flat_settings_go_to_the_recipe_or_its_loop():
    cfg = TrainConfig.from_settings({"corpus": ["x"], "out": "o", "seq_len": 64, "max_steps": 7, "lr": 1})
    assert cfg.seq_len == 64 and cfg.loop.max_steps == 7
    assert cfg.loop.lr == 1.0 and isinstance(cfg.loop.lr, float)  # an int is a fine float
    assert TrainConfig.from_settings(flatten(cfg)) == cfg  # and back
    nested = TrainConfig.from_settings({"corpus": ["x"], "out": "o", "loop": {"max_steps": 7}})
    assert nested.loop.max_steps == 7


def test_each_recipe_keeps_its_own_loop_defaults():
    assert FinetuneConfig.from_settings({}).loop.batch_ramp is False
    assert TrainConfig.from_settings({"corpus": ["x"], "out": "o"}).loop == LoopConfig()


@pytest.mark.parametrize(
    "values, words",
    [
        ({"max_step": 3}, "'max_step'"),  # a misspelt key
        ({"max_steps": "3"}, "max_steps"),  # a string where an int belongs
        ({"max_steps": 2.5}, "max_steps"),
        ({"compile": "yes"}, "compile"),
        ({"corpus": "x"}, "corpus"),  # a list is required
        ({"model": [1]}, "model"),
        ({"loop": 3}, "loop"),
    ],
)
def test_bad_settings_are_one_clear_error(values, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig.from_settings({"corpus": ["x"], "out": "o", **values})


def test_build_refuses_unknown_fields_of_the_loop_too():
    with pytest.raises(ConfigError, match="'nope'"):
        build(LoopConfig, {"nope": 1})
    with pytest.raises(ConfigError, match="'nope'"):
        route(TrainConfig, {"corpus": ["x"], "out": "o", "loop": {"nope": 1}}, LoopConfig())


def test_resume_may_change_only_what_the_recipe_allows():
    cfg = TrainConfig.from_settings({"corpus": ["x"], "out": "o"})
    assert cfg.resumed({"max_steps": 50}).loop.max_steps == 50
    with pytest.raises(ConfigError, match="--lr"):
        cfg.resumed({"lr": 0.5})
    ft = FinetuneConfig.from_settings({"epochs": 2.0})
    assert ft.resumed({"max_steps": 9}).epochs is None  # explicit steps replace the epochs
    with pytest.raises(ConfigError, match="--parallel"):
        ft.resumed({"parallel": "ddp"})


def test_config_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("max-steps = 3\n[model]\nhidden_size = 32\n")
    assert read_file(toml) == {"max_steps": 3, "model": {"hidden_size": 32}}
    bad = tmp_path / "bad.toml"
    bad.write_text("max-steps = = 3")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        read_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_file(tmp_path / "none.yaml")
