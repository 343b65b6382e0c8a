"""Config loading: defaults <- YAML <- overrides; every shipped recipe validates; mistakes are one clear line."""

import dataclasses
from pathlib import Path

import pytest

from rlk2.config import Config, load_config
from rlk2.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts and "eval" not in p.parts)


def test_demo_config_is_default_and_frozen():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.algo.loss == "k2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rollout.group_size = 3  # frozen


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.tasks and cfg.trainer.steps >= 0


def test_dotted_overrides_apply_with_types():
    cfg = load_config(None, ["rollout.group_size=4", "trainer.steps=3", "run.dir=/tmp/x", "optim.lr=0.5"])
    assert cfg.rollout.group_size == 4 and cfg.trainer.steps == 3 and cfg.optim.lr == 0.5
    assert str(cfg.run_dir) == "/tmp/x"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["rollout.group_sise=4"], "rollout.group_sise"),
        (["rollout.group_size=four"], "rollout.group_size"),
        (["algo.loss=ppo"], "algo.loss"),
        (["rollout.group_size=1"], "rollout.group_size"),
        (["optim.name=sgd"], "optim.name"),
        (["algo.inner_steps=0"], "algo.inner_steps"),  # would train nothing, silently
        (["trainer.steps"], "trainer.steps"),
        (["trainer.shared_prompt_tokens=-2"], "trainer.shared_prompt_tokens"),
        (["critic.warm_start_verdicts=half"], "critic.warm_start_verdicts"),
    ],
)
def test_bad_overrides_name_the_key_in_one_line(overrides, needle):
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  groupsize: 4\n")
    with pytest.raises(UserError, match="rollout.groupsize"):
        load_config(bad)
