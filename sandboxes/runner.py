"""The in-sandbox runner: a small stdlib-only program that is PID 1 of a sandbox and runs jobs one at a time.

Protocol (one JSON object per line): the runner writes {"ready": ...} once, then for every job line read from stdin
it writes exactly one result line to stdout, in order; the host may send several jobs ahead. After a result with
"clean": false the runner exits without running anything else. The host enforces its own deadline on top of ours.

Each job runs in a fresh forked child that is the leader of its own process group, with rlimits (CPU time, address
space, file size, open files, processes, no core files), stdin from /dev/null, stdout/stderr captured into anonymous
files, a scrubbed environment and the scratch directory as cwd. The wall-clock limit is enforced here, outside the
child: on expiry the whole group is SIGKILLed. After every job the runner kills anything still running in the sandbox,
wipes the scratch directories and reports whether the sandbox is clean; the host recycles it when it is not.

Why hand-written: the job must run in the same interpreter as its tests (DESIGN.md 2.3) and the verdict channel must
survive a program that exits early; no stdlib or ecosystem runner offers forked per-job children with rlimits,
an external wall clock and a nonce-checked verdict pipe.

Trust notes:
- PID 1 of a pid namespace receives no signal from inside the namespace unless it installs a handler, so the runner
  keeps SIGINT/SIGTERM at SIG_DFL: a job cannot kill it. It also marks itself non-dumpable, so a job running under the
  same uid cannot ptrace it or open /proc/1/fd/* (the host channel).
- Verdicts travel over a pipe whose messages carry a per-job random nonce. A program that calls exit(), os._exit()
  or raises SystemExit never gets the harness to send its final message, so it cannot pass. The tests are compiled
  and counted before the program runs. A deliberately adversarial program that digs the nonce out of its own
  interpreter's memory could forge a verdict; that is outside what this channel defends (see sandboxes/__init__.py).
"""

import ast
import builtins
import fcntl
import gc
import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback

# Scratch and the directories wiped after every job. Set by main() only: inside a sandbox (we are PID 1 of its pid
# namespace) scratch is /tmp and /tmp, /dev/shm, /dev/mqueue are wiped; anywhere else (PID != 1, e.g. run by hand
# or by the unisolated test helper) a private temporary directory and nothing else. Importing this module never
# points anything at a host directory.
SCRATCH = None
WIPE_DIRS = ()
SANDBOX_WIPE_DIRS = ("/tmp", "/dev/shm", "/dev/mqueue")
JOB_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
MAX_VERDICT_BYTES = 1 << 20
# Imported once by the runner so that a job importing them finds them already loaded (fork shares them): the
# modules programs of code datasets import most. `typing` alone costs a job ~3 ms of CPU to import; each module
# also makes every fork a little dearer (page tables), so the list stays short.
PRELOAD = (
    "typing",
    "re",
    "math",
    "collections",
    "itertools",
    "functools",
    "heapq",
    "bisect",
    "string",
    "random",
    "copy",
)
# Collected tests kept by the runner, keyed by the tests text (a group of samples shares its tests; a dataset
# cycles through its problems). Bounded because the cache lives in the runner's memory, whose page tables every
# fork copies: compiled HumanEval tests take ~15 bytes per character of test source, so ~4 MiB at most here.
# Larger tests are collected in the job process instead.
PLAN_CACHE_ENTRIES = 256
PLAN_CACHE_CHARS = 1 << 18
PLAN_MAX_CHARS = 1 << 14
_PLANS = {}  # (tests, entry_point) -> plan from _collect(), or the error text; insertion order = age
_plan_chars = 0
_JOB_STREAMS = None  # the job's sys.stdin / stdout / stderr over fds 0 / 1 / 2; made by _prepare(), unused here


# ----------------------------------------------------------------------------------------------------------- child
def _limits(job):
    cpu = int(math.ceil(job["timeout_s"])) + 1
    mem = int(job["memory_mb"]) * 1024 * 1024
    return [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_FSIZE, (job["file_size_bytes"], job["file_size_bytes"])),
        (resource.RLIMIT_NOFILE, (job["nofile"], job["nofile"])),
        (resource.RLIMIT_NPROC, (job["nproc"], job["nproc"])),
        (resource.RLIMIT_CORE, (0, 0)),
    ]


