"""`rlk2 serve CHECKPOINT`: a local checkpoint as an OpenAI-compatible endpoint, and a rollout engine for training.

Serves on loopback by default:
- `POST /v1/chat/completions` (messages, max_tokens / max_completion_tokens, temperature, top_p, n, seed, stop;
  no streaming): what the `openai` critic backend is tested against;
- `POST /v1/completions` (prompt as text or token ids, one or several; max_tokens, temperature, top_p, n, seed,
  logprobs, stop) with vLLM's `return_token_ids` (each choice carries its `token_ids`, EOS included) and one rlk2
  extension, `seeds` (one per choice: counter-based draws, so a sequence's tokens do not depend on its batch):
  the `server` rollout engine of `rlk2 train` (rlk2.rollout.server). `token_logprobs` are those of the
  distribution each token was drawn from (after temperature and top-p; vLLM's `--logprobs-mode processed_logprobs`);
- `POST /rlk2/weights` (only with `--weight-updates`): a safetensors body replaces the named tensors between two
  generations, tagged with the `X-Weights-Version` header, which every completion reply then reports as
  `weights_version` (the trainer checks it); `GET /rlk2/weights` reports the version;
- `GET /v1/models` and `GET /health`.

A quick way to talk to a checkpoint by hand::

    rlk2 serve runs/demo/checkpoints/step-60 --port 8000
    curl -s 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "2+2=?"}]}'

Concurrent requests with the same sampling settings are batched into one generation call (`rlk2.rollout`): a batcher
thread
waits `--batch-window-ms` for company, then runs up to `--max-batch` sequences together; weight updates run on the
same thread, between generations, so no request ever sees half-updated weights. Written on the standard library's
`http.server` because no ASGI stack is a dependency of rlk2, and a few JSON routes need none. There is no
authentication: bind to anything but loopback only on a network you trust (`--weight-updates` lets any client
replace the weights).
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

import safetensors.torch
import torch

from rlk2.errors import UserError
from rlk2.policy import load_policy
from rlk2.rollout import context_limit, encode_messages, generate_tokens

_MAX_BODY = 8 * 2**20
_MAX_WEIGHTS = 2**40  # a weight push is the model's size; anything up to 1 TiB
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
        server = make_server(
            engine,
            name,
            args.host,
            args.port,
            default_max_tokens=args.default_max_tokens,
            weight_updates=args.weight_updates,
        )
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
    key: tuple  # (kind, sampling settings...): only jobs with equal keys share a generation call
    encoded: list[list[int]]  # the prompt once per requested choice (n)
    seeds: list[int] | None = None  # one per choice (tokens jobs): counter-based draws, batchable across requests
    weights: dict[str, torch.Tensor] | None = None  # a weight update (runs alone)
    version: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: str | None = None


class Generator:
    """Owns the model: one batcher thread runs every generation and weight update, so they never race on it."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, window_s: float = 0.005) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window_s = max_batch, window_s
        self.version = 0  # of the weights: 0 as loaded, then what each update says
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
        if self.pending[0].weights is None:
            time.sleep(self.window_s)  # let concurrent requests arrive
        with self.cond:
            first = self.pending[0]
            if first.weights is not None:
                self.pending = self.pending[1:]
                return [first]
            batch, size, rest = [], 0, []
            for job in self.pending:
                if job.key == first.key and (not batch or size + len(job.encoded) <= self.max_batch):
                    batch.append(job)
                    size += len(job.encoded)
                else:
                    rest.append(job)
            self.pending = rest
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            kind, *settings = batch[0].key
            try:
                if kind == "weights":
                    load_weights(self.model, batch[0].weights)
                    self.version = batch[0].version
                    batch[0].result = [self.version]
                    continue
                max_new, temperature, top_p, seed = settings
                flat = generate_tokens(  # chat replies too: their handler drops the EOS and the log-probs
                    self.model,
                    self.tokenizer,
                    [ids for job in batch for ids in job.encoded],
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    seeds=None if seed is not None else [s for job in batch for s in job.seeds],
                    batch_size=self.max_batch,
                    record_logprobs=kind == "tokens",
                )
                for job in batch:
                    job.result, flat = flat[: len(job.encoded)], flat[len(job.encoded) :]
            except Exception as exc:  # a model error fails these requests (500), not the server
                for job in batch:
                    job.error = f"{type(exc).__name__}: {exc}"
            finally:
                for job in batch:
                    job.done.set()


