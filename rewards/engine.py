"""The scoring engine: runs every reward of a batch concurrently and never lets one stall training.

Where a reward runs is one of its traits (`reward_traits`):

- `run_in="worker"` (the default, and the only safe choice for code you did not write): in a warm pool of worker
  processes, each started once with `python -c` and fed jobs over a pipe. Every job has a wall-clock deadline
  enforced from this process: a worker past it is SIGKILLed with its whole process group and replaced, and the
  job's samples become `None` with error "timeout". Signals or asyncio inside the reward process cannot do this
  (a CPU loop in C, e.g. sympy computing `10**10**10`, never returns to the interpreter), a process kill can.
- `run_in="caller"`: in this process (a thread for a plain function, the engine's event loop for `async def`).
  For rewards that hold state a worker cannot have (the policy as its own critic) or that are trivially cheap.
  The deadline still bounds how long a call waits, but a stuck thread cannot be killed: it is abandoned.

`elementwise=True` tells the engine that a reward scores each sample on its own (math does). The worker then
calls it one sample at a time and streams each score back, so a timeout is charged to the one sample that
caused it (with the reward's `timeout_score`: math documents a prediction that times out as 0.0), and the
samples after it move to another worker. `timeout_s` is then per sample; otherwise it is per chunk.

Workers are separate interpreters started with `subprocess` rather than `multiprocessing`: no fork of a process
that holds threads (torch, this engine's own), no re-import of the caller's `__main__`, and a process group per
worker so a reward's own children die with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import MappingProxyType
from typing import Any, Literal

logger = logging.getLogger("rewards")

_MAX_REASON = 160  # characters kept of an error reason: messages are log lines, not tracebacks


class RewardError(ValueError):
    """A reward cannot be used as configured (unknown name, missing column, bad option). One-line message."""


# ----------------------------------------------------------------------------------------------- traits


@dataclass(frozen=True)
class RewardTraits:
    run_in: Literal["worker", "caller"] = "worker"
    """"worker": a killable worker process (default). "caller": this process, for stateful or trivial rewards."""
    elementwise: bool = False
    """Scores each sample independently: the engine may call it per sample and charges a timeout to one sample."""
    timeout_score: float | None = None
    """Score of a sample whose own evaluation timed out (elementwise only); None = unscorable."""
    whole_batch: bool = False
    """Never split the batch into chunks (group-relative rewards that compare completions of one prompt)."""


_TRAITS_ATTR = "__rlk2_reward_traits__"


def reward_traits(**traits: Any) -> Callable[[Callable], Callable]:
    """Decorator declaring how the engine runs a reward, e.g. `@reward_traits(elementwise=True)`."""
    value = RewardTraits(**traits)

    def mark(fn: Callable) -> Callable:
        setattr(fn, _TRAITS_ATTR, value)
        return fn

    return mark


def traits_of(fn: Callable) -> RewardTraits:
    return getattr(fn, _TRAITS_ATTR, None) or RewardTraits()


# ------------------------------------------------------------------------------------------ public types


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a run: which function, its weight, its deadline and its options."""

    name: str
    """As given to `rewards.resolve_reward`: a REWARDS key, `pkg.module:function` or an entry point name."""
    weight: float = 1.0
    """Weight in the total reward; 0 logs the reward as a metric without training on it."""
    timeout_s: float = 10.0
    """Wall-clock deadline per call (per chunk; per sample for elementwise rewards), enforced by killing."""
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Extra keyword arguments passed to the function on every call (e.g. `binary=True`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RewardError(f"reward name must be a non-empty string, got {self.name!r}")
        if not math.isfinite(self.weight):
            raise RewardError(f"reward {self.name!r}: weight must be finite, got {self.weight}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise RewardError(f"reward {self.name!r}: timeout_s must be > 0, got {self.timeout_s}")
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))


@dataclass
class ScoreBatch:
    rewards: dict[str, list[float | None]]
    """Per reward name, aligned with the completions."""
    total: list[float | None]
    """Weighted sum over the rewards with weight != 0; None if any of those is None for the sample."""
    errors: dict[str, int]
    """Number of samples with an error per reward name in this call (0 for rewards without errors)."""
    messages: list[str]
    """Short error lines (reward name + reason + how many + an example sample index), for logging."""
    extras: dict[str, list]
    """Per-sample extra info returned by rewards, keyed "<reward>/<key>" (e.g. "rubric/reasons")."""
    sample_errors: dict[str, list[str | None]] = field(default_factory=dict)
    """Per reward name, the error reason of each sample (None where it scored cleanly)."""


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
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
            errors[i] = errors[i] or f"returned {type(v).__name__}, not a number"
        if not math.isfinite(f):
            errors[i] = errors[i] or f"returned {v!r}"
            values.append(None)
        else:
            values.append(f)
    return values, errors, extras


def _failed(n: int, reason: str) -> tuple[list[float | None], list[str | None], dict[str, list]]:
    return [None] * n, [reason] * n, {}