def _enter_child(job, stdin_fd, out_fd, err_fd, keep_fd):
    """Turn the freshly forked process into an isolated job process (runs before any job code).

    The scrubbed environment, the ignored SIGXFSZ and the std streams come from _prepare(), through fork."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # normal Python behaviour for the job
    os.dup2(stdin_fd, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], keep_fd + 2))
    for res, lim in _limits(job):
        resource.setrlimit(res, lim)
    try:  # under memory pressure the kernel kills job processes first, never the runner
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = _JOB_STREAMS
    os.chdir(SCRATCH)
    sys.argv = ["main.py"]


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _walk_scope(nodes):
    """ast.walk that does not enter nested functions, lambdas or classes (their bodies run later, if ever)."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def _counts_as_test(stmt):
    """A statement is a test when it runs an assert that is not a constant (`assert True`) at this level."""
    if isinstance(stmt, _SCOPES):
        return False
    return any(isinstance(n, ast.Assert) and not isinstance(n.test, ast.Constant) for n in _walk_scope([stmt]))


def _splittable(body):
    """Can a function body run statement by statement at module level without changing its meaning?"""
    bad = (ast.Return, ast.Yield, ast.YieldFrom, ast.Await, ast.Nonlocal, ast.Global)
    return not any(isinstance(n, bad) for n in _walk_scope(body))


def _compile_stmts(stmts, filename):
    return [(compile(ast.Module(body=[s], type_ignores=[]), filename, "exec"), _counts_as_test(s)) for s in stmts]


