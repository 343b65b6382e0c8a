"""Critic backends for the `rubric` reward: the protocol, the registry, and the HTTP (`openai`) backend.

A critic has `complete(prompts, *, max_new_tokens, temperature, seed) -> list[Reply]`: one chat turn per prompt
(the prompt is the user message), the reply text or `Reply(None, reason)`. `temperature == 0` is greedy.

Backends are named in `BACKENDS` (a plain dict of factories) or given as `pkg.module:factory`, or passed as an
object that has `complete`. This package ships `openai`: any OpenAI-compatible `/v1/chat/completions` endpoint
(vLLM, SGLang, llama.cpp server, `rlk2 serve`). Up to `concurrency` requests are in flight at once (the server
batches them), each with a timeout, retried with exponential backoff on connection errors, timeouts, 429 and 5xx;
other 4xx are not retried. A reply that still fails is `Reply(None, reason)`: the rubric reward makes the sample
unscorable, never 0.0.

Backends that need a model in this process register themselves with `register_backend`: rlk2 registers
`checkpoint` (another local checkpoint) when `rlk2.critic` is imported. The name `self` (the policy being
trained, with its live weights) is not a factory: the training loop passes the live critic object in the
reward's options, so nothing here has to find a model.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from rewards.rubrics import RubricError


class Reply(NamedTuple):
    """One critic completion: its text, or None with the reason the backend could not produce it."""

    text: str | None
    error: str | None = None


class Critic(Protocol):
    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int) -> list[Reply]: ...


BACKENDS: dict[str, Callable[..., Critic]] = {}
"""Backend name -> factory(**options). `openai` is registered below; rlk2 adds `checkpoint`."""

_critics: dict[str, Critic] = {}
_critics_lock = threading.Lock()


def register_backend(name: str, factory: Callable[..., Critic]) -> None:
    """Make `name` usable as a rubric reward's `backend` (e.g. rlk2 registers `checkpoint`)."""
    BACKENDS[name] = factory


def get_critic(backend: Any, options: dict[str, Any] | None = None) -> Critic:
    """A critic backend: an object with `complete`, a name in BACKENDS, or `pkg.module:factory`; cached by options."""
    if hasattr(backend, "complete"):
        return backend
    if backend == "self":
        raise RubricError(
            "critic backend 'self' is the policy being trained: only `rlk2 train` has it (the loop "
            "passes the live model to the reward); use 'checkpoint' or 'openai' elsewhere"
        )
    if not isinstance(backend, str) or not (backend in BACKENDS or ":" in backend):
        known = ", ".join(["self", *BACKENDS])
        hint = " ('checkpoint' is registered by `import rlk2.critic`)" if backend == "checkpoint" else ""
        raise RubricError(f"rubric: unknown critic backend {backend!r} (use {known} or pkg.module:factory){hint}")
    options = dict(options or {})
    key = json.dumps([backend, options], sort_keys=True, default=str)
    with _critics_lock:
        if key not in _critics:
            if backend in BACKENDS:
                factory = BACKENDS[backend]
            else:
                module, _, attr = backend.partition(":")
                factory = getattr(importlib.import_module(module), attr)
            try:
                _critics[key] = factory(**options)
            except TypeError as exc:  # an option the backend does not take
                raise RubricError(f"rubric: critic backend {backend!r}: {exc}") from None
        return _critics[key]


class OpenAICritic:
    """Client of an OpenAI-compatible chat-completions endpoint, stdlib HTTP (no new dependency).

    `base_url` ends in `/v1` (e.g. `http://127.0.0.1:8000/v1`); `model` defaults to the first of `GET /models`;
    the API key, if the server wants one, is read from the environment variable named by `api_key_env`.
    """

    _RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        concurrency: int = 8,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
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
            except TimeoutError:
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
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            **self.extra_body,
        }
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


register_backend("openai", OpenAICritic)
