"""Environments and the episode loop (DESIGN.md 2.6): tool-call parsing, the built-in tools, checking an environment
class, token-in/token-out rendering, scripted episodes with every fault the issue names, and recorded log-probs
that equal the training forward's over multi-turn episodes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlk2.envs import (
    PARSERS,
    SampledTurns,
    ScriptedTurns,
    ToolCall,
    ToolRunner,
    calculator,
    continuation_ids,
    format_hermes,
    load_env,
    parse_hermes,
    play,
    run_episodes,
    start_episodes,
    unscorable,
)
from rlk2.errors import UserError
from rlk2.policy import load_policy
from rlk2.policy.demo import build_tokenizer
from rlk2.rollout import encode_messages, policy_logprobs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ environments for tests
class Vault:
    """Answer with the value stored under the key the user names."""

    def reset(self, **row):
        self.store = row["store"]
        return f"What is stored under {row['key']}?"

    def lookup(self, key: str) -> str:
        """Return the value stored under a key.

        Args:
            key: the key to look up
        """
        return self.store.get(key, "no such key")

    async def count(self, n: int) -> str:
        """Count to n.

        Args:
            n: how far
        """
        await asyncio.sleep(0)
        return " ".join(str(i) for i in range(1, n + 1))

    def explode(self) -> str:
        """Always fails."""
        raise RuntimeError("kaboom")

    def spin(self) -> str:
        """Never answers in time."""
        time.sleep(5)
        return "late"

    def reward(self, messages, **row):
        return float(f"\\boxed{{{row['store'][row['key']]}}}" in messages[-1]["content"])


class BrokenReset(Vault):
    """Vault whose reset fails."""

    def reset(self, **row):
        raise KeyError("store")


class BrokenReward(Vault):
    """Vault whose reward fails."""

    def reward(self, messages, **row):
        raise ValueError("cannot judge")


class NoDocTool:
    def reset(self, **row):
        return "hi"

    def tool(self, x: int) -> str:
        return str(x)


class NotAnEnv:
    def step(self):
        """Step."""


ROW = {"key": "a", "store": {"a": "42"}}


def call(name: str, **arguments) -> str:
    return format_hermes(name, arguments)


@pytest.fixture
def runner():
    r = ToolRunner(timeout_s=1.0)
    yield r
    r.close()


@pytest.fixture(scope="module")
def demo_tok():
    return build_tokenizer(
        ["Q: What is 12*34?\nA: ", call("calculator", expression="12*34"), "R: 408\nA: \\boxed{408}"]
    )


def scripted(spec, rows, scripts, runner, tok, **kw):
    return run_episodes(
        ScriptedTurns(tok, scripts), tok, spec, rows, max_turns=kw.pop("max_turns", 6), runner=runner, **kw
    )


# ------------------------------------------------------------------------------------------ parsing
def test_hermes_calls_are_parsed_in_order_and_malformed_ones_become_errors():
    text = (
        "thinking... " + call("lookup", key="a") + " and " + '<tool_call>{"name": "calc", "arguments": "{\\"x\\": 1}"}'
        "</tool_call><tool_call>{nope}</tool_call><tool_call>[1]</tool_call>"
        '<tool_call>{"name": "f", "arguments": 3}</tool_call><tool_call>{"name": "open"'
    )
    calls = parse_hermes(text)
    assert [(c.name, c.arguments, c.error is None) for c in calls[:2]] == [
        ("lookup", {"key": "a"}, True),
        ("calc", {"x": 1}, True),  # arguments written as a JSON string
    ]
    assert "not valid JSON" in calls[2].error
    assert "needs" in calls[3].error
    assert calls[4].name == "f" and "JSON object" in calls[4].error
    assert len(calls) == 5  # the unclosed block is not a call
    assert parse_hermes("no calls here") == []


def test_calculator_evaluates_arithmetic_and_refuses_the_rest():
    assert calculator("123 * 456") == "56088"
    assert calculator("(7 + 3) / 4") == "2.5"
    assert calculator("2^10") == "1024"
    assert calculator("sqrt(16) + abs(-2)") == "6"
    assert calculator("1/0") == "error: division by zero"
    assert calculator("__import__('os').system('true')").startswith("error:")
    assert calculator("9**9**9").startswith("error:")  # refused, not computed for minutes
    assert calculator("1 +").startswith("error:")


# ------------------------------------------------------------------------------------------ loading
def test_an_environment_class_gives_its_public_methods_as_tools_with_schemas():
    spec = load_env(f"{ROOT / 'tests' / 'test_envs.py'}:Vault", tools=["calculator"])  # a file path works too
    assert spec.tool_names == ["count", "explode", "lookup", "spin", "calculator"]
    lookup = next(s for s in spec.schemas if s["function"]["name"] == "lookup")
    assert lookup["function"]["parameters"]["properties"]["key"]["type"] == "string"
    assert spec.has_reward
    assert load_env("rlk2.envs.builtin:Question").tool_names == []


@pytest.mark.parametrize(
    "spec, kw, message",
    [
        ("test_envs:NotAnEnv", {}, "no reset"),
        ("test_envs:ROW", {}, "is not a class"),
        ("test_envs:NoDocTool", {}, "docstring"),
        ("test_envs:Vault", {"tools": ["shell"]}, "not a built-in tool"),
        ("test_envs:Vault", {"parser": "xml"}, "tool_parser 'xml' is unknown"),
        ("no_such_module_xyz:Env", {}, "cannot import"),
        ("test_envs:Nope", {}, "no attribute"),
        ("missing/file.py:Env", {}, "does not exist"),
        ("nothing", {}, "entry point"),
    ],
)
def test_what_is_not_an_environment_is_one_line(spec, kw, message):
    with pytest.raises(UserError, match=message) as info:
        load_env(spec, **kw)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ rendering
def test_tool_answers_are_tokenised_as_the_chat_template_renders_them(demo_tok):
    """Token in, token out: prompt + the turn's tokens (EOS included) + the continuation is exactly the template's
    rendering of the conversation, so nothing before a turn is ever re-tokenised."""
    messages = [{"role": "user", "content": "What is 12*34?"}]
    turn = call("calculator", expression="12*34")
    answer = [{"role": "tool", "content": "408"}]
    joined = (
        encode_messages(demo_tok, messages)
        + demo_tok(turn, add_special_tokens=False)["input_ids"]
        + [demo_tok.eos_token_id]
        + continuation_ids(demo_tok, answer, chat_template=True)
    )
    whole = encode_messages(demo_tok, [*messages, {"role": "assistant", "content": turn}, *answer])
    assert joined == whole
    assert demo_tok.decode(continuation_ids(demo_tok, answer, chat_template=True)) == "R: 408\nA: "


def test_continuation_follows_a_chatml_template(tmp_path):
    pytest.importorskip("gguf")  # the dev extra installs it; CI has it
    from tiny_gguf import write_tiny_llama

    _, tok = load_policy(write_tiny_llama(tmp_path / "m" / "tiny.gguf"))
    ids = continuation_ids(tok, [{"role": "tool", "content": "42"}], chat_template=True)
    assert tok.decode(ids) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------ scripted episodes
def test_a_scripted_episode_calls_a_tool_and_the_environment_scores_it(runner, demo_tok):
    spec = load_env("test_envs:Vault")
    ro, (ep,) = scripted(spec, [ROW], [[call("lookup", key="a"), "\\boxed{42}"]], runner, demo_tok)
    assert [m["role"] for m in ep.messages] == ["user", "assistant", "tool", "assistant"]
    assert ep.messages[2]["content"] == "42"
    assert (ep.turns, ep.tool_calls, ep.tool_errors, ep.truncated, ep.reward) == (2, 1, 0, False, 1.0)
    # one Rollout row: the policy's two turns carry loss, the tool's answer between them does not
    policy = ro.loss_mask[0].tolist()
    first_turn = len(demo_tok(ep.messages[1]["content"], add_special_tokens=False)["input_ids"]) + 1
    tool_tokens = len(continuation_ids(demo_tok, [ep.messages[2]], chat_template=True))
    assert policy[:first_turn] == [1] * first_turn
    assert policy[first_turn : first_turn + tool_tokens] == [0] * tool_tokens
    assert ro.completion_mask[0].sum() == len(policy) == ro.completion_ids.shape[1]
    assert ro.num_tokens.tolist() == [sum(policy)]
    assert ro.texts == ["\\boxed{42}"]


def test_tool_faults_are_observations_and_the_episode_goes_on(runner, demo_tok):
    spec = load_env("test_envs:Vault", tools=["calculator"])
    script = [
        "<tool_call>{bad json}</tool_call>",
        call("nope"),
        call("lookup", key=3),
        call("lookup"),
        call("lookup", key="a", extra=1),
        call("explode"),
        call("spin") + call("count", n=3) + call("calculator", expression="6*7"),
        "\\boxed{42}",
    ]
    _, (ep,) = scripted(spec, [ROW], [script], runner, demo_tok, max_turns=10)
    answers = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert "not valid JSON" in answers[0]
    assert "unknown tool 'nope'" in answers[1]
    assert "must be string, not int" in answers[2]
    assert "missing argument 'key'" in answers[3]
    assert "unknown argument 'extra'" in answers[4]
    assert "RuntimeError: kaboom" in answers[5]
    assert "timed out after 1 s" in answers[6]
    assert answers[7:] == ["1 2 3", "42"]  # an async tool, and the built-in calculator, in the same round
    assert (ep.tool_calls, ep.tool_errors, ep.reward) == (9, 7, 1.0)


def test_a_failing_environment_makes_the_episode_unscorable_never_zero(runner, demo_tok):
    episodes = []
    for name in ("BrokenReset", "BrokenReward"):
        _, (ep,) = scripted(load_env(f"test_envs:{name}"), [ROW], [["\\boxed{42}"]], runner, demo_tok)
        episodes.append(ep)
    assert episodes[0].error.startswith("reset raised KeyError") and episodes[0].turns == 0
    assert episodes[1].reward is None and "cannot judge" in episodes[1].reward_error
    assert unscorable(episodes) == [True, True]


def test_turn_limits_end_episodes_as_truncated(runner, demo_tok):
    spec = load_env("test_envs:Vault")
    lookups = [call("lookup", key="a")] * 5
    ro, eps = scripted(spec, [ROW, ROW], [lookups, ["\\boxed{42}"]], runner, demo_tok, max_turns=3)
    assert (eps[0].turns, eps[0].truncated) == (3, True)  # still calling when the turns ran out
    assert (eps[1].turns, eps[1].truncated) == (1, False)
    assert ro.truncated.tolist() == [True, False]


# ------------------------------------------------------------------------------------------ sampled episodes
class Echo:
    """Every turn is answered by the `echo` tool (the test parser below calls it whatever the policy wrote)."""

    def reset(self, **row):
        return row["prompt"]

    def echo(self, text: str) -> str:
        """Say it back.

        Args:
            text: what to say
        """
        return text


def _always_echo(text: str) -> list[ToolCall]:
    return [ToolCall("echo", {"text": "3+4"})]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_equal_the_training_forward_over_multi_turn_episodes(tiny_policy, runner, temperature):
    PARSERS["always_echo"] = _always_echo
    try:
        spec = load_env("test_envs:Echo", parser="always_echo")
    finally:
        del PARSERS["always_echo"]
    model, tok = load_policy(tiny_policy)
    # Turns end quickly: many token ids count as EOS, so most turns are complete and get a tool answer.
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(10, len(tok), 3)]
    rows = [{"prompt": p} for p in ["1+2=?", "45+67=?", "9+99=?", "12+3=?"] for _ in range(4)]
    turns = SampledTurns(model, tok, max_new_tokens=6, temperature=temperature, record_routing=True)
    ro, episodes = run_episodes(turns, tok, spec, rows, max_turns=3, runner=runner, seed=5)
    assert max(e.turns for e in episodes) == 3 and sum(e.tool_calls for e in episodes) > len(rows)
    logp, _ = policy_logprobs(model, ro, temperature=temperature)
    policy = ro.loss_mask.bool()
    assert (logp - ro.old_logp)[policy].abs().max().item() < 1e-4
    tool = ro.completion_mask.bool() & ~policy
    assert tool.any() and torch.all(ro.old_logp[tool] == 0)  # tool tokens: attended to, no log-prob, no loss
    # Router replay covers every fed token of every turn: all real positions have experts, except the very last
    # token of each episode (sampled, never fed back).
    routes = ro.routed_experts  # [L, B, P+T, k]
    real = torch.cat([ro.prompt_mask, ro.completion_mask], dim=1).bool()
    last = real.long().cumsum(1).eq(real.sum(1, keepdim=True)) & real
    assert torch.all(routes[:, real & ~last] >= 0)
    assert torch.all(routes[:, ~real] == -1)


def echo_policy(tiny_policy):
    model, tok = load_policy(tiny_policy)
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(10, len(tok), 3)]  # short turns
    PARSERS["always_echo"] = _always_echo
    try:
        spec = load_env("test_envs:Echo", parser="always_echo")
    finally:
        del PARSERS["always_echo"]
    return model, tok, spec


def test_episodes_do_not_depend_on_the_rest_of_the_batch(tiny_policy, runner):
    model, tok, spec = echo_policy(tiny_policy)
    rows = [{"prompt": "1+2=?"}, {"prompt": "45+67=?"}, {"prompt": "9+99=?"}]
    seeds = [11, 22, 33]
    turns = SampledTurns(model, tok, max_new_tokens=6)
    both = run_episodes(turns, tok, spec, rows, max_turns=3, runner=runner, seeds=seeds)
    alone = run_episodes(turns, tok, spec, rows[1:2], max_turns=3, runner=runner, seeds=seeds[1:2])
    assert both[1][1].messages == alone[1][0].messages


def test_a_paused_episode_resumes_where_it_stopped(tiny_policy, runner):
    """Partial rollouts: an episode paused at the step's token budget and continued later (same weights) is the
    episode an uncut run plays, token for token; what was sampled before the pause is marked stale."""
    model, tok, spec = echo_policy(tiny_policy)
    rows = [{"prompt": p} for p in ["1+2=?", "45+67=?", "9+99=?", "12+3=?"] for _ in range(2)]
    seeds = list(range(100, 100 + len(rows)))
    turns = SampledTurns(model, tok, max_new_tokens=6)
    whole = run_episodes(turns, tok, spec, rows, max_turns=3, runner=runner, seeds=seeds)[1]
    cut = start_episodes(spec, rows, tok, describe="none", chat_template=True, seeds=seeds)
    paused = play(turns, tok, spec, cut, max_turns=3, runner=runner, step_budget=1)
    assert paused and all(not e.done and e.turns == 1 for e in paused)
    assert all(e.done for e in cut if e not in paused)
    for e in paused:
        e.resume()
    assert play(turns, tok, spec, cut, max_turns=3, runner=runner) == []
    assert [e.tokens for e in cut] == [e.tokens for e in whole]
    assert sum((e.logp for e in cut), []) == pytest.approx(sum((e.logp for e in whole), []), abs=1e-5)
    for e in paused:
        assert e.resumed and 0 < sum(e.stale) < sum(e.policy)  # the first turn's tokens, not the later ones
        assert all(p == 1 for p, st in zip(e.policy, e.stale) if st)  # only policy tokens are stale
    assert not any(any(e.stale) for e in cut if e not in paused)


# ------------------------------------------------------------------------------------------ rlk2 episode
def rlk2(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlk2.cli", *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_rlk2_episode_replays_scripted_turns(tmp_path):
    lines = [
        {"row": {**ROW, "answer": "42"}, "assistant": [call("lookup", key="a"), "\\boxed{42}"]},
        {"row": {**ROW, "answer": "42"}, "assistant": ["\\boxed{7}"]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    env = f"{ROOT / 'tests' / 'test_envs.py'}:Vault"
    proc = rlk2("episode", "--env", env, "--input", str(path), "--reward", "math")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [(o["reward"], o["rewards"]["math"], o["turns"], o["tool_calls"]) for o in out] == [
        (1.0, 1.0, 2, 1),
        (0.0, 0.0, 1, 0),
    ]
    assert out[0]["messages"][2] == {"role": "tool", "name": "lookup", "content": "42"}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"row": 3, "assistant": []}', "<stdin>:2: field 'row' must be an object"),
        ('{"row": {}, "assistant": "hi"}', "<stdin>:2: field 'assistant' must be a list of strings"),
        ("{not json", "<stdin>:2"),
    ],
)
def test_rlk2_episode_refuses_a_bad_line_before_running_anything(tmp_path, line, message):
    good = json.dumps({"row": ROW, "assistant": ["hi"]})
    proc = rlk2("episode", "--env", f"{ROOT / 'tests' / 'test_envs.py'}:Vault", stdin=f"{good}\n{line}\n")
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_rlk2_episode_refuses_a_class_that_is_not_an_environment():
    proc = rlk2("episode", "--env", f"{ROOT / 'tests' / 'test_envs.py'}:NotAnEnv", stdin="")
    assert proc.returncode == 2 and "no reset" in proc.stderr


# ------------------------------------------------------------------------------------------ the python tool
@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker), "bwrap"])
def sandbox(request, monkeypatch):
    from rlk2.envs.tools import close_sandbox
    from sandboxes.testing import require

    require(request.param)
    monkeypatch.setenv("RLK2_SANDBOX_BACKEND", request.param)
    monkeypatch.delenv("RLK2_SANDBOX_ENGINES", raising=False)
    close_sandbox()
    yield request.param
    close_sandbox()


def test_the_python_tool_runs_code_in_the_sandbox_and_cuts_what_spins(sandbox, runner, demo_tok):
    from rlk2.envs.tools import python

    assert python("print(6 * 7)") == "42"
    assert "ZeroDivisionError" in python("1 / 0")
    assert "[timeout]" in python("while True:\n    pass")  # cut by the sandbox's wall clock
    grabbed = python("x = bytearray(8 * 1024**3)\nprint('allocated')")
    assert "allocated" not in grabbed and ("MemoryError" in grabbed or "[memory_exceeded]" in grabbed)
    # As an episode's tool: the answer comes back as the tool message.
    spec = load_env("rlk2.envs.builtin:Question", tools=["python"])
    _, (ep,) = scripted(
        spec, [{"prompt": "6*7?"}], [[call("python", code="print(6*7)"), "\\boxed{42}"]], runner, demo_tok
    )
    assert ep.messages[2]["content"] == "42" and ep.tool_errors == 0