def _collect(job):
    """Compile the tests before the program runs; returns (setup+test statements, check plan, test functions, total).

    A test is: a top-level assert statement of `tests`; a `def test_*` function of `tests`; with `entry_point`, each
    assert statement of `check`'s body (or the whole `check(candidate)` call when the body cannot be split); and when
    none of these exist, the whole `tests` block (passes if it raises nothing)."""
    tree = ast.parse(job["tests"], "<tests>")
    module_stmts = _compile_stmts(tree.body, "<tests>")
    entry = job.get("entry_point")
    if entry:
        checks = [s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
        if not checks:
            raise ValueError("tests define no check(candidate) function although entry_point is set")
        fn = checks[-1]
        argname = fn.args.args[0].arg if fn.args.args else "candidate"
        if _splittable(fn.body) and any(_counts_as_test(s) for s in fn.body):
            body = _compile_stmts(fn.body, "<check>")
            total = sum(is_test for _, is_test in body)
        else:
            body, total = None, 1
        setup = [(code, False) for code, _ in module_stmts]
        return setup, ("check", argname, body), [], total
    test_fns = [
        s.name
        for s in tree.body
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name.startswith("test")
    ]
    total = sum(is_test for _, is_test in module_stmts) + len(test_fns)
    if total == 0:  # plain block: one test that passes if nothing raises
        return [(compile(tree, "<tests>", "exec"), True)], None, [], 1
    return module_stmts, None, test_fns, total


def _plan(job):
    """The collected tests for a job, from the runner's cache, or None to collect them in the job process.

    Runs in the runner (not the job process) once per distinct tests: the job process inherits the compiled code
    through fork. Tests come from the host like the job line itself; a program never reaches this code. A failure
    to collect is kept as its error text."""
    global _plan_chars
    tests = job.get("tests")
    if not isinstance(tests, str) or len(tests) > PLAN_MAX_CHARS:
        return None
    key = (tests, job.get("entry_point"))
    plan = _PLANS.pop(key, None)
    if plan is None:
        try:
            plan = _collect(job)
        except Exception as exc:
            plan = "tests do not compile: " + _short_tb(exc, 500)
        _plan_chars += len(tests)
        while len(_PLANS) >= PLAN_CACHE_ENTRIES or _plan_chars > PLAN_CACHE_CHARS:
            oldest = next(iter(_PLANS))
            del _PLANS[oldest]
            _plan_chars -= len(oldest[0])
    _PLANS[key] = plan  # (re)inserted last: the least recently used entry is evicted first
    return plan


class _Report:
    """Writes nonce-tagged messages on the verdict pipe. Holds its own references so a program that rebinds
    json.dumps or os.write breaks (fails) the report instead of changing it."""

    def __init__(self, fd, nonce):
        self.fd, self.nonce, self.dumps, self.write = fd, nonce, json.dumps, os.write

    def send(self, **msg):
        msg["n"] = self.nonce
        data = (self.dumps(msg) + "\n").encode()
        while data:
            data = data[self.write(self.fd, data) :]


def _short_tb(exc, limit=4000):
    """The traceback without the runner's own frames, tail-truncated."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return text[-limit:]


def _harness_tests(job, report, plan):
    """Program then tests in one interpreter and one namespace, per DESIGN.md 2.3. `plan`: see _plan()."""
    if plan is None:
        try:
            plan = _collect(job)
        except BaseException as exc:
            plan = "tests do not compile: " + _short_tb(exc, 500)
    if isinstance(plan, str):  # broken gold: nothing to count
        report.send(k="collected", total=0, error=plan)
        return
    setup, check, test_fns, total = plan
    try:
        program = compile(job["code"], "<program>", "exec")
    except BaseException as exc:
        report.send(k="collected", total=total)
        report.send(
            k="done",
            verdicts=[False] * total,
            runtime_error=True,
            memory=isinstance(exc, MemoryError),
            error="program does not compile: " + _short_tb(exc, 1000),
        )
        return
    report.send(k="collected", total=total)
    verdicts, memory, first_error = [], False, None
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(program, ns)
    except SystemExit:
        report.send(
            k="done",
            verdicts=[False] * total,
            runtime_error=False,
            memory=False,
            error="the program raised SystemExit before the tests ran",
        )
        return
    except BaseException as exc:
        report.send(
            k="done",
            verdicts=[False] * total,
            runtime_error=True,
            memory=isinstance(exc, MemoryError),
            error="the program raised: " + _short_tb(exc),
        )
        return

    def run_stmts(stmts, space):
        nonlocal memory, first_error
        for code, is_test in stmts:
            try:
                exec(code, space)
                if is_test:
                    verdicts.append(True)
            except BaseException as exc:
                memory = memory or isinstance(exc, MemoryError)
                first_error = first_error or _short_tb(exc)
                if is_test:
                    verdicts.append(False)
                else:  # a failed setup statement: the tests after it cannot run
                    return False
        return True

    ok = run_stmts(setup, ns)
    if ok and check is not None:
        _, argname, body = check
        candidate = ns.get(job["entry_point"])
        if candidate is None:
            first_error = "entry point {!r} is not defined by the program".format(job["entry_point"])
        elif body is None:
            try:
                ns["check"](candidate)
                verdicts.append(True)
            except BaseException as exc:
                memory = memory or isinstance(exc, MemoryError)
                first_error = _short_tb(exc)
        else:
            space = dict(ns)
            space[argname] = candidate
            run_stmts(body, space)
    if ok:
        for name in test_fns:
            try:
                ns[name]()
                verdicts.append(True)
            except BaseException as exc:
                memory = memory or isinstance(exc, MemoryError)
                first_error = first_error or _short_tb(exc)
                verdicts.append(False)
    verdicts += [False] * (total - len(verdicts))
    _flush_std()
    if first_error:
        try:
            os.write(2, ("\n[test failure]\n" + first_error).encode("utf-8", "replace"))
        except OSError:
            pass
    report.send(k="done", verdicts=verdicts[:total], runtime_error=False, memory=memory, error=first_error)


def _output_lines(text):
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _case_child(program, in_fd, out_fd, note_fd, verdict_fd):
    """One stdin/stdout run of the program (never returns). Its exit code is its result; on MemoryError the wrapper
    also writes b"M" to `note_fd`, so a program's own exit code can never read as a memory verdict."""
    code = 1
    try:
        os.close(verdict_fd)
        os.dup2(in_fd, 0)
        os.dup2(out_fd, 1)
        sys.stdin = sys.__stdin__ = open(0, closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False, errors="backslashreplace")
        try:
            exec(program, {"__name__": "__main__", "__builtins__": builtins})
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except MemoryError:
            os.write(note_fd, b"M")
        except BaseException:
            traceback.print_exc()
        _flush_std()
    finally:
        os._exit(code & 0xFF)


def _harness_cases(job, report, verdict_fd):
    """stdin/stdout test cases: each case runs the program in its own forked child; the comparison happens here,
    outside the program's process."""
    cases = job["test_cases"]
    try:
        program = compile(job["code"], "<program>", "exec")
    except BaseException as exc:
        report.send(k="collected", total=len(cases))
        report.send(
            k="done",
            verdicts=[False] * len(cases),
            runtime_error=True,
            memory=False,
            error="program does not compile: " + _short_tb(exc, 1000),
        )
        return
    report.send(k="collected", total=len(cases))
    verdicts, crashed, memory, timeout, first_error = [], False, False, False, None
    for case in cases:
        in_fd, out_fd = _anon_file(), _anon_file()
        data = case["stdin"].encode()
        while data:
            data = data[os.write(in_fd, data) :]
        os.lseek(in_fd, 0, os.SEEK_SET)
        note_r, note_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(note_r)
            _case_child(program, in_fd, out_fd, note_w, verdict_fd)
        os.close(note_w)
        _, status, usage = os.wait4(pid, 0)
        os.set_blocking(note_r, False)
        try:
            out_of_memory = b"M" in os.read(note_r, 16)
        except BlockingIOError:
            out_of_memory = False
        os.close(note_r)
        os.close(in_fd)
        got = os.pread(out_fd, job["file_size_bytes"], 0).decode("utf-8", "replace")
        os.close(out_fd)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime >= job["timeout_s"]):
                timeout = True
            elif sig == signal.SIGKILL:
                memory = True
            crashed = True
            first_error = first_error or f"test case killed by signal {sig}"
            verdicts.append(False)
            continue
        code = os.WEXITSTATUS(status)
        memory = memory or out_of_memory
        crashed = crashed or code != 0 or out_of_memory
        ok = code == 0 and _output_lines(got) == _output_lines(case["stdout"])
        if not ok and first_error is None:
            first_error = f"exit code {code}" if code else "output differs from the expected output"
        verdicts.append(ok)
    report.send(k="done", verdicts=verdicts, runtime_error=crashed, memory=memory, timeout=timeout, error=first_error)


