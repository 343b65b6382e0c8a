"""`rlk2 sandbox build | doctor | exec | serve`: the JSONL contract, one-line errors, the offline build, HTTP."""

import json
import re
import subprocess
import sys
import urllib.request

import pytest

from sandboxes.testing import require

BACKENDS = [pytest.param("docker", marks=pytest.mark.docker), "bwrap"]

JOBS = [
    {"id": "ok", "code": "def add(a, b):\n    return a + b", "tests": "assert add(1, 2) == 3"},
    {"id": 7, "code": "def add(a, b):\n    return a - b", "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0"},
    {"id": "loop", "code": "while True:\n    pass", "tests": "assert 1", "timeout_s": 1},
    {"id": "io", "code": "print(int(input()) * 2)", "test_cases": [{"stdin": "4", "stdout": "8"}]},
    {
        "id": "he",
        "code": "def inc(x):\n    print('hi')\n    return x + 1",
        "tests": "def check(c):\n    assert c(1) == 2",
        "entry_point": "inc",
        "memory_mb": 128,
    },
]


def cli(*args, stdin=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "sandboxes.cli", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(params=BACKENDS)
def backend(request):
    require(request.param)
    return request.param


def test_exec_writes_one_result_per_job_in_input_order(backend, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(j) + "\n" for j in JOBS) + "\n")  # a trailing blank line is ignored
    proc = cli("exec", "--input", str(jobs), "--backend", backend, "--pool-size", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["ok", 7, "loop", "io", "he"]
    assert all(set(r) == {"id", "status", "passed", "total", "wall_s", "stdout", "stderr"} for r in rows)
    assert [r["status"] for r in rows] == ["passed", "failed", "timeout", "passed", "passed"]
    assert (rows[1]["passed"], rows[1]["total"]) == (1, 2)
    assert rows[4]["stdout"] == "hi\n"


def test_exec_reads_stdin(backend):
    proc = cli("exec", "--backend", backend, "--pool-size", "1", stdin=json.dumps(JOBS[0]) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "passed"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"id": 1, "code": "x", "tests": "assert 1"}\n{"id": 2, "code": \n', r"<stdin>:2: malformed JSON"),
        ('{"id": 1, "tests": "assert 1"}\n', r"<stdin>:1: job 1: missing field 'code'"),
        ('{"id": 1, "code": "x", "tests": "assert 1", "timeout_s": "soon"}\n', r"<stdin>:1: .*timeout_s"),
        ("[1, 2]\n", r"<stdin>:1: expected a JSON object, got list"),
        ('\n{"id": 1, "code": "x", "tests": "\\ud800"}\n', r"<stdin>:2: .*lone surrogate"),  # blank line skipped
    ],
)
def test_exec_bad_input_is_one_line_and_exit_2(text, message):
    proc = cli("exec", stdin=text)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_exec_missing_file_is_one_line_and_exit_2(tmp_path):
    proc = cli("exec", "--input", str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_exec_unreachable_engine_is_one_line_and_exit_2():
    job = json.dumps(JOBS[0]) + "\n"
    proc = cli("exec", "--backend", "docker", "--engine", "unix:///nonexistent/docker.sock", stdin=job)
    assert proc.returncode == 2 and "does not answer" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_doctor_reports_every_backend():
    proc = cli("doctor")
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["docker", "bwrap"]
    works = [line for line in lines if ": ok (" in line]
    assert proc.returncode == (0 if works else 1)
    assert all(": ok (" in line or ": unavailable: " in line for line in lines)


def test_sandbox_command_is_registered_in_rlk2_cli():
    from rlk2.cli import COMMANDS

    assert COMMANDS["sandbox"][1] == "sandboxes.cli:run"


@pytest.mark.docker
def test_offline_build_reports_its_time_and_tags_the_image():
    require("docker")  # the root filesystem is cached by scripts/docker_up.sh; this re-imports it
    from sandboxes import DEFAULT_IMAGE
    from sandboxes.image import rootfs_path

    if not (rootfs_path() / "usr" / "bin" / "python3").exists():
        pytest.skip("no cached root filesystem: the build would run debootstrap (minutes)")
    proc = cli("build", "--offline", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        rf"built {re.escape(DEFAULT_IMAGE)} \(offline\) in \d+\.\ds \(cached root filesystem\)\n", proc.stdout
    ), proc.stdout


def test_serve_runs_jobs_over_http(backend):
    server = subprocess.Popen(
        [sys.executable, "-m", "sandboxes.cli", "serve", "--backend", backend, "--pool-size", "1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"http://\S+", server.stdout.readline()).group(0)
        with urllib.request.urlopen(url + "/health", timeout=30) as resp:
            assert json.load(resp)["ok"] is True
        body = "".join(json.dumps(j) + "\n" for j in JOBS[:2]).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "/run", data=body, method="POST"), timeout=60) as resp:
            rows = [json.loads(line) for line in resp.read().decode().splitlines()]
        assert [(r["id"], r["status"]) for r in rows] == [("ok", "passed"), (7, "failed")]
        bad = urllib.request.Request(url + "/run", data=b'{"code": 1}\n', method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=30)
        assert info.value.code == 400
    finally:
        server.terminate()
        server.wait(timeout=30)
