"""`rollout.engine: server`: `rlk2 serve`'s completions and weight-push routes, the client, and training through it
(a real server process on loopback, no mock), with its faults: a server that dies, one that answers nonsense."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from rlk2.config import load_config
from rlk2.data import builtin_split
from rlk2.distributed import sequence_seeds
from rlk2.errors import UserError
from rlk2.policy import load_policy
from rlk2.rollout import encode_prompts, generate_rollouts, policy_logprobs
from rlk2.rollout.server import EngineUnavailable, NcclSync, RolloutServer
from rlk2.train import train

pytestmark = pytest.mark.integration  # starts the real `rlk2 serve` CLI on a tiny checkpoint

ROOT = Path(__file__).resolve().parent.parent


def length_parity(completions: list[str], **_) -> list[float]:
    """A reward that varies within a group even for a random policy, so the loss and the gradient are not zero."""
    return [float(len(c) % 2) for c in completions]


def start_server(checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "serve", str(checkpoint), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()  # "rlk2 serve: NAME on http://127.0.0.1:PORT/v1", printed once listening
    assert "http://127.0.0.1:" in line, f"server did not start: {line!r} (exit {proc.poll()})"
    return proc, line.split(" on ")[1].strip()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_policy):
    proc, url = start_server(tiny_policy, "--weight-updates")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return load_policy(str(tiny_policy), dtype="float32", what="checkpoint")


def prompts(tokenizer, n: int = 3, k: int = 4) -> list[list[int]]:
    rows = builtin_split("max", "train")[:n]
    ids = encode_prompts(tokenizer, [r["prompt"] for r in rows], chat_template=False)
    return [i for i in ids for _ in range(k)]


def post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_samples_what_the_local_engine_samples_with_the_trainers_logprobs(server, policy):
    model, tok = policy
    ids, seeds = prompts(tok), sequence_seeds(11, 0, 3, 4)
    remote = RolloutServer(server).generate(tok, model, ids, max_new_tokens=12, temperature=1.0, top_p=1.0, seeds=seeds)
    local = generate_rollouts(model, tok, ids, max_new_tokens=12, temperature=1.0, seeds=seeds)
    assert torch.equal(remote.completion_ids, local.completion_ids)
    assert torch.equal(remote.completion_mask, local.completion_mask)
    assert torch.equal(remote.truncated, local.truncated)
    assert remote.texts == local.texts
    with torch.no_grad():
        trainer, _ = policy_logprobs(model, remote, temperature=1.0)
    mask = remote.completion_mask.bool()
    assert mask.sum() > 12  # something was generated
    assert (remote.old_logp - trainer)[mask].abs().max() < 1e-4  # float32 on both sides


def test_completion_request_forms(server, policy):
    _, tok = policy
    ids = prompts(tok, n=2, k=1)
    status, reply = post(server + "/completions", {"prompt": ids, "n": 2, "max_tokens": 5, "return_token_ids": True})
    assert status == 200, reply
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert [c["prompt_token_ids"] for c in reply["choices"]] == [ids[0], ids[0], ids[1], ids[1]]
    assert all(1 <= len(c["token_ids"]) <= 5 and c["logprobs"] is None for c in reply["choices"])
    assert reply["weights_version"] == 0 and reply["usage"]["completion_tokens"] >= 4
    status, reply = post(server + "/completions", {"prompt": "Q: 3 5\nA: ", "max_tokens": 4, "logprobs": 0})
    assert status == 200, reply
    (choice,) = reply["choices"]
    assert "token_ids" not in choice
    assert len(choice["logprobs"]["token_logprobs"]) == len(choice["logprobs"]["tokens"]) >= 1
    assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": 5}, "'prompt' must be"),
        ({"prompt": [[]]}, "'prompt' must be"),
        ({"prompt": [[3, 10**9]]}, "prompt[0][1]: token id 1000000000"),
        ({"prompt": [[3, 4]], "n": 2, "seeds": [1]}, "'seeds' must be a list of 2"),
        ({"prompt": [[3, 4]], "seeds": ["x"]}, "seeds[0]"),
        ({"prompt": [[3, 4]], "stop": "A", "return_token_ids": True}, "'stop' with 'return_token_ids'"),
        ({"prompt": [[3, 4]], "echo": True}, "'echo'"),
        ({"prompt": [[3, 4]], "logprobs": 99}, "'logprobs'"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(server, body, needle):
    status, reply = post(server + "/completions", body)
    assert status == 400 and needle in reply["error"]["message"], reply


def test_weight_push_changes_what_the_server_samples_and_bad_pushes_change_nothing(server, policy, tiny_policy):
    model, tok = policy
    ids, seeds = prompts(tok), sequence_seeds(5, 0, 3, 4)
    client = RolloutServer(server, retries=0)
    before = client.generate(tok, model, ids, max_new_tokens=10, temperature=1.0, top_p=1.0, seeds=seeds)
    weights = server.removesuffix("/v1") + "/rlk2/weights"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    one = next(iter(state))
    bad = [
        (b"not a safetensors file", "not a safetensors file"),
        (safetensors.torch.save({"no.such.tensor": torch.zeros(2)}), "'no.such.tensor': the served model has no"),
        (safetensors.torch.save({one: torch.zeros(3, 1)}), f"'{one}': shape [3, 1]"),
    ]
    for body, needle in bad:
        status, reply = post(weights, body, {"X-Weights-Version": "9"})
        assert status == 400 and needle in reply["error"]["message"], reply
    with urllib.request.urlopen(weights, timeout=30) as resp:
        assert json.loads(resp.read())["weights_version"] == 0  # none of them was applied
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.7)
        assert client.push(model, 3) > 0 and client.version == 3
        after = client.generate(tok, model, ids, max_new_tokens=10, temperature=1.0, top_p=1.0, seeds=seeds)
        local = generate_rollouts(model, tok, ids, max_new_tokens=10, temperature=1.0, seeds=seeds)
        assert torch.equal(after.completion_ids, local.completion_ids)
        assert not torch.equal(after.old_logp, before.old_logp)
        # Another client pushes over ours: the next sampling sees the version it did not push and refuses.
        assert RolloutServer(server).push(model, 7) > 0
        with pytest.raises(EngineUnavailable, match="holds weights version 7, not the 3 this trainer pushed"):
            client.generate(tok, model, ids, max_new_tokens=4, temperature=1.0, top_p=1.0, seeds=seeds)
    finally:
        model.load_state_dict(state)
        RolloutServer(server).push(model, 0)


def test_weight_push_is_refused_unless_the_server_allows_it(tiny_policy, policy):
    proc, url = start_server(tiny_policy)
    try:
        with pytest.raises(EngineUnavailable, match="refused .*HTTP 403.*--weight-updates"):
            RolloutServer(url).push(policy[0], 1)
    finally:
        stop(proc)


class _JsonServer(BaseHTTPRequestHandler):
    """A stand-in inference server: silent, answers JSON."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Nonsense(_JsonServer):
    """An inference server that lists a model and answers every completion with the wrong number of choices."""

    calls = 0

    def do_GET(self) -> None:
        self._send({"data": [{"id": "nonsense"}]})

    def do_POST(self) -> None:
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send({"choices": [{"index": 0, "token_ids": [1], "logprobs": {"token_logprobs": [0.5]}}]})


