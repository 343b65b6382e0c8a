"""`rlk2 serve` on loopback, and the `openai` critic backend against it: a real server process, no mock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rewards.critic import OpenAICritic
from rewards.rubric import rubric
from rlk2.critic import generate_texts

pytestmark = pytest.mark.integration  # starts the real `rlk2 serve` CLI on a tiny checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOY = {
    "template": str(ROOT / "configs/critic/toy_prompt.txt"),
    "rubrics": [str(ROOT / "configs/critic/toy_rubric.toml")],
}


@pytest.fixture(scope="module")
def server(tiny_policy):
    """`rlk2 serve CHECKPOINT --port 0` in a subprocess; yields its base URL (…/v1)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "serve", str(tiny_policy), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()  # "rlk2 serve: NAME on http://127.0.0.1:PORT/v1", printed once listening
        assert "http://127.0.0.1:" in line, f"server did not start: {line!r} (exit {proc.poll()})"
        yield line.split(" on ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_and_chat_completion_shape(server, tiny_policy):
    with urllib.request.urlopen(server + "/models", timeout=30) as resp:
        models = json.loads(resp.read())
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_policy.name
    status, out = post(
        server,
        {"messages": [{"role": "user", "content": "2+3=?"}], "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 5},
    )
    assert status == 200 and out["object"] == "chat.completion" and out["model"] == tiny_policy.name
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length") for c in out["choices"])
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] <= 3 * 6


def test_greedy_over_http_equals_greedy_in_process(server, tiny_policy):
    from rlk2.policy import load_policy

    model, tok = load_policy(tiny_policy)
    prompts = ["12+30=?", "7+7=?", "Judge 1+1=? by correct: A=\\boxed{2} B=\\boxed{3}"]
    local = [generate_texts(model, tok, [p], max_new_tokens=10, temperature=0.0, seed=0)[0].text for p in prompts]
    critic = OpenAICritic(server, concurrency=1)  # one request at a time: each is generated alone, as locally
    remote = critic.complete(prompts, max_new_tokens=10, temperature=0.0, seed=0)
    assert [r.text for r in remote] == local and all(r.error is None for r in remote)


def test_concurrent_requests_all_answered(server):
    critic = OpenAICritic(server, concurrency=8)
    out = critic.complete([f"{i}+{i}=?" for i in range(24)], max_new_tokens=6, temperature=1.0, seed=0)
    assert len(out) == 24 and all(r.error is None and isinstance(r.text, str) for r in out)


def test_rubric_reward_through_the_openai_backend(server):
    out = rubric(
        ["\\boxed{3}", "\\boxed{4}", "\\boxed{5}"],
        prompts=["1+2=?"] * 3,
        backend="openai",
        critic={"base_url": server, "timeout_s": 60},
        max_new_tokens=8,
        **TOY,
    )
    assert len(out["rewards"]) == 3
    for r, judgments in zip(out["rewards"], out["extras"]["judgments"]):
        assert len(judgments) == 4 and all(j["error"] is None for j in judgments)  # every HTTP call worked
        assert (r is None) == all(j["verdict"] is None for j in judgments)


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"messages": "hi"}, 400, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, 400, "'temperature' must be"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "'stream' is not supported"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model 'gpt-9' is not served"),
        ({"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 4}, 400, "exceeds the context"),
        (b"{not json", 400, "not valid JSON"),
    ],
)
def test_bad_requests_are_4xx_with_one_line(server, body, status, needle):
    code, out = post(server, body)
    assert code == status and needle in out["error"]["message"] and "\n" not in out["error"]["message"]


def test_client_errors_are_not_retried_and_become_none(server):
    critic = OpenAICritic(server, model="other-model", retries=3, backoff_s=5.0)
    t0 = time.perf_counter()
    (reply,) = critic.complete(["1+1=?"], max_new_tokens=4, temperature=0.0, seed=0)
    assert reply.text is None and reply.error.startswith("HTTP 404") and "(1 attempt)" in reply.error
    assert time.perf_counter() - t0 < 5.0  # no backoff sleep happened


def test_timeouts_and_unreachable_servers_are_retried_then_none(server, tiny_policy):
    slow = OpenAICritic(server, timeout_s=0.001, retries=1, backoff_s=0.01, model=tiny_policy.name)
    (reply,) = slow.complete(["1+1=?"], max_new_tokens=200, temperature=1.0, seed=0)
    assert reply.text is None and "timeout after 0.001 s (2 attempts)" in reply.error
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = OpenAICritic(f"http://127.0.0.1:{port}/v1", model="m", retries=2, backoff_s=0.01, timeout_s=2)
    (reply,) = dead.complete(["x"], max_new_tokens=4, temperature=0.0, seed=0)
    assert reply.text is None and "cannot reach" in reply.error and "(3 attempts)" in reply.error


def test_serve_bad_checkpoint_is_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rlk2.cli", "serve", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("rlk2 serve: error: checkpoint:")
