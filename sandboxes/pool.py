"""The warm pool: long-lived sandboxes ("slots"), one worker thread each, sharing one job queue.

Backends differ only in how a slot starts, talks to its runner and dies (Docker container, bubblewrap process);
queueing, balancing, retries and recycling live here. A free worker takes the next job, so jobs spread over
slots (and over engines) by availability. The wall-clock limit is enforced inside the sandbox by the runner;
the host adds its own deadline (job timeout + grace) and recycles a slot that does not answer in time.

Pipelining: while more jobs are queued than workers wait for one, a worker keeps up to `pipeline` jobs in flight
to its runner (it sends the next before waiting for an answer), so the runner starts the next job as soon as one
ends instead of idling for a round trip through the engine. The runner runs them one at a time, in order, each in
its own job process; after a job that leaves the sandbox unclean it runs nothing more and exits (the host
recycles the slot and puts the jobs it did not answer back at the front of the queue, uncounted).

Failure policy:
- a slot whose runner reports leftovers (processes, files it could not wipe, SysV IPC objects) is recycled;
- jobs sent behind one that hung, died or left leftovers never ran: they are requeued as they were;
- a slot that dies mid-job while its engine still answers is recycled and the job retried once on another slot;
  if it kills a second sandbox it is `runtime_error` (the job did it);
- a slot whose engine is lost is parked (restart retried with backoff) and its job goes back to the front of
  the queue for the other slots; after `max_attempts` engine losses the job is `infra_error`;
- when every slot is down, queued jobs end as `infra_error` at once rather than waiting forever.
"""

from __future__ import annotations

import abc
import atexit
import collections
import json
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sandboxes.result import ExecutionResult, Job, SandboxUnavailable, Status

log = logging.getLogger("sandboxes")


@dataclass(frozen=True)
class Limits:
    """Per-job limits. A job's own timeout_s / memory_mb override the defaults, capped by the maxima."""

    timeout_s: float = 10.0
    """Default wall-clock limit of one job (program plus all its tests), seconds."""
    memory_mb: int = 512
    """Default address-space limit of each job process (RLIMIT_AS), MiB."""
    max_timeout_s: float = 120.0
    """Largest timeout a job may ask for."""
    max_memory_mb: int = 2048
    """Largest address space a job may ask for (a Docker slot also caps it at the container's memory)."""
    file_size_mb: int = 16
    """Largest file a job may write (RLIMIT_FSIZE); also caps its captured stdout/stderr before truncation."""
    nofile: int = 64
    """Open files per job process (RLIMIT_NOFILE)."""
    nproc: int = 32
    """Processes for the sandbox's uid (RLIMIT_NPROC); the container pids limit backs it up."""
    max_output: int = 8192
    """Characters of stdout and of stderr returned per job (the rest is counted and dropped)."""
    grace_s: float = 10.0
    """How long past a job's timeout the host waits for the runner before it recycles the slot."""

    def payload(self, job: Job, memory_cap_mb: int | None = None) -> dict[str, Any]:
        memory = min(job.memory_mb or self.memory_mb, self.max_memory_mb, memory_cap_mb or 1 << 30)
        msg: dict[str, Any] = {
            "code": job.code,
            "timeout_s": min(job.timeout_s or self.timeout_s, self.max_timeout_s),
            "memory_mb": memory,
            "file_size_bytes": self.file_size_mb << 20,
            "nofile": self.nofile,
            "nproc": self.nproc,
            "max_output": self.max_output,
        }
        if job.test_cases is not None:
            msg["test_cases"] = [{"stdin": i, "stdout": o} for i, o in job.test_cases]
        else:
            msg["tests"] = job.tests
            msg["entry_point"] = job.entry_point
        return msg


def default_pool_size(cpus: int) -> int:
    """Docker: one sandbox per CPU (at least 2, at most 32). A sandbox runs one job at a time and pipelining keeps
    it fed; on 2 busy cores, 2 containers ran HumanEval as fast as 4 or faster, at no more CPU per program
    (bench/README.md)."""
    return max(2, min(32, cpus))


