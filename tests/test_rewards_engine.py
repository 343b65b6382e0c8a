"""The reward engine: concurrency, process-level timeouts, errors as None (never 0.0), resolution, columns.

The misbehaving rewards below are module-level functions named by dotted path (`f"{__name__}:name"`): worker
processes import this module to run them, exactly as they would import a user's reward module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
import time

import pytest

import rewards
from rewards import RewardEngine, RewardError, RewardSpec, reward_traits

HERE = __name__
SLACK_S = 15.0  # generous bound on kill + respawn + scheduling on a loaded 2-core box; a hang would be infinite


def raises(completions, *, prompts, **_):
    raise ZeroDivisionError("reward bug")


def sleeps_forever(completions, *, prompts, **_):
    time.sleep(10_000)


def waits_for_file(completions, *, prompts, path, **_):
    while not os.path.exists(path[0]):
        time.sleep(0.01)
    return [1.0] * len(completions)


def _easy_only(completion: str, row: dict) -> float | None:
    if completion == "boom":
        raise RuntimeError("shortcut bug")
    return {"easy": 1.0, "nan": float("nan")}.get(completion)


@reward_traits(elementwise=True, shortcut=_easy_only)
def with_shortcut(completions, *, prompts, **_):
    if "easy" in completions:
        raise AssertionError("a sample the shortcut decided reached the worker")
    return [0.5] * len(completions)


def spins_forever(completions, *, prompts, **_):
    while True:
        pass


async def async_ok(completions, *, prompts, answer):
    await asyncio.sleep(0.01)
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


async def async_hangs(completions, *, prompts, **_):
    await asyncio.Event().wait()


def dies(completions, *, prompts, **_):
    os.kill(os.getpid(), signal.SIGSEGV)


@reward_traits(whole_batch=True)  # one call sees all three completions
def wrong_length(completions, *, prompts, **_):
    return [1.0]


@reward_traits(whole_batch=True)
def not_numbers(completions, *, prompts, **_):
    return [float("nan"), "high", 2]


def with_extras(completions, *, prompts, **_):
    return {"rewards": [0.5] * len(completions), "extras": {"why": [f"len {len(c)}" for c in completions]}}


@reward_traits(elementwise=True, timeout_score=0.0)
def hangs_on_marker(completions, *, prompts, **_):
    """Scores 1.0, except that a completion "HANG" spins forever (a model output at fault)."""
    if completions[0] == "HANG":
        while True:
            pass
    return [1.0]


@reward_traits(run_in="caller")
def caller_sleeps(completions, *, prompts, **_):
    time.sleep(5)
    return [1.0] * len(completions)


def needs_two(completions, *, prompts, answer, tests, binary=False, **_):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def engine():
    with RewardEngine(num_workers=2) as eng:
        yield eng


def _score(engine, specs, completions, **columns):
    columns.setdefault("answer", ["4"] * len(completions))
    return engine.score(specs, completions, ["p"] * len(completions), columns)


def test_builtin_rewards_weights_and_total(engine):
    specs = [RewardSpec("math"), RewardSpec("format", weight=0.5), RewardSpec("length", weight=0.0)]
    out = _score(engine, specs, [r"so \boxed{4}", r"\boxed{5}", "four"])
    assert out.rewards["math"] == [1.0, 0.0, 0.0]
    assert out.rewards["format"] == [1.0, 1.0, 0.0]
    # total = 1.0 * math + 0.5 * format; length has weight 0 so it is logged but not added
    assert out.total == [1.5, 0.5, 0.0]
    assert out.rewards["length"] != [0.0, 0.0, 0.0]  # it was computed (the longest one is penalised)
    assert out.errors == {"math": 0, "format": 0, "length": 0} and out.messages == []


def test_exception_is_none_counted_and_logged_never_zero(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="rewards"):
        out = _score(engine, [RewardSpec("math"), RewardSpec(f"{HERE}:raises")], [r"\boxed{4}", "x"])
    assert out.rewards[f"{HERE}:raises"] == [None, None]
    assert out.total == [None, None]  # an unscorable weighted reward makes the total unscorable
    assert out.rewards["math"] == [1.0, 0.0]  # the other reward of the call is unaffected
    assert out.errors[f"{HERE}:raises"] == 2
    assert any("raises" in m and "ZeroDivisionError: reward bug" in m for m in out.messages)
    assert any("raises" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["sleeps_forever", "spins_forever", "async_hangs"])
def test_stuck_reward_is_cut_at_its_timeout(engine, name):
    before = engine.workers_replaced
    start = time.monotonic()
    out = _score(engine, [RewardSpec("math"), RewardSpec(f"{HERE}:{name}", timeout_s=1.0)], [r"\boxed{4}"] * 4)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 + SLACK_S
    assert out.rewards[f"{HERE}:{name}"] == [None] * 4
    assert out.errors[f"{HERE}:{name}"] == 4
    assert any("timeout" in m for m in out.messages)
    assert out.rewards["math"] == [1.0] * 4
    assert engine.workers_replaced > before  # the stuck worker was killed, not left running
    # and the pool still works afterwards
    assert _score(engine, [RewardSpec("math")], [r"\boxed{4}", r"\boxed{3}"]).rewards["math"] == [1.0, 0.0]


def test_async_reward_is_awaited(engine):
    out = _score(engine, [RewardSpec(f"{HERE}:async_ok")], ["4", "5"])
    assert out.rewards[f"{HERE}:async_ok"] == [1.0, 0.0]


def test_elementwise_timeout_is_charged_to_one_sample(engine):
    completions = ["a", "b", "HANG", "c", "d", "e"]
    out = _score(engine, [RewardSpec(f"{HERE}:hangs_on_marker", timeout_s=1.0)], completions)
    # the spinning sample gets the reward's documented timeout score; the others, even those queued after it
    # in the same chunk, are moved to a fresh worker and scored
    assert out.rewards[f"{HERE}:hangs_on_marker"] == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert out.sample_errors[f"{HERE}:hangs_on_marker"] == [None, None, "timeout", None, None, None]
    assert out.errors[f"{HERE}:hangs_on_marker"] == 1


def test_worker_crash_is_none_with_reason(engine):
    out = _score(engine, [RewardSpec(f"{HERE}:dies")], ["x", "y"])
    assert out.rewards[f"{HERE}:dies"] == [None, None]
    assert any("worker died (SIGSEGV)" in m for m in out.messages)


def test_bad_return_values_are_errors(engine):
    out = _score(engine, [RewardSpec(f"{HERE}:wrong_length"), RewardSpec(f"{HERE}:not_numbers")], ["a", "b", "c"])
    assert out.rewards[f"{HERE}:wrong_length"] == [None] * 3
    assert "returned 1 values for 3 completions" in out.sample_errors[f"{HERE}:wrong_length"][0]
    assert out.rewards[f"{HERE}:not_numbers"] == [None, None, 2.0]
    assert out.errors[f"{HERE}:not_numbers"] == 2


def test_extras_come_back_per_sample(engine):
    out = _score(engine, [RewardSpec(f"{HERE}:with_extras")], ["ab", "abc"])
    assert out.extras[f"{HERE}:with_extras/why"] == ["len 2", "len 3"]


def test_caller_run_reward_timeout():
    with RewardEngine(num_workers=1) as eng:
        start = time.monotonic()
        out = _score(eng, [RewardSpec(f"{HERE}:caller_sleeps", timeout_s=0.5)], ["a"])
        assert time.monotonic() - start < 4.0  # returned at the deadline, not after the 5 s sleep
    assert out.rewards[f"{HERE}:caller_sleeps"] == [None]
    assert out.sample_errors[f"{HERE}:caller_sleeps"] == ["timeout"]


def test_rewards_of_one_call_run_concurrently(engine):
    # two rewards that each sleep through most of their deadline: run one after the other they would take 2 x
    specs = [RewardSpec(f"{HERE}:sleeps_forever", timeout_s=2.0), RewardSpec(f"{HERE}:spins_forever", timeout_s=2.0)]
    start = time.monotonic()
    _score(engine, specs, ["a"])
    assert time.monotonic() - start < 4.0 + SLACK_S / 3


def test_ascore_from_an_event_loop(engine):
    async def main():
        return await engine.ascore([RewardSpec("math")], [r"\boxed{4}"], ["p"], {"answer": ["4"]})

    assert asyncio.run(main()).rewards["math"] == [1.0]


def test_submit_scores_in_the_background_while_the_caller_works(engine, tmp_path):
    # The reward waits for a file that the caller writes only after `submit` returned: a blocking submit would
    # leave the reward waiting until its deadline (the samples would come back None with error "timeout").
    marker = tmp_path / "go"
    spec = [RewardSpec(f"{HERE}:waits_for_file", timeout_s=20.0)]
    future = engine.submit(spec, ["a", "b"], ["p", "p"], {"path": [str(marker)] * 2})
    assert not future.done()
    marker.write_text("go")
    batch = future.result()
    assert batch.rewards[f"{HERE}:waits_for_file"] == [1.0, 1.0] and not any(batch.errors.values())


def test_shortcut_scores_in_process_and_only_the_rest_reach_the_worker(engine):
    # the reward proper fails on "easy" and "bad shortcut" rows, so a 1.0 there can only come from the shortcut;
    # a shortcut that raises or returns a non-number leaves the sample to the reward proper
    texts = ["easy", "hard", "boom", "nan", "easy"]
    batch = _score(engine, [RewardSpec(f"{HERE}:with_shortcut")], texts)
    assert batch.rewards[f"{HERE}:with_shortcut"] == [1.0, 0.5, 0.5, 0.5, 1.0]
    assert not any(batch.errors.values())


def test_a_shortcut_on_a_batch_reward_is_refused_at_declaration():
    with pytest.raises(RewardError, match="needs elementwise=True"):
        reward_traits(shortcut=lambda completion, row: None)


def test_runs_apart_only_when_every_reward_is_in_a_worker(engine):
    assert engine.runs_apart([RewardSpec("math"), RewardSpec(f"{HERE}:raises")])
    assert not engine.runs_apart([RewardSpec("math"), RewardSpec(f"{HERE}:caller_sleeps")])
    assert not engine.runs_apart([RewardSpec("rubric")])  # the self critic uses the live policy


def test_empty_batch(engine):
    out = engine.score([RewardSpec("math")], [], [], {"answer": []})
    assert out.rewards == {"math": []} and out.total == []


def test_check_columns_names_reward_and_column(engine):
    spec = RewardSpec(f"{HERE}:needs_two")
    engine.check_columns([spec], ["answer", "tests"], where="data/train.jsonl")
    with pytest.raises(RewardError, match=r"^data/train.jsonl: reward '.*needs_two' needs column 'tests'"):
        engine.check_columns([spec], ["answer"], where="data/train.jsonl")
    with pytest.raises(RewardError, match="reward 'math' needs column 'answer'"):
        engine.check_columns([RewardSpec("math")], ["question"], where="cfg")
    with pytest.raises(RewardError, match="has no option 'binry'"):
        engine.check_columns([RewardSpec("math", kwargs={"binry": True})], ["answer"], where="cfg")
    with pytest.raises(RewardError, match="listed twice"):
        engine.check_columns([RewardSpec("math"), RewardSpec("math")], ["answer"], where="cfg")


def test_misaligned_columns_are_rejected(engine):
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2 completions"):
        engine.score([RewardSpec("math")], ["a", "b"], ["p", "p"], {"answer": ["1"]})


def test_required_columns():
    assert rewards.required_columns(needs_two) == ["answer", "tests"]
    assert rewards.required_columns(rewards.REWARDS["math"]) == ["answer"]
    assert rewards.required_columns(lambda completions, solution, **kw: None) == ["solution"]


def test_resolve_by_name_path_and_suggestions():
    assert rewards.resolve_reward("math") is rewards.REWARDS["math"]
    assert rewards.resolve_reward(f"{HERE}:raises") is raises
    with pytest.raises(RewardError, match=r"unknown reward 'mth'.*did you mean 'math'"):
        rewards.resolve_reward("mth")
    with pytest.raises(RewardError, match="no module named 'no_such_pkg.mod'"):
        rewards.resolve_reward("no_such_pkg.mod:fn")
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        rewards.resolve_reward("rewards.math:nope")
    with pytest.raises(RewardError, match="not callable"):
        rewards.resolve_reward("rewards.math:_CACHE_SIZE")


def test_resolve_entry_point(tmp_path, monkeypatch):
    # a real installed-distribution layout on sys.path: importlib.metadata finds it like a pip-installed package
    (tmp_path / "thirdparty_rewards.py").write_text(
        textwrap.dedent("""
        def shout(completions, *, prompts, **_):
            return [float(c.isupper()) for c in completions]
    """)
    )
    dist = tmp_path / "thirdparty_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlk2.rewards]\nshout = thirdparty_rewards:shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.resolve_reward("shout")
    assert fn(["HI", "hi"], prompts=["", ""]) == [1.0, 0.0]
    assert ("shout", "entry point (thirdparty_rewards:shout)", [], "") in rewards.list_rewards()
    # and a worker process resolves it the same way (it inherits the import path)
    with RewardEngine(num_workers=1, preload=()) as eng:
        assert eng.score([RewardSpec("shout")], ["HI", "hi"], ["", ""], {}).rewards["shout"] == [1.0, 0.0]


def test_code_reward_is_registered_lazily():
    assert "code" in rewards.REWARDS
    assert "rewards.code" not in sys.modules or callable(rewards.resolve_reward("code"))


def test_spec_validation():
    with pytest.raises(RewardError, match="timeout_s must be > 0"):
        RewardSpec("math", timeout_s=0)
    with pytest.raises(RewardError, match="weight must be finite"):
        RewardSpec("math", weight=float("inf"))
    import pickle

    spec = RewardSpec("math", weight=0.5, kwargs={"check_timeout_s": 1.0})
    assert pickle.loads(pickle.dumps(spec)) == spec  # specs travel between processes (launchers, checkpoints)


def test_close_leaves_no_worker_behind():
    engine = RewardEngine(num_workers=2, preload=())
    engine.score([RewardSpec(f"{HERE}:spins_forever", timeout_s=0.5)], ["a"], ["p"], {})
    procs = [w.proc for w in engine._pool.workers]
    engine.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        engine.score([RewardSpec("format")], ["a"], ["p"], {})


def _none_nan_inf(completions, **_):
    return [None, float("nan"), float("inf"), 0.5][: len(completions)]


def test_none_nan_and_inf_from_a_reward_are_unscorable():
    from rewards.engine import RewardEngine, RewardSpec

    with RewardEngine(num_workers=1) as engine:
        out = engine.score([RewardSpec(f"{__name__}:_none_nan_inf")], ["a", "b", "c", "d"], ["p"] * 4, {})
    (name,) = out.rewards
    assert out.rewards[name] == [None, None, None, 0.5] and out.total == [None, None, None, 0.5]
    assert out.errors[name] == 2  # NaN and inf; the None was the reward's own choice, not an error
    assert "returned nan" in out.sample_errors[name][1] and out.sample_errors[name][0] is None


@reward_traits(elementwise=True)
def elementwise_extras(completions, *, prompts, answer, **_):
    if "bad" in completions:
        raise ValueError("unreadable")
    return {
        "rewards": [float(c == a) for c, a in zip(completions, answer)],
        "extras": {"seen": [f"{c}|{a}" for c, a in zip(completions, answer)]},
    }


def test_a_batch_scored_in_pieces_equals_one_call(engine):
    """The same rewards, totals, extras, error counts and lines as one `score` of the whole batch; samples added
    early with a different text than the final one are scored again with the final text."""
    specs = [RewardSpec("math"), RewardSpec(f"{HERE}:elementwise_extras", weight=0.5)]
    final = [r"\boxed{4}", "bad", "4", r"\boxed{5}", "x", r"\boxed{4}"]
    columns = {"answer": ["4", "4", "4", "4", "y", "4"]}
    whole = engine.score(specs, final, ["p"] * 6, columns)
    assert whole.errors[f"{HERE}:elementwise_extras"] == 1  # the elementwise worker scored "bad" alone: None

    stream = engine.stream(specs, ["p"] * 6, columns)
    stream.add([3, 0], [final[3], final[0]])
    stream.add([4], ["changed later"])
    stream.add([1], [final[1]])
    pieces = stream.finish(final).result()
    assert pieces.rewards == whole.rewards and pieces.total == whole.total
    assert pieces.extras == whole.extras and pieces.errors == whole.errors and pieces.messages == whole.messages
    assert pieces.extras[f"{HERE}:elementwise_extras/seen"][4] == "x|y"  # re-scored with the final text


def test_score_stream_refuses_group_rewards_and_double_adds(engine):
    with pytest.raises(RewardError, match="elementwise"):
        engine.stream([RewardSpec(f"{HERE}:with_extras")], ["p"], {}).add([0], ["a"])
    stream = engine.stream([RewardSpec("math")], ["p", "p"], {"answer": ["1", "2"]})
    stream.add([0], [r"\boxed{1}"])
    with pytest.raises(RewardError, match="twice"):
        stream.add([0], [r"\boxed{1}"])
    with pytest.raises(RewardError, match="3 completions for 2 prompts"):
        stream.finish(["a", "b", "c"])
    assert engine.elementwise([RewardSpec("math")]) and not engine.elementwise([RewardSpec(f"{HERE}:with_extras")])


def test_shortcut_decided_samples_of_a_stream_match_one_call(engine):
    """math's shortcut decides plain integers when they are added; the rest (here unboxed or junk) run in the
    workers; the final batch equals one call, and a decided sample whose final text differs is decided again."""
    specs = [RewardSpec("math")]
    final = [r"\boxed{4}", r"\boxed{5}", "the answer is 4", r"\boxed{", r"\boxed{4}"]
    columns = {"answer": ["4", "4", "4", "4", "7"]}
    whole = engine.score(specs, final, ["p"] * 5, columns)
    stream = engine.stream(specs, ["p"] * 5, columns)
    stream.add([0, 1, 2, 3], final[:4])
    stream.add([4], [r"\boxed{7}"])  # decided 1.0 now, but the final text is \boxed{4}: 0.0
    pieces = stream.finish(final).result()
    assert pieces.rewards == whole.rewards == {"math": [1.0, 0.0, 1.0, 0.0, 0.0]}
    assert pieces.total == whole.total and pieces.errors == whole.errors
