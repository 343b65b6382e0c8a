"""Calling a reward function, and the pool of worker processes that runs rewards with a killable deadline.

See `rewards.engine` for what runs where and why. This module is the mechanism: one thread per worker slot
sends a job over a pipe, waits for the answer with `poll(deadline)`, and on a missed deadline SIGKILLs the
worker's process group, charges the samples, requeues what is left and starts a replacement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import math
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from rewards.registry import resolve_reward

logger = logging.getLogger("rewards")

_MAX_REASON = 160  # characters kept of an error reason: messages are log lines, not tracebacks


# ------------------------------------------------------------------------------- calling one function


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[:_MAX_REASON]


def _call_kwargs(fn: Callable, prompts: list, columns: Mapping[str, list], kwargs: Mapping[str, Any]) -> dict:
    """Keyword arguments for `fn`: only the columns it names, or all of them if it takes `**columns`."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out = {k: v for k, v in columns.items() if takes_all or k in params}
    if takes_all or "prompts" in params:
        out["prompts"] = prompts
    out.update(kwargs)
    return out


def _normalise(result: Any, n: int) -> tuple[list[float | None], list[str | None], dict[str, list]]:
    """Checks a reward's return value: n numbers or None, or {"rewards", "errors"?, "extras"?}."""
    errors: list[str | None] = [None] * n
    extras: dict[str, list] = {}
    if isinstance(result, Mapping):
        if "rewards" not in result:
            raise TypeError("returned a dict without a 'rewards' key")
        if result.get("errors") is not None:
            errors = [None if e is None else str(e)[:_MAX_REASON] for e in result["errors"]]
            if len(errors) != n:
                raise ValueError(f"returned {len(errors)} errors for {n} completions")
        for key, values in (result.get("extras") or {}).items():
            values = list(values)
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values of extra {key!r} for {n} completions")
            extras[str(key)] = values
        result = result["rewards"]
    if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
        raise TypeError(f"returned {type(result).__name__}, expected a list of float | None")
    raw = list(result)
    if len(raw) != n:
        raise ValueError(f"returned {len(raw)} values for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(raw):
        if v is None:
            values.append(None)
            continue
        try:
            if isinstance(v, (str, bytes)):  # float("1.0") would pass: a reward returns numbers, not text
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
            errors[i] = errors[i] or f"returned {type(v).__name__} {v!r:.40}, not a number"
        if not math.isfinite(f):
            errors[i] = errors[i] or f"returned {v!r}"
            values.append(None)
        else:
            values.append(f)
    return values, errors, extras


def _failed(n: int, reason: str) -> tuple[list[float | None], list[str | None], dict[str, list]]:
    return [None] * n, [reason] * n, {}


def _run_sync(
    fn: Callable,
    completions: list,
    prompts: list,
    columns: Mapping[str, list],
    kwargs: Mapping[str, Any],
    loop: asyncio.AbstractEventLoop | None,
):
    """Calls `fn` once on a batch (awaiting it on `loop` if it is async); never raises."""
    n = len(completions)
    try:
        result = fn(list(completions), **_call_kwargs(fn, list(prompts), columns, kwargs))
        if inspect.isawaitable(result):
            result = (loop or asyncio.new_event_loop()).run_until_complete(result)
        return _normalise(result, n)
    except Exception as exc:  # the reward's bug, not the sample's: unscorable, never 0.0
        return _failed(n, _reason(exc))


# ------------------------------------------------------------------------------------- worker process


def _worker_main(rfd: int, wfd: int, memory_mb: int, preload: str) -> None:
    """Entry point of a worker process: receive jobs, send scores, until the pipe closes."""
    import importlib
    import resource

    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    parent = os.getppid()
    try:  # Linux: die with the parent even if it is SIGKILLed while we are busy
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            return
    except (OSError, AttributeError):
        pass
    if memory_mb > 0:  # a runaway sympy/bignum allocation fails with MemoryError instead of swapping the host
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for item in filter(None, preload.split(",")):  # "module" to import, or "module:function" to call as well
        module, _, func = item.partition(":")
        try:
            loaded = importlib.import_module(module)
            if func:
                getattr(loaded, func)()
        except Exception as exc:  # reported when a job needs it; a broken optional module must not kill the pool
            print(f"rewards worker: preload {item} failed: {_reason(exc)}", file=sys.stderr)
    loop = asyncio.new_event_loop()  # one loop for the worker's life: async rewards may keep clients on it
    fns: dict[str, Callable] = {}
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            name, kwargs, completions, prompts, columns, elementwise = inbox.recv()
        except (EOFError, OSError):
            return
        try:
            fn = fns[name] if name in fns else fns.setdefault(name, resolve_reward(name))
        except Exception as exc:
            outbox.send(("batch", *_failed(len(completions), _reason(exc))))
            continue
        if not elementwise:
            _send(outbox, ("batch", *_run_sync(fn, completions, prompts, columns, kwargs, loop)))
            continue
        for i in range(len(completions)):
            one = {k: [v[i]] for k, v in columns.items()}
            values, errors, extras = _run_sync(fn, [completions[i]], [prompts[i]], one, kwargs, loop)
            _send(outbox, ("item", i, values[0], errors[0], {k: v[0] for k, v in extras.items()}))


def _send(outbox: Connection, message: tuple) -> None:
    try:
        outbox.send(message)
    except (
        TypeError,
        AttributeError,
        ValueError,
        pickle.PicklingError,
    ) as exc:  # unpicklable extras: keep the scores, say why
        kind, *rest = message
        reason = f"extras not picklable: {_reason(exc)}"
        if kind == "item":
            i, value, _, _ = rest
            outbox.send(("item", i, value, reason, {}))
        else:
            values, _, _ = rest
            outbox.send(("batch", values, [reason] * len(values), {}))


_WORKER_CODE = "import sys; from rewards.pool import _worker_main; _worker_main(*map(int, sys.argv[1:4]), sys.argv[4])"


class _Worker:
    """One worker process plus the pipes to it. Owned by exactly one slot thread."""

    def __init__(self, memory_mb: int, preload: str) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # the caller's import path, so that `pkg.module:function` resolves in the worker as it does here
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p) or "."
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, str(to_child_r), str(from_child_w), str(memory_mb), preload],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,  # keep stdout clean for the CLI
                start_new_session=True,
                env=env,
                close_fds=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.tx = Connection(to_child_w, readable=False)
        self.rx = Connection(from_child_r, writable=False)
        self.ready = False

    def wait_ready(self, timeout: float) -> str | None:
        """None when ready, else why not."""
        if self.ready:
            return None
        try:
            if not self.rx.poll(timeout):
                return f"worker did not start within {timeout:.0f} s"
            self.rx.recv()
        except (EOFError, OSError):
            return f"worker failed to start (exit code {self.proc.wait()})"
        self.ready = True
        return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.tx.close()
        self.rx.close()

    def exit_reason(self) -> str:
        code = self.proc.wait()
        if code < 0:
            return f"worker died ({signal.Signals(-code).name})"
        return f"worker died (exit code {code})"


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