def read_weights(data: bytes, model) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors body, checked against the model's own: every name one of its state-dict keys,
    every shape its shape, floating point (400 otherwise, naming the tensor; nothing is applied)."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type, with a message worth passing on
        raise _BadRequest(400, f"the body is not a safetensors file ({exc})") from None
    if not tensors:
        raise _BadRequest(400, "the safetensors body holds no tensor")
    own = model.state_dict()
    for name, t in tensors.items():
        if name not in own:
            raise _BadRequest(400, f"weight {name!r}: the served model has no such tensor")
        if tuple(t.shape) != tuple(own[name].shape):
            raise _BadRequest(
                400, f"weight {name!r}: shape {list(t.shape)}, the served model's is {list(own[name].shape)}"
            )
        if not t.is_floating_point():
            raise _BadRequest(400, f"weight {name!r}: dtype {t.dtype} is not floating point")
    return tensors


@torch.no_grad()
def load_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copies checked tensors (`read_weights`) into the model's own, cast to their dtype and device."""
    own = model.state_dict()
    for name, t in tensors.items():
        own[name].copy_(t)


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


def _check_model(body: Any, model_name: str) -> None:
    if not isinstance(body, dict):
        raise _BadRequest(400, "request body must be a JSON object")
    if body.get("stream"):
        raise _BadRequest(400, "'stream' is not supported by rlk2 serve")
    if body.get("model") not in (None, model_name):
        raise _BadRequest(
            404, f"model {body['model']!r} is not served here (serving {model_name!r})", "not_found_error"
        )


def _sampling(body: dict, max_key: str, default_max_tokens: int) -> tuple[int, bool, float, float, int, int, list]:
    """(max new tokens, whether the request set it, temperature, top_p, n, seed, stop strings)."""
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
    return max_new, asked, temperature, top_p, n, seed, stop


def _fit(ids: list[int], max_new: int, asked: bool, limit: int | None, max_key: str, what: str = "prompt") -> int:
    """The completion budget within the context: a request without max_tokens gets what is left of it."""
    if limit and not asked:
        max_new = max(1, min(max_new, limit - len(ids)))
    if limit and len(ids) + max_new > limit:
        raise _BadRequest(
            400, f"{what} is {len(ids)} tokens; with {max_key}={max_new} it exceeds the context of {limit}"
        )
    return max_new


