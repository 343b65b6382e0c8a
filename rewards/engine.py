"""The scoring engine: runs every reward of a batch concurrently and never lets one stall training.

Where a reward runs is one of its traits (`reward_traits`):

- `run_in="worker"` (the default, and the only safe choice for code you did not write): in a warm pool of worker
  processes, each started once with `python -c` and fed jobs over a pipe. Every job has a wall-clock deadline
  enforced from this process: a worker past it is SIGKILLed with its whole process group and replaced, and the
  job's samples become `None` with error "timeout". Signals or asyncio inside the reward process cannot promise
  this (an alarm only works in the main thread, a C extension may never check for it, a reward may install its
  own handler, an event loop is stuck as long as a coroutine does not yield); a process kill can.
- `run_in="caller"`: in this process (a thread for a plain function, the engine's event loop for `async def`).
  For rewards that hold state a worker cannot have (the policy as its own critic) or that are trivially cheap.
  The deadline still bounds how long a call waits, but a stuck thread cannot be killed: it is abandoned.

`elementwise=True` tells the engine that a reward scores each sample on its own (math does). The worker then
calls it one sample at a time and streams each score back, so a timeout is charged to the one sample that
caused it (with the reward's `timeout_score`: math documents a prediction that times out as 0.0), and the
samples after it move to another worker. `timeout_s` is then per sample; otherwise it is per chunk. An
elementwise reward may also name a `shortcut`: a cheap, linear-time check run in this process first, which
decides the trivial samples (math: a boxed plain integer against a plain-integer gold) so that only the rest
pay for a worker round trip.

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
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.pool import _call_kwargs, _CallState, _failed, _Job, _normalise, _Pool, _reason
from rewards.registry import check_signature, required_columns, resolve_reward
from rewards.traits import RewardError, RewardTraits, reward_traits, traits_of

__all__ = [
    "RewardEngine",
    "RewardError",
    "RewardSpec",
    "RewardTraits",
    "ScoreBatch",
    "ScoreStream",
    "reward_traits",
    "traits_of",
]

logger = logging.getLogger("rewards")


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
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to the function on every call (e.g. `binary=True`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RewardError(f"reward name must be a non-empty string, got {self.name!r}")
        if not math.isfinite(self.weight):
            raise RewardError(f"reward {self.name!r}: weight must be finite, got {self.weight}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise RewardError(f"reward {self.name!r}: timeout_s must be > 0, got {self.timeout_s}")
        object.__setattr__(self, "kwargs", dict(self.kwargs))  # a copy: later edits to the caller's dict don't leak


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


# -------------------------------------------------------------------------------------------- the engine


class RewardEngine:
    """Scores batches with a list of `RewardSpec`s; all rewards of a call run at once.

    Keep one engine for a whole run: its worker processes and event loop stay warm between calls.
    `num_workers` worker processes; `memory_mb` caps each one's address space (0 = no cap); `preload` lists
    what each worker loads at start, "module" or "module:function" (called once), so the first call is not
    slow: by default math's sympy stack and its parsers.
    """

    def __init__(
        self, *, num_workers: int = 2, memory_mb: int = 4096, preload: Sequence[str] = ("rewards.math:warm_up",)
    ) -> None:
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
        self._finalizer = weakref.finalize(
            self, RewardEngine._shutdown, self._pool, self._loop, self._loop_thread, self._threads
        )

    # -- set-up checks ---------------------------------------------------------------------------------

    def resolve(self, name: str) -> Callable:
        if name not in self._fns:
            self._fns[name] = resolve_reward(name)
        return self._fns[name]

    def check_columns(self, specs: Sequence[RewardSpec], columns: Iterable[str], *, where: str) -> None:
        """Fails now, with one line naming the reward and the column, instead of at step 300."""
        available = set(columns)
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise RewardError(f"{where}: reward {spec.name!r} is listed twice")
            seen.add(spec.name)
            try:
                fn = self.resolve(spec.name)
                check_signature(fn, spec.name)
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

    def score(
        self, specs: Sequence[RewardSpec], completions: list[str], prompts: list[str], columns: Mapping[str, list]
    ) -> ScoreBatch:
        """Scores one batch (blocking). Safe to call from any thread except the engine's own loop."""
        return self.submit(specs, completions, prompts, columns).result()

    def submit(
        self, specs: Sequence[RewardSpec], completions: list[str], prompts: list[str], columns: Mapping[str, list]
    ) -> concurrent.futures.Future:
        """Starts scoring one batch and returns at once: a Future of its ScoreBatch. The caller keeps working
        (the training loop generates the next task's completions) while the workers score."""
        self._check_open()
        return asyncio.run_coroutine_threadsafe(self._score(specs, completions, prompts, columns), self._loop)

    def score_later(
        self, specs: Sequence[RewardSpec], completions: list[str], prompts: list[str], columns: Mapping[str, list]
    ) -> concurrent.futures.Future:
        """A Future of the batch's ScoreBatch, scored while the caller goes on where that is safe: when every reward
        runs in the worker processes (`runs_apart`) the batch is submitted and the call returns at once; a
        caller-run reward (the rubric critic uses the live policy) is scored now, before the caller touches the
        model again, and the Future is already done."""
        if self.runs_apart(specs):
            return self.submit(specs, completions, prompts, columns)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(self.score(specs, completions, prompts, columns))
        return done

    def runs_apart(self, specs: Sequence[RewardSpec]) -> bool:
        """Whether every reward of `specs` runs in the worker processes, so scoring cannot touch this process's
        state (a caller-run reward may use the policy itself, as the rubric critic does)."""
        return all(traits_of(self.resolve(s.name)).run_in == "worker" for s in specs)

    async def ascore(
        self, specs: Sequence[RewardSpec], completions: list[str], prompts: list[str], columns: Mapping[str, list]
    ) -> ScoreBatch:
        """Same as `score`, awaitable from the caller's event loop (the work runs on the engine's)."""
        self._check_open()
        future = asyncio.run_coroutine_threadsafe(self._score(specs, completions, prompts, columns), self._loop)
        return await asyncio.wrap_future(future)

    def stream(self, specs: Sequence[RewardSpec], prompts: list[str], columns: Mapping[str, list]) -> ScoreStream:
        """Scores one batch in pieces, as its completions become final (see `ScoreStream`)."""
        self._check_open()
        return ScoreStream(self, specs, prompts, columns)

    def elementwise(self, specs: Sequence[RewardSpec]) -> bool:
        """Whether every reward of `specs` scores each sample on its own (so a batch may be scored in pieces)."""
        return all(traits_of(self.resolve(s.name)).elementwise for s in specs)

    async def _score(self, specs, completions, prompts, columns) -> ScoreBatch:
        return _assemble(specs, await self._outcomes(specs, completions, prompts, columns), len(completions))

    async def _outcomes(self, specs, completions, prompts, columns) -> list:
        """Per spec, (values, errors, extras) aligned with `completions`."""
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
        return await asyncio.gather(*(self._one(s, fn, completions, prompts, cols) for s, fn in zip(specs, fns)))

    async def _one(self, spec: RewardSpec, fn: Callable, completions: list, prompts: list, cols: dict):
        n = len(completions)
        traits = traits_of(fn)
        if n == 0:
            return [], [], {}
        if traits.run_in == "caller":
            return await self._in_caller(spec, fn, completions, prompts, cols)
        state = _CallState(n)
        rest = list(range(n))  # the samples the workers score
        if traits.shortcut is not None and traits.elementwise:
            rest = []
            for i in range(n):
                if (value := _shortcut(traits.shortcut, completions[i], {k: v[i] for k, v in cols.items()})) is None:
                    rest.append(i)
                else:
                    state.put(i, value, None, {})
        m = len(rest)
        # Elementwise: small chunks (about 8 samples) so an idle worker can take the next one while another
        # is stuck on a slow sample; per-batch rewards: one chunk per worker.
        if traits.whole_batch:
            chunks = min(m, 1)
        elif traits.elementwise:
            chunks = min(m, max(2 * self.num_workers, -(-m // 8)))
        else:
            chunks = min(m, self.num_workers)
        bounds = [round(c * m / chunks) for c in range(chunks + 1)] if chunks else [0]
        for lo, hi in itertools.pairwise(bounds):
            part = rest[lo:hi]
            self._pool.submit(
                _Job(
                    state,
                    spec.name,
                    dict(spec.kwargs),
                    part,
                    [completions[i] for i in part],
                    [prompts[i] for i in part],
                    {k: [v[i] for i in part] for k, v in cols.items()},
                    traits.elementwise,
                    spec.timeout_s,
                    traits.timeout_score,
                )
            )
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
    def _shutdown(
        pool: _Pool,
        loop: asyncio.AbstractEventLoop,
        loop_thread: threading.Thread,
        threads: concurrent.futures.Executor,
    ) -> None:
        pool.close()
        threads.shutdown(wait=False, cancel_futures=True)
        if loop.is_closed():
            return
        loop.call_soon_threadsafe(loop.stop)
        # Close the loop once its thread has left run_forever: a loop left open is closed by the garbage collector
        # at interpreter exit, after its self-pipe may already be gone, which prints a traceback ("Invalid file
        # descriptor: -1") under an error message that must stay one line.
        if threading.current_thread() is not loop_thread:
            loop_thread.join(timeout=5.0)
            if not loop_thread.is_alive():
                loop.close()

    def __enter__(self) -> RewardEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScoreStream:
    """One batch scored in pieces: `add` the samples whose completions are final (while the others are still being
    generated), then `finish` with every completion; its Future holds the ScoreBatch of the whole batch, the same
    as one `submit` of all completions (error lines count over the whole batch).

    Only for rewards that score each sample on its own (`RewardEngine.elementwise`): a reward that compares the
    samples of a group must see them together, so `add` refuses. A sample added with a text that differs from
    the one `finish` receives is scored again with the final text.
    """

    def __init__(
        self, engine: RewardEngine, specs: Sequence[RewardSpec], prompts: list[str], columns: Mapping[str, list]
    ) -> None:
        self._engine, self._specs = engine, list(specs)
        self._prompts, self._columns = list(prompts), {k: list(v) for k, v in columns.items()}
        self._pieces: list[tuple[list[int], concurrent.futures.Future]] = []
        self._texts: dict[int, str] = {}
        self._decided: dict[int, list[float]] = {}  # sample -> every reward's value, from the shortcuts
        self._shortcuts = [traits_of(engine.resolve(spec.name)).shortcut for spec in self._specs]
        self._elementwise = engine.elementwise(self._specs)
        self._stale: set[int] = set()  # added early with a text that `finish` replaced: their early scores are dropped

    def _shortcut_values(self, i: int, completion: str) -> list[float] | None:
        """Every reward's value for sample i from its shortcut, or None if some reward has to run."""
        if not all(self._shortcuts):
            return None
        row = {k: v[i] for k, v in self._columns.items()}
        values = []
        for fn in self._shortcuts:
            if (value := _shortcut(fn, completion, row)) is None:
                return None
            values.append(value)
        return values

    def add(self, indices: Sequence[int], completions: Sequence[str]) -> None:
        if not self._elementwise:
            raise RewardError("a batch can be scored in pieces only when every reward is elementwise")
        indices = list(indices)
        if not indices:
            return
        if any(i in self._texts for i in indices):
            raise RewardError("a sample was added to the score stream twice")
        self._texts.update(zip(indices, completions))
        # Samples that every reward's in-process shortcut decides are decided here and now (microseconds each);
        # only the rest go to the engine, whose thread would otherwise compete with the caller (still generating)
        # for the interpreter lock.
        early = []
        for i, c in zip(indices, completions):
            values = self._shortcut_values(i, c)
            if values is None:
                early.append(i)
            else:
                self._decided[i] = values
        if early:
            self._pieces.append((early, self._submit(early, [self._texts[i] for i in early])))

    def finish(self, completions: Sequence[str]) -> concurrent.futures.Future:
        n = len(completions)
        if n != len(self._prompts):
            raise RewardError(f"got {n} completions for {len(self._prompts)} prompts")
        rest = [i for i in range(n) if self._texts.get(i) != completions[i]]
        self._stale = {i for i in rest if i in self._texts}
        for i in rest:
            self._decided.pop(i, None)
        if rest:
            self._pieces.append((rest, self._submit(rest, [completions[i] for i in rest])))
        return asyncio.run_coroutine_threadsafe(self._gather(n), self._engine._loop)

    def _submit(self, indices: list[int], completions: list[str]) -> concurrent.futures.Future:
        prompts = [self._prompts[i] for i in indices]
        columns = {k: [v[i] for i in indices] for k, v in self._columns.items()}
        return asyncio.run_coroutine_threadsafe(
            self._engine._outcomes(self._specs, completions, prompts, columns), self._engine._loop
        )

    async def _gather(self, n: int) -> ScoreBatch:
        merged = [([None] * n, [None] * n, {}) for _ in self._specs]
        for i, values in self._decided.items():  # as the engine records a shortcut's verdict: no error, no extras
            for (vals, _, _), value in zip(merged, values):
                vals[i] = value
        for k, (indices, future) in enumerate(self._pieces):
            final = k == len(self._pieces) - 1 and bool(self._stale)  # `finish`'s piece holds the re-scored texts
            for (values, errs, extras), (v, e, x) in zip(merged, await asyncio.wrap_future(future)):
                for j, i in enumerate(indices):
                    if i in self._stale and not final:
                        continue
                    values[i], errs[i] = v[j], e[j]
                    for key, vals in x.items():
                        extras.setdefault(key, [None] * n)[i] = vals[j]
        return _assemble(self._specs, merged, n)


def _shortcut(fn: Callable[[str, dict], float | None], completion: str, row: dict) -> float | None:
    """A shortcut's verdict; None (the reward proper decides) when it declines, raises or returns a non-number."""
    try:
        value = fn(completion, row)
    except Exception:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _assemble(specs: Sequence[RewardSpec], outcomes: list, n: int) -> ScoreBatch:
    rewards: dict[str, list[float | None]] = {}
    errors: dict[str, int] = {}
    messages: list[str] = []
    extras: dict[str, list] = {}
    sample_errors: dict[str, list[str | None]] = {}
    for spec, (values, errs, ext) in zip(specs, outcomes):
        # A NaN/inf is a failure: None, and counted as an error. A None the reward chose itself ("cannot score this
        # one") is not an error; it is counted in frac_unscorable by the caller.
        values, errs = list(values), list(errs)
        for i, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                values[i], errs[i] = None, errs[i] or f"the reward returned {v}"
        rewards[spec.name] = values
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
    return ScoreBatch(
        rewards=rewards, total=total, errors=errors, messages=messages, extras=extras, sample_errors=sample_errors
    )