def _run_sync(fn: Callable, completions: list, prompts: list, columns: Mapping[str, list],
              kwargs: Mapping[str, Any], loop: asyncio.AbstractEventLoop | None):
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
    for module in filter(None, preload.split(",")):
        try:
            importlib.import_module(module)
        except Exception as exc:  # reported when a job needs it; a broken optional module must not kill the pool
            print(f"rewards worker: preload {module} failed: {_reason(exc)}", file=sys.stderr)
    from rewards import resolve_reward

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
    except (TypeError, AttributeError, ValueError) as exc:  # unpicklable extras: keep the scores, say why
        kind, *rest = message
        reason = f"extras not picklable: {_reason(exc)}"
        if kind == "item":
            i, value, _, _ = rest
            outbox.send(("item", i, value, reason, {}))
        else:
            values, _, _ = rest
            outbox.send(("batch", values, [reason] * len(values), {}))


_WORKER_CODE = "import sys; from rewards.engine import _worker_main; _worker_main(*map(int, sys.argv[1:4]), sys.argv[4])"


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
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,  # keep stdout clean for the CLI
                start_new_session=True, env=env, close_fds=True,
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

    def sub(self, start: int) -> _Job:
        """The samples from `start` on, as a job of their own (moved to another worker after a kill)."""
        return _Job(self.state, self.name, self.kwargs, self.positions[start:], self.completions[start:],
                    self.prompts[start:], {k: v[start:] for k, v in self.columns.items()}, self.elementwise,
                    self.timeout_s, self.timeout_score)


class _Pool:
    """Worker slots fed from one priority queue: a slot thread per worker, which owns the deadline."""

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self, num_workers: int, memory_mb: int, preload: str) -> None:
        self.memory_mb, self.preload = memory_mb, preload
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.seq = itertools.count()
        self.kills = 0
        self.threads = [threading.Thread(target=self._slot, name=f"rewards-slot-{k}", daemon=True)
                        for k in range(num_workers)]
        self.workers: list[_Worker | None] = [None] * num_workers
        for k, t in enumerate(self.threads):
            self.workers[k] = _Worker(memory_mb, preload)  # started now so the first call finds them warm
            t.start()

    def submit(self, job: _Job, *, urgent: bool = False) -> None:
        self.queue.put((0 if urgent else 1, next(self.seq), job))

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put((2, next(self.seq), None))
        for t in self.threads:
            t.join(timeout=5)
        for k, w in enumerate(self.workers):
            if w is not None:
                w.kill()
                self.workers[k] = None

    def _slot(self) -> None:
        k = self.threads.index(threading.current_thread())
        while True:
            job = self.queue.get()[2]
            if job is None:
                return
            try:
                self._run(k, job)
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
        self.kills += 1
        self.workers[k] = _Worker(self.memory_mb, self.preload)  # starts while the slot reports and moves on

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
        except (OSError, ValueError):
            self._replace(k)
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


# -------------------------------------------------------------------------------------------- the engine


