"""Fuzzing the parsers users feed by hand: config overrides, dataset JSONL, `rlk2 score` and `sandbox exec` input.

Each parser may accept its input or reject it with its documented one-line error (`UserError` / the sandbox CLI's
`CliError`); any other exception is a traceback in front of a user, and a failure here.
"""

from __future__ import annotations

import gzip
import io
import json
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlk2.errors import UserError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys that exist, near-misses and junk, so the fuzzer reaches both the schema and the tree walking.
KEYS = st.sampled_from(
    [
        "rollout.group_size",
        "rollout.temperature",
        "tasks.0.max_new_tokens",
        "tasks.1.weight",
        "tasks.0.rewards.0.name",
        "tasks.0.rewards",
        "tasks",
        "optim.lr",
        "optim.name",
        "policy.demo.hidden_size",
        "policy",
        "run.seed",
        "run",
        "trainer.steps.x",
        "rollout.group_sise",
        "tasks.x.weight",
        "tasks.-1.weight",
        "tasks.99.weight",
        "",
        ".",
        "a..b",
        "policy.lora.target_modules",
        "policy.lora.target_modules.0",
        "eval.samples",
    ]
) | st.text(string.ascii_lowercase + "._0123456789-", max_size=30)
VALUES = st.sampled_from(
    [
        "4",
        "-1",
        "0",
        "1e9",
        "0.5",
        "nan",
        "inf",
        "true",
        "null",
        "[1, 2]",
        "{a: 1}",
        "[",
        "{",
        "'",
        '"x',
        "",
        "adamw",
        "muonclip",
        "sgd",
        "[{name: math}]",
        "{name: math, weight: x}",
        "!!python/object:os.system",
        "&a [*a]",
        "*b",
    ]
) | st.text(max_size=20)


@FUZZ
@given(st.lists(st.tuples(KEYS, VALUES), max_size=4))
def test_config_overrides_are_accepted_or_rejected_in_one_line(pairs):
    from rlk2.config import load_config

    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        load_config(None, overrides)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)


@FUZZ
@given(st.lists(st.text(max_size=12), max_size=3))
def test_overrides_without_an_equals_sign_or_key(items):
    from rlk2.config import load_config

    try:
        load_config(None, items)
    except UserError as exc:
        assert "\n" not in str(exc)


# Every numeric config value: the fuzzer draws the value, the config accepts it (and then it is in range and
# finite) or names the key in one line.
def _numeric_fields():
    import dataclasses
    import typing

    from rlk2.config import Config

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, key = hints[f.name], f"{prefix}{f.name}"
            args = typing.get_args(hint)
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")
            elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
                walk(args[0], key + ".0.")  # the first task, its first reward
            elif hint in (int, float) or set(args) in ({int, type(None)}, {float, type(None)}):
                out.append(key)

    walk(Config, "")
    return out


NUMERIC_KEYS = _numeric_fields()
NUMBERS = (
    st.sampled_from(["0", "-1", "1", "-0.5", "1e300", "-1e300", ".nan", ".inf", "-.inf", "2", "1000000"])
    | (st.floats(allow_nan=True, allow_infinity=True).map(repr))
    | st.integers(-(10**12), 10**12).map(str)
)


def test_the_value_fuzzer_reaches_every_section():
    assert {k.split(".")[0] for k in NUMERIC_KEYS} >= {
        "run",
        "policy",
        "warm_start",
        "tasks",
        "rollout",
        "algo",
        "optim",
        "trainer",
        "eval",
        "moe",
        "critic",
    }


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(NUMERIC_KEYS), NUMBERS), min_size=1, max_size=3))
def test_config_values_are_in_range_and_finite_or_refused_in_one_line(pairs):
    import dataclasses
    import math

    from rlk2.config import load_config

    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in pairs])
    except UserError as exc:
        assert "\n" not in str(exc) and any(k.split(".")[-1] in str(exc) or "task" in str(exc) for k, _ in pairs)
        return

    def finite(node):
        if dataclasses.is_dataclass(node):
            return all(finite(getattr(node, f.name)) for f in dataclasses.fields(node))
        if isinstance(node, list):
            return all(finite(x) for x in node)
        return not isinstance(node, float) or math.isfinite(node)

    assert finite(cfg)
    assert cfg.optim.lr > 0 and cfg.rollout.temperature > 0 and cfg.eval.temperature > 0 and cfg.trainer.steps >= 0


# `rlk2 score` options, before any row is scored (no rows on stdin: the engine never starts).
@FUZZ
@given(
    st.sampled_from(["math", "format", "length", "nope", "rewards.format:format_reward", "x:y", "a.py:f"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6)),
    st.integers(-(10**6), 10**6),
    st.lists(st.text(max_size=12), max_size=3),
)
def test_score_options_are_accepted_or_refused_in_one_line(reward, timeout, workers, options):
    import argparse

    from rlk2.score import run_score

    args = argparse.Namespace(reward=reward, input=None, option=options, timeout=float(timeout), workers=workers)
    sys_stdin = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        assert run_score(args) == 0
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
    finally:
        sys.stdin = sys_stdin