EXIT_SETUP = 70  # the job process failed before any job code ran: a runner fault


def _job_child(job, plan, nonce, verdict_fd, out_fd, err_fd):
    code = EXIT_SETUP
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        _enter_child(job, null, out_fd, err_fd, verdict_fd)
        report = _Report(verdict_fd, nonce)
        if job.get("test_cases") is not None:
            _harness_cases(job, report, verdict_fd)
        else:
            _harness_tests(job, report, plan)
        _flush_std()
        code = 0
    finally:
        os._exit(code)


# ---------------------------------------------------------------------------------------------------------- runner
def _anon_file():
    try:
        return os.open(SCRATCH, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:  # filesystems without O_TMPFILE: create and unlink at once
        import tempfile

        fd, path = tempfile.mkstemp(dir=SCRATCH)
        os.unlink(path)
        return fd


def _read_capture(fd, cap):
    size = os.fstat(fd).st_size
    data = os.pread(fd, cap, 0).decode("utf-8", "replace")
    if size > cap:
        data += f"\n[... {size - cap} more bytes truncated]"
    return data


def _read_small(path):
    """A small /proc or /sys file, or None when unreadable. Raw reads: this runs after every job."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = b""
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return data
            data += chunk
    except OSError:
        return None
    finally:
        os.close(fd)


OOM_FILES = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")  # cgroup v1, v2
_oom_file = None  # the one of OOM_FILES this sandbox has (set by _prepare)


def _oom_kills():
    text = _read_small(_oom_file) if _oom_file else None
    for line in (text or b"").splitlines():
        if line.startswith(b"oom_kill "):
            return int(line.split()[1])
    return None


def _other_pids():
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _sweep():
    """As PID 1, kill every other process in the sandbox (escaped sessions, daemons). Returns True when none is left."""
    if os.getpid() != 1:  # never outside a pid namespace: /proc would be the host's
        _reap()
        return True
    for attempt in range(50):
        pids = _other_pids()
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap()
        if attempt:
            time.sleep(0.002)
    return not _other_pids()


def _wipe(path):
    """Remove everything under a scratch directory, including entries a job made unreadable. Returns success."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return True  # not present in this sandbox
    ok = True
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)
                ok = _wipe(entry.path) and ok
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            ok = False
    return ok