class RewardEngine:
    """Scores batches with a list of `RewardSpec`s; all rewards of a call run at once.

    Keep one engine for a whole run: its worker processes and event loop stay warm between calls.
    `num_workers` worker processes; `memory_mb` caps each one's address space (0 = no cap); `preload` are
    modules each worker imports at start (math's sympy stack by default) so the first call is not slow.
    """

    def __init__(self, *, num_workers: int = 2, memory_mb: int = 4096,
                 preload: Sequence[str] = ("rewards.math",)) -> None:
        if num_workers < 1:
            raise RewardError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self._fns: dict[str, Callable] = {}
        self._pool = _Pool(num_workers, memory_mb, ",".join(preload))
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="rewards-caller")
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="rewards-loop", daemon=True)
        self._loop_thread.start()
        self._closed = False
        self._finalizer = weakref.finalize(self, RewardEngine._shutdown, self._pool, self._loop, self._threads)

    # -- set-up checks ---------------------------------------------------------------------------------

    def resolve(self, name: str) -> Callable:
        if name not in self._fns:
            from rewards import resolve_reward

            self._fns[name] = resolve_reward(name)
        return self._fns[name]

    def check_columns(self, specs: Sequence[RewardSpec], columns: Iterable[str], *, where: str) -> None:
        """Fails now, with one line naming the reward and the column, instead of at step 300."""
        from rewards import required_columns

        available = set(columns)
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise RewardError(f"{where}: reward {spec.name!r} is listed twice")
            seen.add(spec.name)
            try:
                fn = self.resolve(spec.name)
            except RewardError as exc:
                raise RewardError(f"{where}: {exc}") from None
            params = inspect.signature(fn).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                for key in spec.kwargs:
                    if key not in params:
                        raise RewardError(f"{where}: reward {spec.name!r} has no option {key!r}")
            for col in required_columns(fn):
                if col not in available and col not in spec.kwargs:
                    have = ", ".join(sorted(available)) or "none"
                    raise RewardError(f"{where}: reward {spec.name!r} needs column {col!r} (columns: {have})")

    # -- scoring ---------------------------------------------------------------------------------------

    def score(self, specs: Sequence[RewardSpec], completions: list[str], prompts: list[str],
              columns: Mapping[str, list]) -> ScoreBatch:
        """Scores one batch (blocking). Safe to call from any thread except the engine's own loop."""
        self._check_open()
        return asyncio.run_coroutine_threadsafe(self._score(specs, completions, prompts, columns), self._loop).result()

    async def ascore(self, specs: Sequence[RewardSpec], completions: list[str], prompts: list[str],
                     columns: Mapping[str, list]) -> ScoreBatch:
        """Same as `score`, awaitable from the caller's event loop (the work runs on the engine's)."""
        self._check_open()
        future = asyncio.run_coroutine_threadsafe(self._score(specs, completions, prompts, columns), self._loop)
        return await asyncio.wrap_future(future)

    async def _score(self, specs, completions, prompts, columns) -> ScoreBatch:
        n = len(completions)
        completions, prompts = list(completions), list(prompts)
        if len(prompts) != n:
            raise RewardError(f"got {len(prompts)} prompts for {n} completions")
        cols = {}
        for key, values in columns.items():
            cols[key] = list(values)
            if len(cols[key]) != n:
                raise RewardError(f"column {key!r} has {len(cols[key])} values for {n} completions")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise RewardError(f"a reward is listed twice in {names}")
        fns = [self.resolve(s.name) for s in specs]
        outcomes = await asyncio.gather(*(self._one(s, fn, completions, prompts, cols) for s, fn in zip(specs, fns)))
        return _assemble(specs, outcomes, n)

    async def _one(self, spec: RewardSpec, fn: Callable, completions: list, prompts: list, cols: dict):
        n = len(completions)
        traits = traits_of(fn)
        if n == 0:
            return [], [], {}
        if traits.run_in == "caller":
            return await self._in_caller(spec, fn, completions, prompts, cols)
        state = _CallState(n)
        chunks = 1 if traits.whole_batch else min(n, self.num_workers * (4 if traits.elementwise else 1))
        bounds = [round(c * n / chunks) for c in range(chunks + 1)]
        for lo, hi in itertools.pairwise(bounds):
            self._pool.submit(_Job(state, spec.name, dict(spec.kwargs), list(range(lo, hi)), completions[lo:hi],
                                   prompts[lo:hi], {k: v[lo:hi] for k, v in cols.items()}, traits.elementwise,
                                   spec.timeout_s, traits.timeout_score))
        await asyncio.wrap_future(state.future)
        return state.values, state.errors, state.extras

    async def _in_caller(self, spec: RewardSpec, fn: Callable, completions: list, prompts: list, cols: dict):
        n = len(completions)
        try:
            kwargs = _call_kwargs(fn, prompts, cols, spec.kwargs)
            if inspect.iscoroutinefunction(fn):
                result = await asyncio.wait_for(fn(completions, **kwargs), spec.timeout_s)
            else:
                call = self._loop.run_in_executor(self._threads, lambda: fn(completions, **kwargs))
                result = await asyncio.wait_for(call, spec.timeout_s)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, spec.timeout_s)
            return _normalise(result, n)
        except (asyncio.TimeoutError, TimeoutError):
            return _failed(n, "timeout")
        except Exception as exc:
            return _failed(n, _reason(exc))

    # -- lifetime --------------------------------------------------------------------------------------

    @property
    def workers_replaced(self) -> int:
        """How many worker processes were killed and replaced (timeouts, crashes) since start."""
        return self._pool.kills

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RewardEngine is closed")

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    @staticmethod
    def _shutdown(pool: _Pool, loop: asyncio.AbstractEventLoop, threads: concurrent.futures.Executor) -> None:
        pool.close()
        threads.shutdown(wait=False, cancel_futures=True)
        loop.call_soon_threadsafe(loop.stop)

    def __enter__(self) -> RewardEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _assemble(specs: Sequence[RewardSpec], outcomes: list, n: int) -> ScoreBatch:
    rewards: dict[str, list[float | None]] = {}
    errors: dict[str, int] = {}
    messages: list[str] = []
    extras: dict[str, list] = {}
    sample_errors: dict[str, list[str | None]] = {}
    for spec, (values, errs, ext) in zip(specs, outcomes):
        rewards[spec.name] = list(values)
        sample_errors[spec.name] = list(errs)
        by_reason: dict[str, list[int]] = {}
        for i, e in enumerate(errs):
            if e is not None:
                by_reason.setdefault(e, []).append(i)
        errors[spec.name] = sum(len(v) for v in by_reason.values())
        for reason, idx in by_reason.items():
            line = f"reward {spec.name!r}: {reason} ({len(idx)} of {n} samples, e.g. #{idx[0]})"
            messages.append(line)
            logger.warning(line)
        for key, values_ in ext.items():
            extras[f"{spec.name}/{key}"] = values_
    weighted = [s for s in specs if s.weight != 0]
    total: list[float | None] = []
    for i in range(n):
        parts = [rewards[s.name][i] for s in weighted]
        total.append(None if any(p is None for p in parts) else sum(s.weight * p for s, p in zip(weighted, parts)))
    return ScoreBatch(rewards=rewards, total=total, errors=errors, messages=messages, extras=extras,
                      sample_errors=sample_errors)
