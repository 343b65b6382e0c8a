"""`rlk2 serve CHECKPOINT`: a local checkpoint as an OpenAI-compatible chat-completions endpoint.

Serves `POST /v1/chat/completions` (messages, max_tokens / max_completion_tokens, temperature, top_p, n, seed,
stop; no streaming), `GET /v1/models` and `GET /health` on loopback by default. It is what the `openai` critic
backend is tested against, and a quick way to talk to a checkpoint by hand::

    rlk2 serve runs/demo/checkpoints/step-60 --port 8000
    curl -s 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "2+2=?"}]}'

Concurrent requests with the same sampling settings are batched into one generation call (`rlk2.rollout`): a batcher
thread
waits `--batch-window-ms` for company, then runs up to `--max-batch` sequences together. Written on the standard
library's `http.server` because no ASGI stack is a dependency of rlk2, and one JSON route needs none. There is
no authentication: bind to anything but loopback only on a network you trust.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from rlk2.errors import UserError
from rlk2.policy import load_policy
from rlk2.rollout import context_limit, encode_messages, generate_replies

_MAX_BODY = 8 * 2**20
_READ_TIMEOUT_S = 30.0


def run(args: argparse.Namespace) -> int:
    """`rlk2 serve CHECKPOINT` (arguments: rlk2.cli)."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be 0..65535")
    if args.max_batch < 1:
        raise UserError("--max-batch: must be >= 1")
    model, tokenizer = load_policy(args.checkpoint, dtype=args.dtype, what="checkpoint")
    if not getattr(tokenizer, "chat_template", None) and not args.plain_prompts:
        raise UserError(
            f"{args.checkpoint}: the tokenizer has no chat template, which chat completions need "
            "(add one to its tokenizer_config.json, or pass --plain-prompts for a base model)"
        )
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    name = args.model_name or Path(args.checkpoint).resolve().name
    engine = Generator(model, tokenizer, max_batch=args.max_batch, window_s=args.batch_window_ms / 1000)
    try:
        server = make_server(engine, name, args.host, args.port, default_max_tokens=args.default_max_tokens)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"rlk2 serve: warning: listening on {host}, with no authentication", file=sys.stderr)
    print(f"rlk2 serve: {name} on http://{host}:{port}/v1", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0


# ------------------------------------------------------------------------------------------------ batching
@dataclass
class _Job:
    key: tuple  # sampling settings; only jobs with equal keys share a generate() call
    encoded: list[list[int]]  # the prompt once per requested choice (n)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[tuple[list[int], bool]] | None = None
    error: str | None = None


class Generator:
    """Owns the model: one batcher thread runs every generate(), so requests never race on it."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, window_s: float = 0.005) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window_s = max_batch, window_s
        self.pending: list[_Job] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> _Job:
        with self.cond:
            self.pending.append(job)
            self.cond.notify()
        job.done.wait()
        return job

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def _take(self) -> list[_Job] | None:
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
        time.sleep(self.window_s)  # let concurrent requests arrive
        with self.cond:
            key = self.pending[0].key
            batch, size, rest = [], 0, []
            for job in self.pending:
                if job.key == key and (not batch or size + len(job.encoded) <= self.max_batch):
                    batch.append(job)
                    size += len(job.encoded)
                else:
                    rest.append(job)
            self.pending = rest
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            max_new, temperature, top_p, seed = batch[0].key
            try:
                flat = generate_replies(
                    self.model,
                    self.tokenizer,
                    [ids for job in batch for ids in job.encoded],
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    batch_size=self.max_batch,
                )
                for job in batch:
                    job.result, flat = flat[: len(job.encoded)], flat[len(job.encoded) :]
            except Exception as exc:  # a model error fails these requests (500), not the server
                for job in batch:
                    job.error = f"{type(exc).__name__}: {exc}"
            for job in batch:
                job.done.set()


# ------------------------------------------------------------------------------------------------ HTTP
class _BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _number(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise _BadRequest(400, f"'{key}' must be {kind} in [{lo:g}, {hi:g}], got {value!r}")
    return value


def parse_request(body: Any, *, model_name: str, tokenizer, limit: int | None, default_max_tokens: int) -> dict:
    """Validates a chat-completions body; every problem is a 4xx with a one-line message naming the field."""
    if not isinstance(body, dict):
        raise _BadRequest(400, "request body must be a JSON object")
    if body.get("stream"):
        raise _BadRequest(400, "'stream' is not supported by rlk2 serve")
    if body.get("model") not in (None, model_name):
        raise _BadRequest(
            404, f"model {body['model']!r} is not served here (serving {model_name!r})", "not_found_error"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(400, "'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _BadRequest(400, f"messages[{k}].role must be system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise _BadRequest(400, f"messages[{k}].content must be a string")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise _BadRequest(400, f"messages[{k}].content holds a lone surrogate (invalid \\u escape)") from None
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = body.get(max_key) is not None
    max_new = _number(body, max_key, default_max_tokens, 1, 1 << 20, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 1e-6, 1.0))
    n = _number(body, "n", 1, 1, 64, integer=True)
    seed = _number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _BadRequest(400, "'stop' must be a string or a list of non-empty strings")
    ids = encode_messages(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    if not ids:
        raise _BadRequest(400, "the messages render to an empty prompt (this chat template drops their roles)")
    if limit and not asked:  # no max_tokens given: up to the default, within the context
        max_new = max(1, min(max_new, limit - len(ids)))
    if limit and len(ids) + max_new > limit:
        raise _BadRequest(
            400, f"prompt is {len(ids)} tokens; with {max_key}={max_new} it exceeds the context of {limit}"
        )
    return {"ids": ids, "key": (max_new, temperature, top_p, seed), "n": n, "stop": stop}


def make_server(
    engine: Generator,
    model_name: str,
    host: str,
    port: int,
    *,
    default_max_tokens: int = 256,
    read_timeout_s: float = _READ_TIMEOUT_S,
) -> ThreadingHTTPServer:
    """The HTTP server over `engine`; a client that sends less than its Content-Length gets 408 after
    `read_timeout_s` seconds instead of holding a thread forever."""
    limit = context_limit(engine.model)
    created = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = read_timeout_s  # socket timeout for reading a request (headers and body)

        def log_message(self, *args: Any) -> None:  # keep stdout/stderr for the URL line and real problems
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "rlk2"}],
                    },
                )
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route GET {self.path}", "not_found_error")

        def do_POST(self) -> None:
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, f"no route POST {self.path}", "not_found_error")
                return
            try:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    raise _BadRequest(400, "Content-Length is not a number") from None
                if not 0 < length <= _MAX_BODY:
                    raise _BadRequest(400 if length <= 0 else 413, "request body missing or too large")
                try:
                    raw = self.rfile.read(length)
                except TimeoutError:  # a body shorter than its Content-Length: don't hold the thread forever
                    self.close_connection = True
                    raise _BadRequest(408, f"request body not received within {self.timeout:g} s") from None
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):
                    raise _BadRequest(400, "request body is not valid JSON") from None
                req = parse_request(
                    body,
                    model_name=model_name,
                    tokenizer=engine.tokenizer,
                    limit=limit,
                    default_max_tokens=default_max_tokens,
                )
            except _BadRequest as exc:
                self._error(exc.status, str(exc), exc.kind)
                return
            job = engine.submit(_Job(req["key"], [req["ids"]] * req["n"]))
            if job.error:
                self._error(500, job.error, "server_error")
                return
            choices, used = [], 0
            for k, (toks, finished) in enumerate(job.result):
                text = engine.tokenizer.decode(toks, skip_special_tokens=True)
                reason = "stop" if finished else "length"
                for s in req["stop"]:
                    if s in text:
                        text, reason = text[: text.index(s)], "stop"
                choices.append(
                    {
                        "index": k,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                        "logprobs": None,
                    }
                )
                used += len(toks)
            self._send(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model_name,
                    "choices": choices,
                    "usage": {
                        "prompt_tokens": len(req["ids"]),
                        "completion_tokens": used,
                        "total_tokens": len(req["ids"]) + used,
                    },
                },
            )

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
