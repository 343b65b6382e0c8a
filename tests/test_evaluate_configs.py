"""Eval task declarations (configs/eval/*.yaml): every shipped file validates; mistakes are one line naming the
file and the field; data sources (built-in, local JSONL with column mapping, a packaged .jsonl.gz) load."""

from pathlib import Path

import pytest

from rlk2.errors import UserError
from rlk2.eval.tasks import EvalTaskConfig, find_task_file, load_task_config, read_task_rows

ROOT = Path(__file__).resolve().parent.parent
EVAL_CONFIGS = sorted((ROOT / "configs" / "eval").glob("*.yaml"))


def test_shipped_eval_tasks_exist():
    assert {p.stem for p in EVAL_CONFIGS} >= {"arith", "humaneval", "word_problems"}


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_eval_task_validates_and_loads_rows(path):
    cfg = load_task_config(path)
    assert isinstance(cfg, EvalTaskConfig) and cfg.name == path.stem
    rows = read_task_rows(cfg)
    assert rows
    for column, src in cfg.columns.items():
        assert all(src in r for r in rows), f"{path.name}: column {column} reads missing field {src}"
    assert cfg.prompt_template.format(**{**rows[0], **{c: rows[0][s] for c, s in cfg.columns.items()}})


def test_humaneval_comes_from_the_packaged_data_with_tests_and_entry_points():
    cfg = load_task_config(find_task_file("humaneval"))
    rows = read_task_rows(cfg)
    assert len(rows) == 164  # HumanEval's size
    assert cfg.rewards[0].name == "code" and cfg.columns == {"tests": "test"}
    assert all("def check(candidate)" in r["test"] and r["entry_point"] for r in rows)


def test_builtin_task_uses_the_held_out_split():
    from rlk2.data import builtin_split

    cfg = load_task_config(find_task_file("arith"))
    rows = read_task_rows(cfg)
    assert rows == builtin_split("arith", "eval")[: cfg.limit]
    train = {r["prompt"] for r in builtin_split("arith", "train")}
    assert not any(r["prompt"] in train for r in rows)  # never trained on


def test_local_jsonl_columns_are_mapped_and_prompts_rendered():
    from rewards.engine import RewardEngine
    from rlk2.eval.tasks import build_eval_task

    cfg = load_task_config(find_task_file("word_problems"))
    with RewardEngine(num_workers=1) as engine:
        task = build_eval_task(cfg, engine, limit=3)
    assert len(task.prompts) == 3
    assert task.prompts[0].startswith("Tom has 3 apples") and task.prompts[0].endswith(r"\boxed{}.")
    assert task.columns["answer"][:2] == ["8", "48"]  # read from the rows' `solution` field
    assert [s.name for s in task.specs] == ["math", "format"] and task.vote_kind == "boxed"


BAD = [
    ("name: t\nsource: builtin:arith\nmax_new_tokens: lots\n", "max_new_tokens"),
    ("name: t\nsource: builtin:arith\nmax_new_token: 5\n", "max_new_token"),
    ("name: t\nsource: builtin:arith\nmax_new_tokens: 0\n", "max_new_tokens"),
    ("name: t\nsource: builtin:nope\n", "source"),
    ("name: t\nsource: data.csv\n", "source"),
    ("source: builtin:arith\n", "name"),
    ("name: t\nsource: builtin:arith\nrewards: [{name: nonexistent_reward}]\n", "rewards[0].name"),
    ("name: t\nsource: builtin:arith\nrewards: [{name: math, weight: heavy}]\n", "rewards[0].weight"),
    ("name: t\nsource: builtin:arith\nrewards: []\n", "rewards"),
    ("name: t\nsource: builtin:arith\nvote: majority\n", "vote"),
    ("name: t\nsource: builtin:arith\nsplit: test\n", "split"),
    ("name: t\nsource: builtin:arith\nprompt_template: 'no fields'\n", "prompt_template"),
    ("name: t\nsource: builtin:arith\nprompt_template: '{unclosed'\n", "prompt_template"),
    ("name: t\nsource: builtin:arith\nlimit: -1\n", "limit"),
    ("name: t\nsource: builtin:arith\ncolumns: [a, b]\n", "columns"),
]


@pytest.mark.parametrize("text, field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_task_file_is_one_line_naming_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_task_config(path)
    msg = str(err.value)
    assert "\n" not in msg and "bad.yaml" in msg and field in msg, msg


def test_bad_rows_name_the_row(tmp_path):
    from rewards.engine import RewardEngine
    from rlk2.eval.tasks import build_eval_task

    (tmp_path / "d.jsonl").write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2"}\n')
    (tmp_path / "t.yaml").write_text("name: t\nsource: d.jsonl\nprompt_template: '{q}'\ncolumns: {answer: a}\n")
    cfg = load_task_config(tmp_path / "t.yaml")  # the relative source is read beside the YAML file
    with RewardEngine(num_workers=1) as engine, pytest.raises(UserError, match=r"row 2 has no field 'a'"):
        build_eval_task(cfg, engine)
    (tmp_path / "t2.yaml").write_text("name: t\nsource: d.jsonl\nprompt_template: '{question}'\ncolumns: {answer: a}\n")
    with RewardEngine(num_workers=1) as engine, pytest.raises(UserError, match=r"row 1 has no field 'question'"):
        build_eval_task(load_task_config(tmp_path / "t2.yaml"), engine, limit=1)
    (tmp_path / "t3.yaml").write_text("name: t\nsource: d.jsonl\nprompt_template: '{q}'\n")
    with RewardEngine(num_workers=1) as engine, pytest.raises(UserError, match=r"needs column 'answer'"):
        build_eval_task(load_task_config(tmp_path / "t3.yaml"), engine)


def test_unknown_task_name_lists_the_shipped_ones():
    with pytest.raises(UserError, match="unknown task 'nope'.*arith"):
        find_task_file("nope")
