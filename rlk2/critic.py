"""Critic backends behind one interface, for the `rubric` reward (DESIGN.md 5).

Every backend has `complete(prompts, *, max_new_tokens, temperature, seed) -> list[Reply]`: one chat turn per
prompt (the prompt is the user message), the reply text or None with a reason. `temperature == 0` is greedy.

- `self` (`SelfCritic`): the policy being trained, its current weights, in this process. The training loop hands
  it over with `bind_policy(model, tokenizer)` once at start-up; the critic then always sees the live weights.
- `checkpoint` (`CheckpointCritic`): another local Hugging Face checkpoint, loaded once per process.
- `openai` (`OpenAICritic`): any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang, llama.cpp
  server, `rlk2 serve`). Up to `concurrency` requests are in flight at once (the server batches them), each with a
  timeout, retried with exponential backoff on connection errors, timeouts, 429 and 5xx; other 4xx are not retried.
  A reply that still fails is `Reply(None, reason)`: the rubric reward makes the sample unscorable, never 0.0.

A prompt longer than the local model's context is not generated: `Reply(None, "critic prompt too long ...")`.
Closed-loop refinement of the self-critic lives in `rlk2.critic_refine`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from rewards.rubric import Reply, RubricError

_bound: dict[str, Any] = {}
_bound_lock = threading.Lock()


def bind_policy(model, tokenizer, *, chat_template: bool = True, batch_size: int = 256) -> None:
    """Make `model` (the live policy, unwrapped from Accelerate) the `self` critic of this process."""
    with _bound_lock:
        _bound.update(model=model, tokenizer=tokenizer, chat_template=chat_template, batch_size=batch_size)


def unbind_policy() -> None:
    with _bound_lock:
        _bound.clear()


def _eos_ids(model, tokenizer) -> list[int]:
    from rlk2.rollout import _eos_ids as rollout_eos_ids  # one definition of "which tokens end a reply"

    return rollout_eos_ids(model, tokenizer)


def encode_messages(tokenizer, messages: list[dict], *, chat_template: bool = True) -> list[int]:
    """Token ids of a conversation, ready for the assistant's turn (chat template when the tokenizer has one)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]


def generate_ids(model, tokenizer, encoded: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seed: int, top_p: float = 1.0, batch_size: int = 64) -> list[tuple[list[int], bool]]:
    """(new token ids up to EOS, finished with EOS) per prompt; `temperature <= 0` is greedy.

    Lighter than `rlk2.rollout.generate_rollouts` on purpose: a critic needs no log-probs, and keeping the
    [B, T, V] scores of a large-vocabulary model would cost gigabytes.
    """
    import torch

    from rlk2.rollout import left_pad

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    greedy = temperature <= 0
    out: list[tuple[list[int], bool]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            ids, mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id)
            # generate() samples from the global RNG; a seed per chunk keeps replies reproducible.
            torch.manual_seed(seed + start)
            with torch.no_grad():
                seqs = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=not greedy,
                    temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
                    max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                )
            for toks in seqs[:, ids.shape[1] :].tolist():  # [B, T]
                cut = next((t for t, tok in enumerate(toks) if tok in eos), None)
                out.append((toks[:cut], True) if cut is not None else (toks, False))
    finally:
        model.train(was_training)
    return out


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int,
                   chat_template: bool = True, batch_size: int = 64) -> list[Reply]:
    """One reply per prompt (a user message) from a local causal LM; over-long prompts get `Reply(None, why)`."""
    encoded = [encode_messages(tokenizer, [{"role": "user", "content": p}], chat_template=chat_template)
               for p in prompts]
    limit = context_limit(model)
    out = [Reply(None, "not generated")] * len(prompts)
    todo = []
    for i, ids in enumerate(encoded):
        if limit and len(ids) + max_new_tokens > limit:
            out[i] = Reply(None, f"critic prompt too long: {len(ids)} tokens + {max_new_tokens} new > context {limit}")
        else:
            todo.append(i)
    done = generate_ids(model, tokenizer, [encoded[i] for i in todo], max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, batch_size=batch_size)
    for i, (toks, _) in zip(todo, done):
        out[i] = Reply(tokenizer.decode(toks, skip_special_tokens=True))
    return out


class SelfCritic:
    """The policy as its own critic: whatever model `bind_policy` registered, with its weights of this moment."""

    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int) -> list[Reply]:
        with _bound_lock:
            bound = dict(_bound)
        if not bound:
            raise RubricError("critic backend 'self' needs the live policy: call rlk2.critic.bind_policy(model, "
                              "tokenizer) first (the training loop does), or use backend 'checkpoint' / 'openai'")
        return generate_texts(bound["model"], bound["tokenizer"], prompts, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed, chat_template=bound["chat_template"],
                              batch_size=bound["batch_size"])


