"""The `server` rollout engine: rollouts sampled by an inference server, with the trainer's weights pushed into it.

`rollout.engine: server` sends each step's prompts (token ids) to an OpenAI-compatible completions endpoint that
returns the sampled token ids and their log-probs — `rlk2 serve --weight-updates` (the CPU-testable engine), or
vLLM with `return_token_ids` and `--logprobs-mode processed_logprobs` — and before each step's sampling pushes the
weights of the last finished step (`POST /rlk2/weights`, safetensors; the reply's `weights_version` must then say
so, which catches a server restarted from other weights or shared with another trainer). The engine's log-probs
are the *sampler's*: the loop recomputes pi_old with its own forward and weighs each token by the truncated
importance ratio min(pi_old / pi_engine, algo.is_cap) (as TRL and verl correct engine/trainer mismatch), logging
`rollout/mismatch_kl`.

With `rollout.server_kind: vllm` the weights go the way TRL's `vllm_mode="server"` sends them: TRL's own
`VLLMClient` joins the vLLM workers' NCCL group from the trainer's CUDA device and broadcasts every tensor
(`update_named_params`, then `reset_prefix_cache`); vLLM samples with one seed per request (it has no per-sample
seeds) and does not tag replies with a weights version. That path needs a GPU and vLLM, and has run here only
against a stand-in for `VLLMClient` (tests/test_rollout_server.py).

Plain `urllib` because one POST route needs no HTTP client dependency. A connection error, a timeout, a 5xx or a
malformed reply is retried `rollout.server_retries` times with backoff, then the run stops with one line
(`EngineUnavailable`) and a resumable checkpoint of its last finished step.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import safetensors.torch
import torch

from rlk2.errors import UserError
from rlk2.rollout.batch import Rollout, left_pad
from rlk2.rollout.text import eos_ids

_CLIENT_ERRORS = range(400, 500)


class EngineUnavailable(UserError):
    """The rollout server failed (unreachable, timing out, answering errors or nonsense) after every retry."""


class _Malformed(Exception):
    pass


class RolloutServer:
    """A client of one inference server: `push` the policy's weights, `generate` a step's groups."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        kind: str = "rlk2",
        nccl: NcclSync | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.base = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.kind = kind
        self.nccl = nccl if nccl is not None or kind != "vllm" else NcclSync(self.base)  # kind=vllm: weights by NCCL
        self.version: int | None = None  # the weights version the server holds, as last pushed

    # ------------------------------------------------------------------------------------------- transport
    def _request(self, path: str, data: bytes | None, headers: dict[str, str], what: str) -> dict:
        """POST (or GET without data) `path` under the server root; retried; the JSON reply."""
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.base + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}: {_error_message(exc)}"
                if exc.code in _CLIENT_ERRORS:  # the request itself is wrong: sending it again changes nothing
                    raise EngineUnavailable(f"rollout server {self.base}: {what} refused ({problem})") from None
            except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
                problem = str(getattr(exc, "reason", None) or exc)
            except ValueError:
                problem = "the reply is not JSON"
        raise EngineUnavailable(
            f"rollout server {self.base}: {what} failed after {self.retries + 1} tries ({problem})"
        ) from None

    def check(self) -> str:
        """The served model's id (one try per retry): the run refuses to start against a server that is not up."""
        reply = self._request("/v1/models", None, {}, "listing models")
        try:
            return str(reply["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise EngineUnavailable(f"rollout server {self.base}: /v1/models reply has no model id") from None

    # ------------------------------------------------------------------------------------------- weights
    def push(self, model: torch.nn.Module, version: int, state: dict[str, torch.Tensor] | None = None) -> float:
        """Sends the floating-point tensors of `model`'s state dict (weights and float buffers; integer buffers are
        never trained), or of `state` when given (an FSDP2 model's gathered one), to the server as weights
        `version`; returns the seconds taken."""
        t0 = time.perf_counter()
        state = model.state_dict() if state is None else state
        state = {name: t.detach().contiguous() for name, t in state.items() if t.is_floating_point()}
        if self.nccl is not None:
            self.nccl.send(_untied(state))
            self.version = version
            return time.perf_counter() - t0
        body = safetensors.torch.save(_untied(state))
        headers = {"Content-Type": "application/octet-stream", "X-Weights-Version": str(version)}
        reply = self._request("/rlk2/weights", body, headers, f"weight push (version {version})")
        if reply.get("weights_version") != version:
            raise EngineUnavailable(
                f"rollout server {self.base}: weight push answered version {reply.get('weights_version')!r}, "
                f"not {version}"
            )
        self.version = version
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------- sampling
    def generate(
        self,
        tokenizer,
        model,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int],
    ) -> Rollout:
        """One completion per entry of `prompt_ids` (a group's K copies each), drawn by the server with `seeds`;
        a Rollout as `generate_rollouts` returns it, with the server's log-probs as `old_logp`."""
        distinct: list[list[int]] = []
        for ids in prompt_ids:
            if not distinct or distinct[-1] != ids:
                distinct.append(ids)
        n = len(prompt_ids) // len(distinct)
        if [ids for ids in distinct for _ in range(n)] != prompt_ids:
            raise ValueError("RolloutServer.generate: prompts must come as consecutive equal groups of one size")
        body = {
            "prompt": distinct,
            "n": n,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "logprobs": 0,
            "return_token_ids": True,
            **({"seeds": seeds} if self.kind == "rlk2" else {"seed": seeds[0] % 2**63}),
        }
        eos = set(eos_ids(model, tokenizer))
        what = f"sampling {len(prompt_ids)} completions"
        for attempt in range(self.retries + 1):
            reply = self._request("/v1/completions", json.dumps(body).encode(), _JSON, what)
            try:
                return self._rollout(reply, tokenizer, prompt_ids, max_new_tokens, eos)
            except _Malformed as exc:
                problem = str(exc)
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2**attempt)
        raise EngineUnavailable(f"rollout server {self.base}: {what}: malformed reply ({problem})")

    def _rollout(self, reply: Any, tokenizer, prompt_ids, max_new_tokens: int, eos: set[int]) -> Rollout:
        tagged = self.kind == "rlk2"  # vLLM's replies carry no weights version
        if (
            tagged
            and self.version is not None
            and isinstance(reply, dict)
            and reply.get("weights_version") != self.version
        ):
            raise EngineUnavailable(
                f"rollout server {self.base}: it holds weights version {reply.get('weights_version')!r}, not the "
                f"{self.version} this trainer pushed (restarted, or shared with another trainer?)"
            )
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompt_ids):
            raise _Malformed(f"{len(choices) if isinstance(choices, list) else 'no'} choices for {len(prompt_ids)}")
        vocab = len(tokenizer)
        tokens, logps, ended = [], [], []
        for c in sorted(choices, key=lambda c: c.get("index", -1) if isinstance(c, dict) else -1):
            ids = c.get("token_ids") if isinstance(c, dict) else None
            lp = (c.get("logprobs") or {}).get("token_logprobs") if isinstance(c, dict) else None
            k = c.get("index") if isinstance(c, dict) else None
            if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise _Malformed(f"choice {k}: token_ids missing or outside the vocabulary")
            if not isinstance(lp, list) or len(lp) != len(ids):
                raise _Malformed(f"choice {k}: token_logprobs missing or not one per token")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x <= 1e-4 for x in lp):
                raise _Malformed(f"choice {k}: a token log-prob is not a finite number <= 0")
            if not ids or len(ids) > max_new_tokens:
                raise _Malformed(f"choice {k}: {len(ids)} tokens for a budget of {max_new_tokens}")
            stop = c.get("finish_reason") == "stop"
            if stop and ids[-1] not in eos:  # the loss trains on the EOS: the engine must return it
                raise _Malformed(f"choice {k}: finish_reason 'stop' but the last token is not EOS")
            tokens.append(ids)
            logps.append(lp)
            ended.append(stop)
        return _as_rollout(tokenizer, prompt_ids, tokens, logps, ended)