def _sysv_ipc_empty():
    if os.getpid() != 1:  # not in a sandbox of our own: the IPC namespace is the host's, not ours to judge
        return True
    for name in ("shm", "sem", "msg"):
        text = _read_small("/proc/sysvipc/" + name)
        if text is not None and text.count(b"\n") > 1:  # more than the header line
            return False
    return True


def _classify(msgs, total, timed_out, exit_status, usage, oom_before, timeout_s):
    """Map what the child said and how it ended to (status, verdicts, error)."""
    collected = next((m for m in msgs if m.get("k") == "collected"), None)
    done = next((m for m in msgs if m.get("k") == "done"), None)
    total = collected.get("total", 0) if collected else total
    verdicts = [False] * total
    if done is not None and isinstance(done.get("verdicts"), list) and len(done["verdicts"]) == total:
        verdicts = [v is True for v in done["verdicts"]]
    error = (done or collected or {}).get("error")
    cpu = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
    if timed_out:
        return "timeout", [False] * total, f"wall-clock limit of {timeout_s:g}s exceeded"
    if exit_status is not None and os.WIFSIGNALED(exit_status):
        sig = os.WTERMSIG(exit_status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= timeout_s):
            return "timeout", [False] * total, "CPU-time limit exceeded"
        if sig == signal.SIGKILL:
            oom_after = _oom_kills()
            if oom_before is None or oom_after is None or oom_after > oom_before:
                return "memory_exceeded", [False] * total, "killed (out of memory)"
        return "runtime_error", [False] * total, f"killed by signal {sig}"
    if collected is None:
        if exit_status is not None and os.WIFEXITED(exit_status) and os.WEXITSTATUS(exit_status) == EXIT_SETUP:
            return "infra_error", verdicts, "the job process could not be set up"
        return "failed", verdicts, "the job ended before its tests were collected"
    if done is None:
        return "failed", verdicts, error or "the program exited before the test harness reported (early exit)"
    if done.get("timeout"):
        return "timeout", verdicts, error
    if done.get("memory"):
        return "memory_exceeded", verdicts, error
    if done.get("runtime_error"):
        return "runtime_error", verdicts, error
    if total > 0 and all(verdicts):
        return "passed", verdicts, None
    return "failed", verdicts, error


def _wait_child(pid, verdict_fd, deadline, pipe_holds_all):
    """Wait until the child exits or the deadline passes. Returns (exit_status, usage, data, timed_out).

    With `pipe_holds_all` (the verdict pipe holds MAX_VERDICT_BYTES) the runner sleeps on the child's pidfd alone
    and _drain() reads the verdicts afterwards: each wakeup while the child lives would copy every page the runner
    touches (copy-on-write). A child that writes more than that blocks and runs into its timeout. Otherwise
    verdict bytes are collected as they come."""
    data = bytearray()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    watch = ([] if pipe_holds_all and pidfd is not None else [verdict_fd]) + ([pidfd] if pidfd is not None else [])
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, None, bytes(data), True
            wait = left if pidfd is not None else min(left, 0.002)
            ready, _, _ = select.select(watch, [], [], wait)
            if verdict_fd in ready:
                chunk = os.read(verdict_fd, 65536)
                if chunk and len(data) < MAX_VERDICT_BYTES:
                    data += chunk
                elif not chunk:
                    watch.remove(verdict_fd)
            wpid, status, usage = os.wait4(pid, os.WNOHANG)
            if wpid == pid:
                return status, usage, bytes(data), False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _drain(fd, data):
    os.set_blocking(fd, False)
    while len(data) < MAX_VERDICT_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _prepare(scratch, wipe_dirs):
    """Once, before the first job: the runner's own state becomes what every job process starts from (fork).

    The environment is the job's (scrubbed); SIGXFSZ is ignored, so writes past the file-size cap fail with EFBIG
    instead of killing; the job's std streams exist, unused, over fds 0 / 1 / 2 (which the job process points at
    /dev/null and its capture files); PRELOAD modules are imported; the garbage collector is frozen, so a job's
    collections never walk (and copy) the runner's start-up objects."""
    global SCRATCH, WIPE_DIRS, _JOB_STREAMS, _oom_file
    SCRATCH, WIPE_DIRS = scratch, wipe_dirs
    _oom_file = next((path for path in OOM_FILES if _read_small(path) is not None), None)
    os.environ.clear()
    os.environ.update(JOB_ENV, HOME=scratch, TMPDIR=scratch)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _JOB_STREAMS = (
        open(0, closefd=False),
        open(1, "w", closefd=False, errors="backslashreplace"),
        open(2, "w", closefd=False, errors="backslashreplace", buffering=1),
    )
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    gc.collect()
    gc.freeze()