class CheckpointCritic:
    """A separate local Hugging Face checkpoint as critic; loaded once, on the GPU when there is one."""

    def __init__(self, path: str, *, dtype: str = "float32", device: str | None = None, batch_size: int = 64,
                 chat_template: bool = True) -> None:
        import torch

        from rlk2.errors import UserError
        from rlk2.policy import load_policy

        try:
            self.model, self.tokenizer = load_policy(path, dtype=dtype)
        except UserError as exc:
            raise RubricError(f"critic checkpoint: {exc}") from None
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        self.batch_size, self.chat_template = batch_size, chat_template
        self.lock = threading.Lock()  # one generate at a time on this model

    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int) -> list[Reply]:
        with self.lock:
            return generate_texts(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, chat_template=self.chat_template,
                                  batch_size=self.batch_size)


class OpenAICritic:
    """Client of an OpenAI-compatible chat-completions endpoint, stdlib HTTP (no new dependency).

    `base_url` ends in `/v1` (e.g. `http://127.0.0.1:8000/v1`); `model` defaults to the first of `GET /models`;
    the API key, if the server wants one, is read from the environment variable named by `api_key_env`.
    """

    _RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, *, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5, concurrency: int = 8,
                 extra_body: dict[str, Any] | None = None) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise RubricError(f"critic base_url: expected http(s)://host:port/v1, got {base_url!r}")
        if timeout_s <= 0 or retries < 0 or concurrency < 1:
            raise RubricError("critic options: timeout_s > 0, retries >= 0 and concurrency >= 1 are required")
        self.base_url = str(base_url).rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.concurrency = int(concurrency)
        self.extra_body = dict(extra_body or {})
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self._model = model

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request with retries; raises `_Failure(reason)` once retries are spent or not worth it."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        reason = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as exc:
                reason = f"HTTP {exc.code}: {_error_message(exc)}"
                if exc.code not in self._RETRY_STATUS:
                    break
            except (TimeoutError, socket.timeout):
                reason = f"timeout after {self.timeout_s:g} s"
            except urllib.error.URLError as exc:
                reason = f"cannot reach {self.base_url}: {getattr(exc.reason, 'strerror', None) or exc.reason}"
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    reason = f"timeout after {self.timeout_s:g} s"
            except (ConnectionError, OSError, ValueError) as exc:  # reset mid-body, bad JSON
                reason = f"{type(exc).__name__}: {exc}"
        raise _Failure(f"{reason} ({attempt + 1} attempt{'s' if attempt else ''})")

    @property
    def model(self) -> str:
        if self._model is None:
            try:
                listed = self._request("GET", "/models").get("data") or []
            except _Failure as exc:
                raise RubricError(f"critic endpoint {self.base_url}: GET /models failed: {exc}") from None
            if not listed:
                raise RubricError(f"critic endpoint {self.base_url}: serves no model; set critic.model")
            self._model = listed[0]["id"]
        return self._model

    def _one(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> Reply:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed, **self.extra_body}
        try:
            out = self._request("POST", "/chat/completions", body)
        except _Failure as exc:
            return Reply(None, str(exc))
        try:
            text = out["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Reply(None, "malformed response: no choices[0].message.content")
        return Reply(text if isinstance(text, str) else None, None if isinstance(text, str) else "empty content")

    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int) -> list[Reply]:
        _ = self.model  # resolve the model name once, before the fan-out
        with concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="critic-http") as pool:
            futures = [pool.submit(self._one, p, max_new_tokens, temperature, seed + k) for k, p in enumerate(prompts)]
            return [f.result() for f in futures]


class _Failure(Exception):
    pass


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode() or "{}")
        return str(body.get("error", {}).get("message") or exc.reason)[:200]
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)[:200]


# Refinement lives in its own module (size); re-exported so the loop imports everything critic from here.
from rlk2.critic_refine import (  # noqa: E402
    CriticRefiner,
    CriticSamples,
    VerifiedPair,
    format_warmup_rows,
    pairs_from_records,
    verified_pairs,
)

__all__ = ["CheckpointCritic", "CriticRefiner", "CriticSamples", "OpenAICritic", "SelfCritic", "VerifiedPair",
           "bind_policy", "context_limit", "encode_messages", "format_warmup_rows", "generate_ids", "generate_texts",
           "pairs_from_records", "unbind_policy", "verified_pairs"]