def parse_request(body: Any, *, model_name: str, tokenizer, limit: int | None, default_max_tokens: int) -> dict:
    """Validates a chat-completions body; every problem is a 4xx with a one-line message naming the field."""
    _check_model(body, model_name)
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
    max_new, asked, temperature, top_p, n, seed, stop = _sampling(body, max_key, default_max_tokens)
    ids = encode_messages(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    if not ids:
        raise _BadRequest(400, "the messages render to an empty prompt (this chat template drops their roles)")
    max_new = _fit(ids, max_new, asked, limit, max_key)
    return {"ids": ids, "key": ("chat", max_new, temperature, top_p, seed), "n": n, "stop": stop}


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_completion_request(
    body: Any, *, model_name: str, tokenizer, vocab: int, limit: int | None, default_max_tokens: int
) -> dict:
    """Validates a completions body (OpenAI's four prompt forms, vLLM's `return_token_ids`, rlk2's `seeds`)."""
    _check_model(body, model_name)
    if body.get("echo"):
        raise _BadRequest(400, "'echo' is not supported by rlk2 serve")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise _BadRequest(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either")
    encoded = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p) if isinstance(p, str) else p
        if not ids:
            raise _BadRequest(400, f"prompt[{i}] encodes to no token")
        bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise _BadRequest(400, f"prompt[{i}][{bad}]: token id {ids[bad]} is not in the vocabulary (0..{vocab - 1})")
        encoded.append(ids)
    max_new, asked, temperature, top_p, n, seed, stop = _sampling(body, "max_tokens", default_max_tokens)
    max_new = min(_fit(ids, max_new, asked, limit, "max_tokens", f"prompt[{i}]") for i, ids in enumerate(encoded))
    logprobs = _number(body, "logprobs", None, 0, 20, integer=True)
    token_ids = body.get("return_token_ids", False)
    if not isinstance(token_ids, bool):
        raise _BadRequest(400, "'return_token_ids' must be true or false")
    if stop and token_ids:
        raise _BadRequest(400, "'stop' with 'return_token_ids' is not supported (the ids would not match the text)")
    seeds = body.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or len(seeds) != len(encoded) * n:
            raise _BadRequest(400, f"'seeds' must be a list of {len(encoded) * n} integers (one per choice)")
        for j, sd in enumerate(seeds):
            if isinstance(sd, bool) or not isinstance(sd, int) or not -(1 << 63) <= sd < 1 << 64:
                raise _BadRequest(400, f"seeds[{j}] must be an integer in [-2**63, 2**64)")
    return {
        "encoded": [ids for ids in encoded for _ in range(n)],  # choice i*n + j is prompt i's j-th
        "key": ("tokens", max_new, temperature, top_p, seed if seeds is None else None),
        "seeds": seeds,
        "stop": stop,
        "logprobs": logprobs is not None,
        "token_ids": token_ids,
    }


def make_server(
    engine: Generator,
    model_name: str,
    host: str,
    port: int,
    *,
    default_max_tokens: int = 256,
    read_timeout_s: float = _READ_TIMEOUT_S,
    weight_updates: bool = False,
) -> ThreadingHTTPServer:
    """The HTTP server over `engine`; a client that sends less than its Content-Length gets 408 after
    `read_timeout_s` seconds instead of holding a thread forever. `weight_updates` opens `POST /rlk2/weights`."""
    service = _Service(
        engine,
        model_name,
        limit=context_limit(engine.model),
        vocab=engine.model.get_output_embeddings().weight.shape[0],
        created=int(time.time()),
        default_max_tokens=default_max_tokens,
        weight_updates=weight_updates,
    )
    # `timeout`: the socket timeout for reading a request (headers and body)
    handler = type("Handler", (_Handler,), {"service": service, "timeout": read_timeout_s})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


@dataclass(frozen=True)
class _Service:
    """What the routes serve: the engine and the facts about its model."""

    engine: Generator
    model_name: str
    limit: int | None
    vocab: int
    created: int
    default_max_tokens: int
    weight_updates: bool


class _Handler(BaseHTTPRequestHandler):
    """The routes (module docstring) over `service`, which `make_server` sets on a subclass per server."""

    service: _Service

    protocol_version = "HTTP/1.1"

    @property
    def engine(self) -> Generator:
        return self.service.engine

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
                    "data": [
                        {
                            "id": self.service.model_name,
                            "object": "model",
                            "created": self.service.created,
                            "owned_by": "rlk2",
                        }
                    ],
                },
            )
        elif self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/rlk2/weights":
            self._send(200, {"weights_version": self.engine.version, "weight_updates": self.service.weight_updates})
        else:
            self._error(404, f"no route GET {self.path}", "not_found_error")

    def _body(self, max_bytes: int) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _BadRequest(400, "Content-Length is not a number") from None
        if not 0 < length <= max_bytes:
            raise _BadRequest(400 if length <= 0 else 413, "request body missing or too large")
        try:
            return self.rfile.read(length)
        except TimeoutError:  # a body shorter than its Content-Length: don't hold the thread forever
            self.close_connection = True
            raise _BadRequest(408, f"request body not received within {self.timeout:g} s") from None

    def _json(self) -> Any:
        raw = self._body(_MAX_BODY)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise _BadRequest(400, "request body is not valid JSON") from None

    def do_POST(self) -> None:
        route = self.path.rstrip("/")
        handlers = {
            "/v1/chat/completions": self._chat,
            "/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/completions": self._completions,
            "/rlk2/weights": self._weights,
        }
        if route not in handlers:
            self._error(404, f"no route POST {self.path}", "not_found_error")
            return
        try:
            handlers[route]()
        except _BadRequest as exc:
            self._error(exc.status, str(exc), exc.kind)

    def _weights(self) -> None:
        if not self.service.weight_updates:
            raise _BadRequest(403, "weight updates are off: start rlk2 serve with --weight-updates", "forbidden")
        try:
            version = int(self.headers.get("X-Weights-Version", self.engine.version + 1))
        except ValueError:
            raise _BadRequest(400, "X-Weights-Version is not an integer") from None
        tensors = read_weights(self._body(_MAX_WEIGHTS), self.engine.model)
        job = self.engine.submit(_Job(("weights",), [], weights=tensors, version=version))
        if job.error:
            raise _BadRequest(500, job.error, "server_error")
        self._send(200, {"weights_version": self.engine.version, "tensors": len(tensors)})

    def _chat(self) -> None:
        req = parse_request(
            self._json(),
            model_name=self.service.model_name,
            tokenizer=self.engine.tokenizer,
            limit=self.service.limit,
            default_max_tokens=self.service.default_max_tokens,
        )
        job = self.engine.submit(_Job(req["key"], [req["ids"]] * req["n"]))
        if job.error:
            raise _BadRequest(500, job.error, "server_error")
        choices, used = [], 0
        for k, (toks, _, finished) in enumerate(job.result):
            toks = toks[:-1] if finished else toks  # the reply without its EOS
            text, reason = _cut(self.engine.tokenizer.decode(toks, skip_special_tokens=True), finished, req["stop"])
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
                "model": self.service.model_name,
                "choices": choices,
                "usage": _usage(len(req["ids"]), used),
            },
        )

    def _completions(self) -> None:
        req = parse_completion_request(
            self._json(),
            model_name=self.service.model_name,
            tokenizer=self.engine.tokenizer,
            vocab=self.service.vocab,
            limit=self.service.limit,
            default_max_tokens=self.service.default_max_tokens,
        )
        job = self.engine.submit(_Job(req["key"], req["encoded"], seeds=req["seeds"]))
        if job.error:
            raise _BadRequest(500, job.error, "server_error")
        tok, choices, used = self.engine.tokenizer, [], 0
        for k, (toks, logps, finished) in enumerate(job.result):
            text, reason = _cut(tok.decode(toks, skip_special_tokens=True), finished, req["stop"])
            choice = {"index": k, "text": text, "finish_reason": reason, "logprobs": None}
            if req["logprobs"]:
                choice["logprobs"] = {
                    "tokens": tok.convert_ids_to_tokens(toks),
                    "token_logprobs": logps,
                    "top_logprobs": None,
                    "text_offset": None,
                }
            if req["token_ids"]:
                choice["token_ids"] = toks
                choice["prompt_token_ids"] = req["encoded"][k]
            choices.append(choice)
            used += len(toks)
        self._send(
            200,
            {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.service.model_name,
                "choices": choices,
                "usage": _usage(sum(len(ids) for ids in req["encoded"]), used),
                "weights_version": self.engine.version,
            },
        )


def _cut(text: str, finished: bool, stop: list[str]) -> tuple[str, str]:
    """The text up to the first stop string, and the finish reason."""
    reason = "stop" if finished else "length"
    for s in stop:
        if s in text:
            text, reason = text[: text.index(s)], "stop"
    return text, reason


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