def run_job(job):
    if _JOB_STREAMS is None:
        raise RuntimeError("runner not initialised: call main()")
    plan = _plan(job) if job.get("test_cases") is None else None
    nonce = os.urandom(16).hex()
    verdict_r, verdict_w = os.pipe()
    try:  # room for every verdict byte we keep, so the runner need not read while the child runs
        pipe_holds_all = fcntl.fcntl(verdict_w, fcntl.F_SETPIPE_SZ, MAX_VERDICT_BYTES) >= MAX_VERDICT_BYTES
    except OSError:  # above /proc/sys/fs/pipe-max-size, or the user's pipe quota
        pipe_holds_all = False
    out_fd, err_fd = _anon_file(), _anon_file()
    oom_before = _oom_kills()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(verdict_r)
        _job_child(job, plan, nonce, verdict_w, out_fd, err_fd)
    os.close(verdict_w)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child already did it, or already exited
    status, usage, data, timed_out = _wait_child(pid, verdict_r, start + job["timeout_s"], pipe_holds_all)
    wall = time.monotonic() - start
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if timed_out:
        _, status, usage = os.wait4(pid, 0)
    data = _drain(verdict_r, bytearray(data))
    os.close(verdict_r)
    msgs = []
    for line in bytes(data).splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("n") == nonce:
            msgs.append(msg)
    status_name, verdicts, error = _classify(
        msgs, 0, timed_out, None if timed_out else status, usage, oom_before, job["timeout_s"]
    )
    clean = _sweep()
    stdout = _read_capture(out_fd, job["max_output"])
    stderr = _read_capture(err_fd, job["max_output"])
    os.close(out_fd)
    os.close(err_fd)
    for path in WIPE_DIRS:
        clean = _wipe(path) and clean
    clean = clean and _sysv_ipc_empty()
    return {
        "id": job.get("id"),
        "status": status_name,
        "passed": sum(verdicts),
        "total": len(verdicts),
        "verdicts": verdicts,
        "wall_s": round(wall, 4),
        "stdout": stdout,
        "stderr": stderr,
        "error": error,
        "clean": clean,
    }


def _lines(fd):
    buf = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line


def _set_nondumpable():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE = 4
    except Exception:
        return False


def _emit(obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def main():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as PID 1 with no handler, a job cannot signal us
    nondumpable = _set_nondumpable()
    if os.getpid() == 1:
        _prepare("/tmp", SANDBOX_WIPE_DIRS)
    else:
        import tempfile

        scratch = tempfile.mkdtemp(prefix="rlk2-runner-")
        _prepare(scratch, (scratch,))
    _emit(
        {
            "ready": True,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "nondumpable": nondumpable,
            "python": sys.version.split()[0],
        }
    )
    for path in WIPE_DIRS:
        _wipe(path)
    for line in _lines(0):
        job_id = None
        try:
            job = json.loads(line)
            job_id = job.get("id")
            result = run_job(job)
        except Exception as exc:  # a runner fault is an infrastructure error, never a verdict
            result = {
                "id": job_id,
                "status": "infra_error",
                "passed": 0,
                "total": 0,
                "verdicts": [],
                "wall_s": 0.0,
                "stdout": "",
                "stderr": "",
                "error": f"runner: {type(exc).__name__}: {exc}",
                "clean": False,
            }
        _emit(result)
        if not result["clean"]:  # nothing more runs here: the host recycles the sandbox and requeues the rest
            break
    if os.getpid() != 1:
        _wipe(SCRATCH)
        os.rmdir(SCRATCH)


if __name__ == "__main__":
    main()