# `rlk2 eval --out`: whatever is at the path, refused in one line or made, before any evaluation.
@FUZZ
@given(st.sampled_from(["new", "new/deeper", "file", "file/sub", "empty", "full", "full/"]))
def test_eval_out_is_accepted_or_refused_in_one_line(kind):
    from rlk2.eval_checkpoints import _output_dir

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "file").write_text("x")
        (root / "empty").mkdir()
        (root / "full").mkdir()
        (root / "full" / "report.md").write_text("old")
        try:
            out = _output_dir(root / kind)
        except UserError as exc:
            assert "\n" not in str(exc) and "--out" in str(exc)
            assert kind.startswith(("file", "full"))
            return
        assert out.is_dir() and not any(out.iterdir())


def _jsonl_lines():
    objects = st.dictionaries(
        st.sampled_from(["prompt", "completion", "answer", "tests", "x"]),
        st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=2),
        max_size=4,
    )
    line = st.one_of(
        objects.map(json.dumps),
        st.text(max_size=30),
        st.just("[1, 2]"),
        st.just("{"),
        st.just("   "),
        st.just("null"),
        st.just('"s"'),
    )
    return st.lists(line, max_size=6)


@FUZZ
@given(_jsonl_lines(), st.binary(max_size=12), st.booleans())
def test_dataset_reader(lines, tail, gzipped):
    from rlk2.data import check_columns, load_task_rows

    raw = ("\n".join(lines)).encode("utf-8", "surrogatepass") + tail
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("d.jsonl.gz" if gzipped else "d.jsonl")
        # A gzip file cut short is a real way to hand over a broken dataset.
        path.write_bytes(
            gzip.compress(raw)[: len(raw) // 2 + 10]
            if gzipped and tail[:1] == b"\x00"
            else gzip.compress(raw)
            if gzipped
            else raw
        )
        try:
            rows = load_task_rows(str(path), "train", eval_size=1)
            check_columns(rows, ["answer"], source=str(path))
        except UserError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)


@FUZZ
@given(_jsonl_lines())
def test_score_input_reader(lines):
    from rlk2.score import read_rows

    try:
        read_rows(io.StringIO("".join(line + "\n" for line in lines)), "in.jsonl")
    except UserError as exc:
        assert str(exc).startswith("in.jsonl:") and "\n" not in str(exc)


def _job_lines():
    job = st.fixed_dictionaries(
        {},
        optional={
            "code": st.none() | st.text(max_size=10) | st.integers(),
            "tests": st.none() | st.text(max_size=10) | st.lists(st.text(max_size=3), max_size=2),
            "test_cases": st.none()
            | st.text(max_size=10)
            | st.lists(
                st.dictionaries(
                    st.sampled_from(["stdin", "stdout", "x"]), st.text(max_size=3) | st.integers(), max_size=2
                ),
                max_size=2,
            ),
            "entry_point": st.none() | st.text(max_size=5) | st.integers(),
            "timeout_s": st.none() | st.floats(allow_nan=True) | st.text(max_size=3) | st.integers(-5, 5),
            "memory_mb": st.none() | st.integers(-10, 10**6) | st.text(max_size=3),
            "id": st.none() | st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=1),
            "stdin": st.text(max_size=5) | st.integers(),
        },
    )
    return st.lists(st.one_of(job.map(json.dumps), st.text(max_size=20), st.just("[]")), max_size=5)


@FUZZ
@given(_job_lines())
def test_sandbox_exec_reader(lines):
    from sandboxes.result import JobError, read_jobs

    try:
        read_jobs(lines, "jobs.jsonl")
    except JobError as exc:
        assert str(exc).startswith("jobs.jsonl:") and "\n" not in str(exc)


# ---------------------------------------------------------------------------------------- through the real CLIs
# A handful of the nastiest inputs through the installed entry points: exit code 2 and one line on stderr.
@pytest.mark.parametrize(
    "argv,stdin",
    [
        (["rlk2.cli", "train", "rollout.group_size=[", "--resume", "/nonexistent"], None),
        (["rlk2.cli", "train", "tasks.7.weight=1"], None),
        (["rlk2.cli", "train", "optim=3"], None),
        (["rlk2.cli", "score", "--reward", "math", "-"], "\udcff\n"),
        (["rlk2.cli", "score", "--reward", "math", "-"], '{"completion": 3}\n'),
        (["sandboxes.cli", "exec", "--backend", "bwrap", "-"], '{"code": 1}\n'),
    ],
)
def test_cli_rejects_bad_input_in_one_line(argv, stdin):
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        input=stdin.encode("utf-8", "surrogateescape") if stdin else None,
        capture_output=True,
        timeout=120,
    )
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
