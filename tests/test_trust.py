"""Runs you can trust: resume that never overwrites, refusals that leave nothing behind, no silent wrong numbers.

One test (or a parametrized group) per row of the fault table these fixes came from; each failed on the code before
them. The CLI runs use a tiny demo model and share one warm-start cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlk2.config import load_config
from rlk2.errors import UserError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
MAX_TASK = "tasks=[{name: max, source: 'builtin:max', max_new_tokens: 8, rewards: [{name: math}], eval_size: 8}]"


def rlk2(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmstart")


def tiny(cache: Path, run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"trainer.steps={steps}",
        "rollout.group_size=4",
        "rollout.prompts_per_step=4",
        "warm_start.steps=5",
        f"warm_start.cache_dir={cache}",
        "eval.samples=1",
        "eval.greedy=false",
        "policy.demo.hidden_size=32",
        "policy.demo.num_hidden_layers=2",
        MAX_TASK,
        *extra,
    ]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line_exit_2(proc: subprocess.CompletedProcess, needle: str) -> str:
    err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    lines = [line for line in err.strip().splitlines() if not line.startswith(("rl:", "warm start"))]
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ 1, 16: resume rules
def test_resume_saves_its_overrides_never_goes_back_and_a_finished_run_is_left_alone(cache, tmp_path):
    run = tmp_path / "r"
    assert rlk2("train", *tiny(cache, run, "trainer.save_every=1")).returncode == 0
    more = rlk2("train", "--resume", str(run), "trainer.steps=3")
    assert more.returncode == 0, more.stderr[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["steps"] == 3  # saved for the next resume
    before = (run / "metrics.jsonl").read_text()
    again = rlk2("train", "--resume", str(run))  # plain: continues the saved config, which is finished
    assert again.returncode == 0 and "already finished at step 3" in again.stdout
    assert (run / "metrics.jsonl").read_text() == before  # no duplicate eval row, nothing rewritten
    one_line_exit_2(rlk2("train", "--resume", str(run), "trainer.steps=2"), "trainer.steps=2 is behind")
    import torch

    for ckpt in (run / "checkpoints").iterdir():  # every checkpoint holds its own step's state
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        assert ckpt.name == f"step-{state['step']}"
    eval_steps = [r["step"] for r in rows(run) if any(k.startswith("eval/") for k in r)]
    assert eval_steps == [0, 2, 3]  # the first run's end, the resumed run's end; in step order


# ------------------------------------------------------------------------------------------ 2: overwrite
def test_overwrite_starts_from_an_empty_directory(cache, tmp_path):
    run = tmp_path / "r"
    assert rlk2("train", *tiny(cache, run, steps=2)).returncode == 0
    proc = rlk2("train", *tiny(cache, run, "run.overwrite=true", "run.seed=5", steps=1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in rows(run)] == [0, 1, 1]  # step-0 eval, step 1, final eval: nothing of the old run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["step-1.jsonl"]
    (run / "notes.txt").write_text("mine")
    one_line_exit_2(rlk2("train", *tiny(cache, run, "run.overwrite=true", steps=1)), "'notes.txt' is not something")
    assert (run / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ 3: the model is frozen
def test_resume_refuses_a_config_that_changes_the_model(cache, tmp_path):
    run = tmp_path / "r"
    assert rlk2("train", *tiny(cache, run, steps=1)).returncode == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["policy"]["demo"]["hidden_size"] = 64
    config["trainer"]["steps"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    one_line_exit_2(rlk2("train", "--resume", str(run)), "policy.demo.hidden_size differs from the run's (32 -> 64)")
    one_line_exit_2(rlk2("train", "--resume", str(run), "policy.demo.hidden_size=32", "run.seed=3"), "run.seed")
    one_line_exit_2(
        rlk2("train", "--resume", str(run), "policy.demo.hidden_size=32", "tasks.0.source=builtin:arith"),
        "tasks' names, sources or eval sizes differ",
    )


# ------------------------------------------------------------------------------------------ 4, 5, 7, 9, 11: values
@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.temperature=0", "eval.temperature"),  # 4: was NaN log-probs and pass@1 0.00
        ("tasks.1.name=max", "task names must be distinct"),  # 5 (the demo's second task renamed to the first's)
        ("optim.lr=-1", "optim.lr"),  # 7
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("trainer.log_every=0", "trainer.log_every"),
        ("tasks.0.weight=0", "tasks[0].weight"),
        ("eval.samples=0", "eval.samples"),
        ("tasks.0.eval_size=0", "tasks[0].eval_size"),
        ("run.seed=-1", "run.seed"),  # 9
        ("policy.demo.hidden_size=97", "policy.demo.hidden_size"),
        ("policy.demo.num_experts_per_tok=9", "policy.demo.num_experts_per_tok"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),  # 11
        ("algo.tau=-1", "algo.tau"),
        ("rollout.temperature=.nan", "rollout.temperature"),
        ("optim.lr=.inf", "optim.lr"),
        ("trainer.max_bad_steps=0", "trainer.max_bad_steps"),
        ("tasks.0.rewards.0.weight=0", None),  # the demo's max task has an overlong penalty: still a gradient
        ("tasks.1.rewards.0.weight=0", "tasks[1].rewards"),  # pyfunc: no penalty, every weight 0
        ("tasks.0.rewards=math", "tasks[0].rewards"),  # 16: the key is named in full
    ],
)
def test_nonsense_values_are_refused_at_load_in_one_line(override, key):
    if key is None:
        load_config(None, [override])
        return
    with pytest.raises(UserError) as err:
        load_config(None, [override, "tasks.1.overlong_penalty=0"] if "tasks.1.rewards" in override else [override])
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["run.dir=/proc/rlk2-x"], "cannot write there"),  # 7
        (["optim.lr=-1"], "optim.lr"),
        (["trainer.trackers=[nope]"], "trainer.trackers"),
    ],
)
def test_refused_starts_leave_no_run_directory(cache, tmp_path, extra, needle):
    run = tmp_path / "r"
    one_line_exit_2(rlk2("train", *tiny(cache, run, *extra)), needle)
    assert not run.exists()


def test_a_run_that_fails_after_writing_leaves_nothing_and_a_retry_works(cache, tmp_path, monkeypatch):
    """A failure after config.yaml/env.json were written (here: the step-0 evaluation raising) removes them."""
    import rlk2.train as loop

    run = tmp_path / "r"
    cfg = load_config(None, tiny(cache, run, steps=1))

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation blew up")

    monkeypatch.setattr(loop, "evaluate_policy", broken)
    with pytest.raises(RuntimeError, match="blew up"):
        loop.train(cfg)
    assert not run.exists()  # a retry ("exists and is not empty") and --resume are both unblocked
    monkeypatch.undo()
    assert loop.train(cfg)["after"]


def test_surrogate_in_a_dataset_row_is_one_line(cache, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "max(1,2,3)=?", "answer": "3"}\n{"prompt": "bad \\ud800", "answer": "1"}\n')
    task = f"tasks=[{{name: t, source: '{data}', rewards: [{{name: math}}], eval_size: 1}}]"
    one_line_exit_2(rlk2("train", *tiny(cache, tmp_path / "r", task)), f"{data}:2: a string holds an invalid")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ 6: held-out overlap
def test_a_held_out_split_that_would_take_every_row_is_refused_and_repeats_are_warned(cache, tmp_path):
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"max({a},1,2)=?", "answer": str(a)}) + "\n" for a in (5, 6, 7, 8)))
    task = f"tasks=[{{name: t, source: '{data}', rewards: [{{name: math}}], eval_size: 4}}]"
    one_line_exit_2(rlk2("train", *tiny(cache, tmp_path / "r", task)), "none is left to train on")
    data.write_text("".join(json.dumps({"prompt": f"max({a},1,2)=?", "answer": str(a)}) + "\n" for a in (5, 6, 5, 6)))
    task = f"tasks=[{{name: t, source: '{data}', rewards: [{{name: math}}], eval_size: 2}}]"
    proc = rlk2("train", *tiny(cache, tmp_path / "r2", task, "warm_start.enabled=false", steps=1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 of its 2 held-out prompts also occur among its training prompts" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ 8: no gold completions
def test_a_task_without_completions_and_no_policy_path_is_one_line_and_leaves_no_cache(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"max({a},1,2)=?", "answer": str(a)}) + "\n" for a in range(5, 30)))
    cache = tmp_path / "cache"
    task = f"tasks=[{{name: t, source: '{data}', rewards: [{{name: math}}], eval_size: 4}}]"
    one_line_exit_2(rlk2("train", *tiny(cache, tmp_path / "r", task)), "no task row has a gold `completion`")
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ 9: run.dir is a file
def test_run_dir_that_is_a_file(cache, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    one_line_exit_2(rlk2("train", *tiny(cache, target)), "is not a directory")
    assert target.read_text() == "x"


# ------------------------------------------------------------------------------------------ 10: damaged checkpoint
def test_resume_falls_back_to_the_newest_intact_checkpoint(cache, tmp_path):
    run = tmp_path / "r"
    assert rlk2("train", *tiny(cache, run, "trainer.save_every=1", "trainer.keep_last=0", steps=2)).returncode == 0
    state = run / "checkpoints" / "step-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    proc = rlk2("train", "--resume", str(run), "trainer.steps=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint step-2 is damaged" in proc.stdout and "resuming from step-1" in proc.stdout
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3]  # step 2 re-done from step 1
    weights = run / "checkpoints" / "step-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for ckpt in ("step-2", "step-3"):
        (run / "checkpoints" / ckpt / "trainer_state.pt").write_bytes(b"junk")
    err = one_line_exit_2(rlk2("train", "--resume", str(run), "trainer.steps=4"), "no intact checkpoint")
    assert "checkpoint step-1 is damaged" in err and "policy.path" not in err


# ------------------------------------------------------------------------------------------ 11: prompt length
def test_prompts_longer_than_the_context_are_refused_before_training(cache, tmp_path):
    data = tmp_path / "long.jsonl"
    rows_ = [{"prompt": f"max({a},1,2)=?", "answer": str(a), "completion": f"\\boxed{{{a}}}"} for a in range(10, 40)]
    rows_[20]["prompt"] = "max(1,2,3)=? " * 60  # ~300 tokens; the demo's context is 256
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    task = f"tasks=[{{name: t, source: '{data}', rewards: [{{name: math}}], eval_size: 4}}]"
    one_line_exit_2(rlk2("train", *tiny(cache, tmp_path / "r", task)), "exceeds the model's context of 256")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ 12: rlk2 score
@pytest.mark.parametrize(
    "args, stdin, needle",
    [
        (["--reward", "math"], b'{"completion": "\\\\boxed{1}", "answer": "1"}\n\xff\xfe\n', "<stdin>:2: not UTF-8"),
        (["--reward", "math", "--workers", "100000"], b"", "--workers: 100000 is not in 1..64"),
        (["--reward", f"{DATA / 'fault_rewards.py'}:always_raises"], b'{"completion": "x"}\n', "failed on every"),
        (["--reward", f"{DATA / 'fault_rewards.py'}:no_arguments"], b'{"completion": "x"}\n', "cannot take the"),
    ],
)
def test_score_refusals(args, stdin, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "rlk2.cli", "score", *args], input=stdin, capture_output=True, timeout=120
    )
    one_line_exit_2(proc, needle)


def test_score_a_string_is_not_a_number():
    proc = subprocess.run(
        [sys.executable, "-m", "rlk2.cli", "score", "--reward", f"{DATA / 'fault_rewards.py'}:returns_text"],
        input=b'{"completion": "x"}\n{"completion": "y"}\n',
        capture_output=True,
        timeout=120,
    )
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert out[0]["reward"] is None and "not a number" in out[0]["error"]
    assert out[1]["reward"] == 1.0


# ------------------------------------------------------------------------------------------ 13: rlk2 eval --out
def test_eval_out_is_checked_before_evaluating(tiny_policy, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    started = time.perf_counter()
    one_line_exit_2(rlk2("eval", str(tiny_policy), "--tasks", "arith", "--out", str(target)), "not a directory")
    used = tmp_path / "used"
    used.mkdir()
    (used / "report.json").write_text("{}")
    one_line_exit_2(rlk2("eval", str(tiny_policy), "--tasks", "arith", "--out", str(used)), "is not empty")
    assert time.perf_counter() - started < 60  # refused up front, not after an evaluation


# ------------------------------------------------------------------------------------------ 14: rlk2 serve
@pytest.fixture(scope="module")
def server(tiny_policy):
    from rlk2.policy import load_policy
    from rlk2.serve import Generator, make_server

    model, tok = load_policy(tiny_policy)
    engine = Generator(model, tok, max_batch=8)
    srv = make_server(engine, "tiny", "127.0.0.1", 0, read_timeout_s=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    engine.close()


def raw_http(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR) if not data.endswith(b"KEEP") else None
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def post(body: bytes, length: str | None = None) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length if length is not None else len(body)}\r\n\r\n".encode()
        + body
    )


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (post(b"{}", length="abc"), b"400"),
        (post(b"[" * 400_000), b"400"),
        (post(b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), b"400"),
    ],
)
def test_serve_refuses_malformed_requests_with_4xx(server, request_bytes, status):
    reply = raw_http(server, request_bytes)
    assert reply.split(b" ", 2)[1] == status, reply[:200]


def test_serve_short_body_times_out_instead_of_hanging(server):
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(post(b'{"messages": []}', length="100"))  # 16 bytes of a promised 100
        reply = sock.recv(65536)
    assert reply.split(b" ", 2)[1] == b"408" and time.perf_counter() - started < 8


# ------------------------------------------------------------------------------------------ 15: Ctrl-C
def test_two_quick_interrupts_stop_cleanly_with_a_checkpoint(cache, tmp_path):
    run = tmp_path / "r"
    assert rlk2("train", *tiny(cache, run, steps=1)).returncode == 0  # warm start cached, run finished
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "train", "--resume", str(run), "trainer.steps=400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and sum('"loss"' in line for line in (run / "metrics.jsonl").read_text().splitlines()) < 5
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    out, err = out.decode(), err.decode()
    # The second signal lands inside a step (its update undone: the step before is checkpointed) or after the first
    # one's graceful stop has already checkpointed (then it only cuts the exit short): either way no traceback,
    # and the newest checkpoint is the last step that was logged.
    assert proc.returncode in (0, 130), err[-2000:]
    assert "Traceback" not in err and "cannot schedule" not in err, err[-3000:]
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    logged = max(r["step"] for r in rows(run) if "loss" in r)
    assert last == logged >= 5
    assert f"step {last} is checkpointed" in err or f"stopped by SIGINT after step {last}" in out
    resumed = rlk2("train", "--resume", str(run), f"trainer.steps={last + 1}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in rows(run) if "loss" in r][-2:] == [last, last + 1]


def test_interrupting_the_warm_start_leaves_no_temporaries(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "train", *tiny(cache, tmp_path / "r"), "warm_start.steps=2000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (cache.exists() and any(cache.iterdir())):
        time.sleep(0.2)
    time.sleep(3)  # inside the SFT
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert not any(cache.iterdir()), list(cache.iterdir())  # no `<hash>-base.tmp*`, no `<hash>.tmp*`
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ 16: minor
def test_zero_steps_writes_one_step_zero_evaluation(cache, tmp_path):
    run = tmp_path / "r"
    assert rlk2("train", *tiny(cache, run, steps=0)).returncode == 0
    assert [r["step"] for r in rows(run)] == [0]


def test_a_bad_row_is_named_by_its_line_in_the_file(cache, tmp_path):
    data = tmp_path / "rows.jsonl"
    lines = [json.dumps({"prompt": f"max({a},1,2)=?", "answer": str(a)}) for a in range(10, 20)]
    lines[7] = json.dumps({"prompt": "max(1,2,3)=?"})  # line 8 has no answer; it is in the training split
    data.write_text("\n".join(lines) + "\n")
    task = f"tasks=[{{name: t, source: '{data}', rewards: [{{name: math}}], eval_size: 4}}]"
    one_line_exit_2(
        rlk2("train", *tiny(cache, tmp_path / "r", task, "warm_start.enabled=false")),
        f"{data}:8 has no 'answer' column",
    )


# ------------------------------------------------------------------------------------------ fuzzing rlk2 serve
BODIES = st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "system", "tool", 3]),
                        "content": st.text(max_size=20) | st.integers(),
                    }
                ),
                max_size=2,
            )
        },
        optional={
            "max_tokens": st.integers(-5, 10) | st.text(max_size=3),
            "n": st.integers(-1, 3),
            "temperature": st.floats(allow_nan=True),
            "stop": st.text(max_size=3) | st.lists(st.integers()),
        },
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES, st.sampled_from([None, "0", "-1", "abc", "99999999999", "5"]))
def test_serve_answers_any_request_below_500_without_hanging(server, body, length):
    reply = raw_http(server, post(body, length=length), timeout=15)
    status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/") else b""
    assert status.isdigit() and int(status) < 500, reply[:300]