def test_malformed_replies_are_retried_then_one_line(policy):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Nonsense)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = RolloutServer(f"http://127.0.0.1:{httpd.server_address[1]}/v1", retries=2, backoff_s=0.01)
        assert client.check() == "nonsense"
        model, tok = policy
        with pytest.raises(EngineUnavailable, match=r"malformed reply \(1 choices for 8\)") as err:
            client.generate(tok, model, prompts(tok, 2), max_new_tokens=4, temperature=1.0, top_p=1.0, seeds=[0] * 8)
        assert "\n" not in str(err.value) and _Nonsense.calls == 3
    finally:
        httpd.shutdown()


class _VllmLike(_JsonServer):
    """What vLLM's completions endpoint answers with `return_token_ids`: the sampled ids and their log-probs, no
    weights version; records the request bodies."""

    bodies: list[dict] = []

    def do_GET(self) -> None:
        self._send({"data": [{"id": "vllm-model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        n, prompts = body["n"], body["prompt"]
        choices = [
            {
                "index": i,
                "text": "",
                "prompt_token_ids": prompts[i // n],
                "token_ids": [5, 6],
                "logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5, -1.25]},
                "finish_reason": "length",
            }
            for i in range(n * len(prompts))
        ]
        self._send({"id": "cmpl-1", "object": "text_completion", "model": "vllm-model", "choices": choices})


class _FakeTrlClient:
    """Stands in for TRL's VLLMClient (which needs CUDA and vLLM): records what the push does, in order."""

    def __init__(self) -> None:
        self.calls: list = []

    @contextlib.contextmanager
    def weight_update(self):
        self.calls.append("start")
        yield
        self.calls.append("finish")

    def update_named_params(self, metadata, named_params) -> None:
        self.calls.append(("update", metadata, {name: t.clone() for name, t in named_params}))

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


class _FakeSync(NcclSync):
    def __init__(self) -> None:
        super().__init__("unused")
        self.client = _FakeTrlClient()

    def device(self) -> torch.device:
        return torch.device("cpu")


def test_vllm_kind_broadcasts_every_tensor_through_trls_client_and_samples_without_versions(policy):
    model, tok = policy
    sync = _FakeSync()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _VllmLike)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = RolloutServer(f"http://127.0.0.1:{httpd.server_address[1]}/v1", kind="vllm", nccl=sync)
        assert client.check() == "vllm-model"
        client.push(model, 3)
        assert client.version == 3
        start, (what, metadata, sent), finish, reset = sync.client.calls
        assert (start, what, finish, reset) == ("start", "update", "finish", "reset_prefix_cache")
        state = {n: t for n, t in model.state_dict().items() if t.is_floating_point()}
        names = [m[0] for m in metadata]
        assert set(names) <= set(state) and len(names) >= len(list(model.parameters()))  # tied weights sent once
        for name, dtype, shape in metadata:
            assert dtype == str(state[name].dtype).removeprefix("torch.") and shape == list(state[name].shape)
            assert torch.equal(sent[name], state[name])
        ids = prompts(tok, 2, 3)
        ro = client.generate(tok, model, ids, max_new_tokens=4, temperature=1.0, top_p=1.0, seeds=[7, 8, 9] * 2)
    finally:
        httpd.shutdown()
    (body,) = _VllmLike.bodies
    assert body["n"] == 3 and body["seed"] == 7 and "seeds" not in body  # vLLM: one seed per request
    assert ro.completion_ids.tolist() == [[5, 6]] * 6
    torch.testing.assert_close(ro.old_logp, torch.tensor([[-0.5, -1.25]] * 6))


def test_vllm_kind_refuses_a_machine_without_cuda_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="server_kind=vllm: .*CUDA device") as err:
        NcclSync("http://127.0.0.1:1").connect()
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ training
def config(tmp_path: Path, checkpoint: Path, name: str, **rollout) -> Path:
    cfg = {
        "run": {"name": name, "seed": 0, "dir": str(tmp_path / name)},
        "policy": {"path": str(checkpoint)},
        "warm_start": {"enabled": False},
        "tasks": [
            {
                "name": "max",
                "source": "builtin:max",
                "rewards": [{"name": "tests.test_rollout_server:length_parity"}],
                "max_new_tokens": 8,
                "eval_size": 4,
            }
        ],
        "rollout": {"group_size": 4, "prompts_per_step": 4, **rollout},
        "trainer": {"steps": 3, "save_every": 1, "keep_last": 0},
        "eval": {"samples": 1, "greedy": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


SAME = ("reward/mean", "completion/mean_length")  # the same samples: equal
# Float results of a forward and backward: the server process and this one may run different thread counts (a test
# earlier in the session can set this process's), so reductions round differently; measured up to 1e-3 relative.
CLOSE = ("loss", "grad_norm", "entropy")


def assert_same_steps(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in SAME:
            assert a[step][key] == b[step][key], (step, key)
        for key in CLOSE:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-2, abs=1e-6), (step, key)


def test_training_through_the_server_matches_the_local_engine(server, tiny_policy, tmp_path):
    train(load_config(str(config(tmp_path, tiny_policy, "local")), []))
    train(load_config(str(config(tmp_path, tiny_policy, "remote", engine="server", server_url=server)), []))
    local, remote = metrics(tmp_path / "local"), metrics(tmp_path / "remote")
    assert sorted(remote) == [1, 2, 3]
    assert any(local[s]["grad_norm"] > 0 for s in local)  # the weights moved, so the pushes mattered
    assert_same_steps(local, remote)
    for step in local:
        assert remote[step]["rollout/mismatch_kl"] < 1e-3
        assert remote[step]["time/weight_push"] > 0 and 0.99 < remote[step]["rollout/is_weight"] <= 1.01
    # The saved checkpoint is an ordinary one: the server (and anyone) can load it.
    assert (tmp_path / "remote" / "checkpoints" / "step-3" / "config.json").exists()


def test_a_server_that_dies_stops_the_run_resumably(tiny_policy, tmp_path):
    proc, url = start_server(tiny_policy, "--weight-updates")
    path = config(tmp_path, tiny_policy, "dies", engine="server", server_url=url, server_retries=1)
    cfg = load_config(str(path), [])

    def kill_after_step_1(step: int, row: dict) -> None:
        if step == 1 and row:
            stop(proc)

    try:
        with pytest.raises(UserError) as err:
            train(cfg, on_step=kill_after_step_1)
    finally:
        if proc.poll() is None:
            stop(proc)
    message = str(err.value)
    assert "weight push (version 1) failed after 2 tries" in message, message
    assert "step 1 is checkpointed; resume with: rlk2 train --resume" in message and "\n" not in message
    assert sorted(metrics(tmp_path / "dies")) == [1]
    # A new server (any URL) and --resume: the run goes on from step 1 as if nothing had happened.
    proc, url = start_server(tiny_policy, "--weight-updates")
    try:
        cli = [sys.executable, "-m", "rlk2.cli", "train"]
        resumed = subprocess.run(
            [*cli, "--resume", str(tmp_path / "dies"), f"rollout.server_url={url}"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        whole = config(tmp_path, tiny_policy, "whole", engine="server", server_url=url)
        train(load_config(str(whole), []))
    finally:
        stop(proc)
    a, b = metrics(tmp_path / "dies"), metrics(tmp_path / "whole")
    assert sorted(a) == [1, 2, 3]
    assert_same_steps(a, b)


def test_start_up_refusals_are_one_line_and_write_nothing(tiny_policy, tmp_path):
    def rlk2(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rlk2.cli", "train", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
        )

    cases = [
        (["rollout.engine=server"], "rollout.server_url: required with rollout.engine=server"),
        (["rollout.engine=vllm"], "rollout.engine: must be local or server"),
        (
            ["rollout.engine=server", "rollout.server_url=http://127.0.0.1:9/v1", "rollout.server_retries=0"],
            "rollout server http://127.0.0.1:9: listing models failed after 1 tries",
        ),
        (
            ["rollout.engine=server", "rollout.server_url=http://127.0.0.1:9/v1", "policy.lora.enabled=true"],
            "rollout.engine=server: LoRA policies cannot push their weights",
        ),
    ]
    for extra, needle in cases:
        out = rlk2(str(config(tmp_path, tiny_policy, "refused")), *extra)
        assert out.returncode == 2, out.stderr[-2000:]
        assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not (tmp_path / "refused").exists()