class _CallState:
    """The results of one reward over one call's batch, filled by slot threads, awaited by the engine."""

    def __init__(self, n: int) -> None:
        self.values: list[float | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self.extras: dict[str, list] = {}
        self.left = n
        self.lock = threading.Lock()
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        if n == 0:
            self.future.set_result(None)

    def put(self, i: int, value: float | None, error: str | None, extras: Mapping[str, Any]) -> None:
        with self.lock:
            self.values[i], self.errors[i] = value, error
            for k, v in extras.items():
                self.extras.setdefault(k, [None] * len(self.values))[i] = v
            self.left -= 1
            if self.left == 0:
                self.future.set_result(None)


@dataclass
class _Job:
    state: _CallState
    name: str
    kwargs: dict
    positions: list[int]  # where each sample of the chunk goes in state
    completions: list
    prompts: list
    columns: dict
    elementwise: bool
    timeout_s: float
    timeout_score: float | None
    retries: int = 0

    def sub(self, start: int) -> _Job:
        """The samples from `start` on, as a job of their own (moved to another worker after a kill)."""
        return _Job(
            self.state,
            self.name,
            self.kwargs,
            self.positions[start:],
            self.completions[start:],
            self.prompts[start:],
            {k: v[start:] for k, v in self.columns.items()},
            self.elementwise,
            self.timeout_s,
            self.timeout_score,
        )


class _Closed(Exception):
    """The pool was closed while a slot was running a job (an interrupt, the end of a run)."""


class _Pool:
    """Worker slots fed from one priority queue: a slot thread per worker, which owns the deadline."""

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self, num_workers: int, memory_mb: int, preload: str) -> None:
        self.memory_mb, self.preload = memory_mb, preload
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.seq = itertools.count()
        self.kills = 0
        self.closed = False
        # Every worker is started from this one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that
        # started a process exits, so starting from whichever thread built the engine could kill the pool.
        self.spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards-spawner")
        self.threads = [
            threading.Thread(target=self._slot, name=f"rewards-slot-{k}", daemon=True) for k in range(num_workers)
        ]
        self.workers: list[_Worker | None] = [self._spawn() for _ in range(num_workers)]  # warm for the 1st call
        for t in self.threads:
            t.start()

    def _spawn(self) -> _Worker:
        return self.spawner.submit(_Worker, self.memory_mb, self.preload).result()

    def submit(self, job: _Job, *, urgent: bool = False) -> None:
        self.queue.put((0 if urgent else 1, next(self.seq), job))

    def close(self) -> None:
        self.closed = True
        for _ in self.threads:
            self.queue.put((2, next(self.seq), None))
        for t in self.threads:
            t.join(timeout=5)
        for k, w in enumerate(self.workers):
            if w is not None:
                w.kill()
                self.workers[k] = None
        self.spawner.shutdown(wait=False)

    def _slot(self) -> None:
        k = self.threads.index(threading.current_thread())
        while True:
            job = self.queue.get()[2]
            if job is None:
                return
            if self.closed:  # closing (an interrupt): fail what is left quietly, start nothing new
                self._fail(job, 0, "reward engine closed")
                continue
            try:
                self._run(k, job)
            except _Closed:
                self._fail(job, 0, "reward engine closed")
            except Exception as exc:  # a bug here must not hang the caller: fail the job loudly
                logger.exception("rewards: slot %d failed on %s", k, job.name)
                self._fail(job, 0, f"engine error: {_reason(exc)}")

    @staticmethod
    def _fail(job: _Job, start: int, reason: str, value: float | None = None) -> None:
        for pos in job.positions[start:]:
            job.state.put(pos, value, reason, {})

    def _replace(self, k: int) -> None:
        worker = self.workers[k]
        if worker is not None:
            worker.kill()
        if self.closed:  # the pool is closing and killed this slot's worker: no replacement
            self.workers[k] = None
            raise _Closed
        self.kills += 1
        self.workers[k] = self._spawn()  # Popen returns at once: the new worker imports while the slot moves on

    def _run(self, k: int, job: _Job) -> None:
        worker = self.workers[k]
        if worker is None or worker.proc.poll() is not None:
            self._replace(k)
            worker = self.workers[k]
        why = worker.wait_ready(self.STARTUP_TIMEOUT_S)
        if why is not None:
            self._replace(k)
            self._fail(job, 0, why)
            return
        n = len(job.positions)
        try:
            worker.tx.send((job.name, job.kwargs, job.completions, job.prompts, job.columns, job.elementwise))
        except OSError:  # the idle worker died (OOM killer, a signal): a fresh one gets the job, twice at most
            self._replace(k)
            job.retries += 1
            if job.retries > 2:
                self._fail(job, 0, "worker died before the job could be sent")
            else:
                self.submit(job, urgent=True)
            return
        done = 0
        deadline = time.monotonic() + job.timeout_s
        while done < n:
            left = deadline - time.monotonic()
            try:
                message = worker.rx.recv() if left > 0 and worker.rx.poll(left) else None
            except (EOFError, OSError):
                reason = worker.exit_reason()
                self._replace(k)
                self._cut(job, done, reason, None)
                return
            if message is None:
                self._replace(k)
                self._cut(job, done, "timeout", job.timeout_score)
                return
            if message[0] == "item":
                _, i, value, error, extras = message
                job.state.put(job.positions[i], value, error, extras)
                done = i + 1
                deadline = time.monotonic() + job.timeout_s  # per sample
            else:
                _, values, errors, extras = message
                for i, pos in enumerate(job.positions):
                    job.state.put(pos, values[i], errors[i], {key: v[i] for key, v in extras.items()})
                done = n

    def _cut(self, job: _Job, done: int, reason: str, value: float | None) -> None:
        """After a kill: charge the sample in progress (elementwise) or the whole chunk, requeue the rest."""
        if job.elementwise:
            job.state.put(job.positions[done], value, reason, {})
            if done + 1 < len(job.positions):
                self.submit(job.sub(done + 1), urgent=True)
        else:
            self._fail(job, done, reason)