class SlotError(Exception):
    """A slot could not start (engine unreachable, image missing, bubblewrap refused)."""


class SlotDied(Exception):
    """The sandbox went away mid-job (connection closed, process exited)."""


class SlotHung(Exception):
    """The runner did not answer before the host deadline."""


class Slot(abc.ABC):
    """One sandbox with its runner. Not thread-safe: exactly one worker thread drives it."""

    engine: str  # slots sharing an engine are lost together
    label: str = ""

    @abc.abstractmethod
    def start(self) -> None:
        """Create the sandbox and wait for the runner's ready line; raise SlotError."""

    @abc.abstractmethod
    def send(self, lines: bytes, timeout_s: float) -> None:
        """Write job lines (each ending in a newline) to the runner; raise SlotDied / SlotHung."""

    @abc.abstractmethod
    def receive(self, timeout_s: float) -> dict[str, Any]:
        """The runner's next result line, parsed; raise SlotDied / SlotHung."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Destroy the sandbox (idempotent, never raises)."""

    def engine_ok(self) -> bool:
        """Does the engine behind this slot still answer? (Local backends: always.)"""
        return True

    @property
    def memory_cap_mb(self) -> int | None:
        return None


@dataclass
class _Item:
    job: Job
    future: Future
    engine_losses: int = 0
    deaths: int = 0
    runner_faults: int = 0


@dataclass
class PoolStats:
    jobs: int = 0
    recycled: int = 0
    retried: int = 0
    per_slot: dict[str, int] = field(default_factory=dict)


_LIVE_POOLS: weakref.WeakSet[SlotPool] = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