class NcclSync:
    """Weights into a vLLM server over NCCL, through TRL's `VLLMClient` (the trainer joins the vLLM workers'
    weight-transfer group as rank 0 and broadcasts every tensor). Written here as a thin adapter because TRL's
    client is the maintained implementation of vLLM's weight-transfer protocol; it needs CUDA and vLLM."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.client = None

    def connect(self):
        """TRL's client, joined to the server's NCCL group (once); one line when this machine cannot."""
        if self.client is None:
            if not torch.cuda.is_available():
                raise UserError(
                    "rollout.server_kind=vllm: the weight push is an NCCL broadcast from a CUDA device, and this "
                    "machine has none (use rlk2 serve --weight-updates, server_kind=rlk2)"
                )
            try:
                from trl.generation.vllm_client import VLLMClient

                client = VLLMClient(base_url=self.base_url)
            except ImportError as exc:  # vLLM (or requests) missing
                raise UserError(f"rollout.server_kind=vllm: {exc}") from None
            client.init_communicator(device=torch.cuda.current_device())
            self.client = client
        return self.client

    def send(self, state: dict[str, torch.Tensor]) -> None:
        client = self.connect()
        device = self.device()
        metadata = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in state.items()]
        with client.weight_update():  # the server prepares once, receives every tensor, then finalises once
            client.update_named_params(metadata, ((name, t.to(device)) for name, t in state.items()))
        client.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())


def _as_rollout(tokenizer, prompt_ids, tokens: list[list[int]], logps: list[list[float]], ended: list[bool]) -> Rollout:
    pad = tokenizer.pad_token_id
    ids, mask = left_pad(prompt_ids, pad)
    width = max(len(t) for t in tokens)
    completion = torch.full((len(tokens), width), pad, dtype=torch.long)
    cmask = torch.zeros((len(tokens), width), dtype=torch.long)
    old = torch.zeros((len(tokens), width), dtype=torch.float32)
    for i, (t, lp) in enumerate(zip(tokens, logps)):
        completion[i, : len(t)] = torch.tensor(t)
        cmask[i, : len(t)] = 1
        old[i, : len(t)] = torch.tensor(lp, dtype=torch.float32)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    return Rollout(ids, mask, completion, cmask, old, torch.tensor([not e for e in ended]), texts)


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first name of each storage."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except Exception:  # any non-JSON or differently shaped error body: the status line says enough
        return exc.reason or "error"


_JSON = {"Content-Type": "application/json"}