class SlotPool:
    """The backend object users hold: `run(job)`, `run_batch(jobs)`, `submit(job)`, `close()`."""

    def __init__(
        self,
        name: str,
        slots: list[Slot],
        limits: Limits,
        *,
        max_attempts: int = 3,
        start_timeout_s: float = 120.0,
        pipeline: int = 2,
    ) -> None:
        if not slots:
            raise SandboxUnavailable(f"{name}: no slots configured")
        if pipeline < 1:
            raise ValueError("pipeline must be at least 1")
        self.name, self.limits, self.max_attempts, self.pipeline = name, limits, max_attempts, pipeline
        self._waiting = 0  # workers blocked in _take(): jobs beyond these may be pipelined
        self.slots = slots
        self.stats = PoolStats()
        self._queue: collections.deque[_Item] = collections.deque()
        self._cv = threading.Condition()
        self._state = {id(s): "starting" for s in slots}
        self._reason: dict[int, str] = {}
        self._closed = False
        self._closing = threading.Event()  # backoff sleeps wait on this, not on _cv, so notify() reaches idle workers
        self._threads = [
            threading.Thread(target=self._worker, args=(s,), name=f"{name}-slot{i}", daemon=True)
            for i, s in enumerate(slots)
        ]
        for t in self._threads:
            t.start()
        _LIVE_POOLS.add(self)
        deadline = time.monotonic() + start_timeout_s
        with self._cv:
            while not self._any("ready") and self._any("starting") and time.monotonic() < deadline:
                self._cv.wait(0.1)
            ready = self._any("ready")
        if not ready:
            reasons = "; ".join(sorted(set(self._reason.values()))) or "slots did not start in time"
            self.close()
            raise SandboxUnavailable(f"{name}: no sandbox could start ({reasons})")

    # ------------------------------------------------------------------------------------------------ public
    def submit(self, job: Job | Mapping[str, Any]) -> Future:
        job = job if isinstance(job, Job) else Job.from_dict(job)
        fut: Future = Future()
        with self._cv:
            if self._closed:
                fut.set_result(ExecutionResult.infra("the sandbox pool is closed", job.id))
                return fut
            if all(v == "down" for v in self._state.values()):
                reason = "; ".join(sorted(set(self._reason.values())))
                fut.set_result(ExecutionResult.infra(f"no sandbox is available ({reason})", job.id))
                return fut
            self._queue.append(_Item(job, fut))
            self._cv.notify()
        return fut

    def run(self, job: Job | Mapping[str, Any]) -> ExecutionResult:
        return self.submit(job).result()

    def run_batch(self, jobs: Iterable[Job | Mapping[str, Any]]) -> list[ExecutionResult]:
        """Run many jobs concurrently over the pool; results in input order. Validates all jobs first."""
        parsed = [j if isinstance(j, Job) else Job.from_dict(j) for j in jobs]
        return [f.result() for f in [self.submit(j) for j in parsed]]

    def ready_slots(self) -> int:
        with self._cv:
            return sum(state == "ready" for state in self._state.values())

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for item in pending:
            item.future.set_result(ExecutionResult.infra("the sandbox pool was closed", item.job.id))
        for t in self._threads:
            t.join(timeout=5)
        # Plain threads: executors refuse work during interpreter shutdown, when atexit closes pools.
        stoppers = [threading.Thread(target=s.stop, daemon=True) for s in self.slots]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=30)
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> SlotPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ workers
    def _any(self, state: str) -> bool:
        return any(v == state for v in self._state.values())

    def _set_state(self, slot: Slot, state: str, reason: str | None = None) -> None:
        with self._cv:
            self._state[id(slot)] = state
            if reason:
                self._reason[id(slot)] = reason
            self._cv.notify_all()

    def _take(self, room: int, wait: bool) -> list[_Item] | None:
        """Up to `room` queued items, leaving one for every worker waiting here; with `wait`, block until there is
        at least one (then it is taken whatever the others wait for). None once the pool is closed."""
        with self._cv:
            if wait:
                self._waiting += 1
                while not self._queue and not self._closed:
                    self._cv.wait(0.5)
                self._waiting -= 1
            if self._closed:
                return None
            items = [self._queue.popleft()] if wait else []
            while len(items) < room and len(self._queue) > self._waiting:
                items.append(self._queue.popleft())
            return items

    def _requeue(self, items: list[_Item], retried: bool = True) -> None:
        """Put items back at the front of the queue, in their order (`retried`: they ran, count them)."""
        with self._cv:
            if self._closed:
                for item in items:
                    item.future.set_result(ExecutionResult.infra("the sandbox pool was closed", item.job.id))
                return
            self._queue.extendleft(reversed(items))
            self.stats.retried += len(items) if retried else 0
            self._cv.notify(len(items))

    def _fail_all_queued(self, reason: str) -> None:
        with self._cv:
            pending = list(self._queue)
            self._queue.clear()
        for item in pending:
            item.future.set_result(ExecutionResult.infra(reason, item.job.id))

    def _sleep(self, seconds: float) -> None:
        """Wait `seconds` or until the pool closes."""
        self._closing.wait(seconds)

    def _worker(self, slot: Slot) -> None:
        backoff = 0.5
        running = False
        while True:
            with self._cv:
                if self._closed:
                    return
            if not running:
                try:
                    slot.start()
                    running, backoff = True, 0.5
                    self._set_state(slot, "ready")
                except Exception as exc:  # anything: a broken engine must not kill the worker
                    slot.stop()
                    reason = f"{slot.engine}: {exc}".splitlines()[0]
                    with self._cv:
                        was_down = self._state[id(slot)] == "down"
                    (log.debug if was_down else log.warning)("sandbox slot %s failed to start: %s", slot.label, reason)
                    self._set_state(slot, "down", reason)
                    with self._cv:
                        all_down = all(v == "down" for v in self._state.values())
                    if all_down:
                        self._fail_all_queued(f"no sandbox is available ({reason})")
                    self._sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
            flight: collections.deque[tuple[_Item, dict[str, Any]]] = collections.deque()  # sent, unanswered
            try:
                if not self._drive(slot, flight):
                    return
            except BaseException as exc:  # a bug or an unforeseen engine error: never lose the job or the worker
                log.exception("sandbox slot %s failed unexpectedly", slot.label)
                if flight:
                    item = flight.popleft()[0]
                    self._finish(item, ExecutionResult.infra(f"{type(exc).__name__}: {exc}", item.job.id, slot.label))
                    self._requeue([item for item, _ in flight], retried=False)
                slot.stop()
            running = False

    def _drive(self, slot: Slot, flight: collections.deque) -> bool:
        """Feed a live slot until it has to be replaced (returns True) or the pool closes (False).

        Up to `pipeline` jobs are in flight: before waiting for the oldest one's answer, queued jobs are sent to
        fill the window, so the runner finds its next job waiting. The runner answers in order. When the slot
        goes, the jobs in flight behind the one it went on never started: they go back to the queue."""
        while True:
            items = self._take(room=self.pipeline - len(flight), wait=not flight)
            if items is None and not flight:
                return False
            payloads = [self.limits.payload(item.job, slot.memory_cap_mb) for item in items or ()]
            flight.extend(zip(items or (), payloads))
            item, payload = flight[0]
            deadline_s = payload["timeout_s"] + self.limits.grace_s
            try:
                if payloads:
                    slot.send(b"".join((json.dumps(p) + "\n").encode() for p in payloads), deadline_s)
                raw = slot.receive(deadline_s)
            except (SlotHung, SlotDied) as exc:
                flight.popleft()
                usable = self._answer_lost(slot, item, payload, exc)
            else:
                flight.popleft()
                usable = self._answer(slot, item, raw)
            if not usable:
                self._requeue([item for item, _ in flight], retried=False)
                flight.clear()
                return True

    def _answer_lost(self, slot: Slot, item: _Item, payload: dict[str, Any], exc: Exception) -> bool:
        """The runner did not answer for `item`: timeout (hung), retry or give up (died, engine lost)."""
        if isinstance(exc, SlotHung):
            slot.stop()
            self.stats.recycled += 1
            self._finish(
                item,
                ExecutionResult(
                    Status.TIMEOUT,
                    wall_s=payload["timeout_s"],
                    id=item.job.id,
                    error="the sandbox did not answer in time; recycled",
                    backend=slot.label,
                ),
            )
            return False
        slot.stop()
        self.stats.recycled += 1
        if slot.engine_ok():
            item.deaths += 1
            if item.deaths >= 2:
                self._finish(
                    item,
                    ExecutionResult(
                        Status.RUNTIME_ERROR,
                        id=item.job.id,
                        backend=slot.label,
                        error=f"the job killed two sandboxes ({exc})",
                    ),
                )
            else:
                self._requeue([item])
            return False
        item.engine_losses += 1
        self._set_state(slot, "down", f"{slot.engine}: engine lost ({exc})")
        log.warning("sandbox engine %s lost (%s); job requeued", slot.engine, exc)
        if item.engine_losses >= self.max_attempts:
            self._finish(item, ExecutionResult.infra(f"engine lost {item.engine_losses} times: {exc}", item.job.id))
        else:
            self._requeue([item])
        return False

    def _answer(self, slot: Slot, item: _Item, raw: dict[str, Any]) -> bool:
        """Settle `item` from the runner's result; returns whether the slot is still usable."""
        if raw.get("status") == Status.INFRA_ERROR.value and item.runner_faults == 0:
            item.runner_faults += 1  # a runner fault: give the job one more chance on a fresh sandbox
            slot.stop()
            self.stats.recycled += 1
            self._requeue([item])
            return False
        result = ExecutionResult.from_runner(raw, item.job.id, slot.label)
        self._finish(item, result)
        if not raw.get("clean", False):
            slot.stop()
            self.stats.recycled += 1
            return False
        return True

    def _finish(self, item: _Item, result: ExecutionResult) -> None:
        with self._cv:
            self.stats.jobs += 1
            self.stats.per_slot[result.backend] = self.stats.per_slot.get(result.backend, 0) + 1
        item.future.set_result(result)
