"""Every benchmark in one command: runs each `bench/bench_*.py`, prints one table, writes `bench/results.json`.

    python3 bench/run_all.py [--quick] [--only optim,math] [--threads N]      (`make bench`)

A benchmark module exposes `run(quick: bool) -> list[dict]`, one row per measurement:

    {"name", "value", "unit", "baseline", "baseline_value", "ratio", "spread", "reps"}

`value` and `baseline_value` are medians over `reps` repetitions measured in the same run, `ratio` the median of
the per-repetition ratios value / baseline, `spread` half their range. Each module runs in a fresh interpreter
(its imports, thread settings and memory do not leak into the next one) with the repository on `sys.path`. A
module that fails, or has no `run`, or returns malformed rows is reported as an error row, the others still run,
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW_KEYS = ("name", "value", "unit", "baseline", "baseline_value", "ratio", "spread", "reps")

# Run in the child interpreter: import one benchmark file by path, call run(quick), write its rows as JSON.
_CHILD = """
import importlib.util, json, sys
path, quick, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
spec = importlib.util.spec_from_file_location("bench_module", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if not callable(getattr(module, "run", None)):
    sys.exit(f"no run(quick) function in {path}")
rows = module.run(quick)
with open(out, "w") as fh:
    json.dump(rows, fh, allow_nan=True)
"""


def discover(bench_dir: pathlib.Path, only: list[str] | None = None) -> list[pathlib.Path]:
    """bench_*.py files in name order; `only` keeps those whose name (without `bench_`) is listed."""
    files = sorted(bench_dir.glob("bench_*.py"))
    if only:
        files = [f for f in files if f.stem.removeprefix("bench_") in only or f.stem in only]
    return files


def check_rows(rows: object) -> list[dict]:
    """Rows as the runner needs them; ValueError naming what is wrong."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"run() must return a non-empty list of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}")
    return rows


def run_module(
    path: pathlib.Path, quick: bool, out_dir: pathlib.Path, threads: int | None = None, timeout_s: float | None = None
) -> dict:
    """Run one benchmark in a subprocess: {"bench", "status": ok|error, "seconds", "rows", "error"}."""
    out = out_dir / f"{path.stem}.rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch reads it at import for its intra-op pool
    name = path.stem.removeprefix("bench_")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), "1" if quick else "0", str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {
            "bench": name,
            "status": "error",
            "seconds": time.perf_counter() - start,
            "rows": [],
            "error": f"timed out after {timeout_s:g} s",
        }
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stdout.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {
            "bench": name,
            "status": "error",
            "seconds": seconds,
            "rows": [],
            "error": tail[0],
            "log_tail": proc.stdout[-4000:],
        }
    try:
        rows = check_rows(json.loads(out.read_text()))
    except (OSError, ValueError) as exc:
        return {"bench": name, "status": "error", "seconds": seconds, "rows": [], "error": str(exc)}
    return {"bench": name, "status": "ok", "seconds": seconds, "rows": [{"bench": name, **r} for r in rows]}


def _num(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.4g}"


def format_table(results: list[dict]) -> str:
    """One table over every benchmark's rows (errors as rows of their own)."""
    header = ("bench", "name", "value", "unit", "baseline", "baseline value", "ratio (median)", "spread", "reps")
    lines, errors = [], []
    for res in results:
        if res["status"] != "ok":
            errors.append(f"{res['bench']}: ERROR: {res['error']}")  # full text, below the table
        for r in res["rows"]:
            lines.append(
                (
                    res["bench"],
                    r["name"],
                    _num(r["value"]),
                    r["unit"],
                    r["baseline"],
                    _num(r["baseline_value"]),
                    _num(r["ratio"]),
                    _num(r["spread"]),
                    str(r["reps"]),
                )
            )
    widths = [min(max(len(str(row[i])) for row in [header, *lines]), 60) for i in range(len(header))]
    right = {2, 5, 6, 7, 8}

    def fmt(row) -> str:
        cells = []
        for i, cell in enumerate(row):
            cell = str(cell)
            cell = cell if len(cell) <= widths[i] else cell[: widths[i] - 1] + "~"
            cells.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in lines), *errors])


def standalone(run, name: str, doc: str, quick_help: str, *, threads: bool = True) -> list[dict]:
    """A benchmark file run on its own (`python bench/bench_<name>.py [--quick] [--threads N]`): runs it, prints
    the same table as this runner, writes `bench/out/<name>.json`, and returns the rows."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    rows = check_rows(run(args.quick))
    print(format_table([{"bench": name, "status": "ok", "rows": rows}]))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's short version")
    parser.add_argument("--only", help="comma-separated benchmark names, e.g. optim,rl_step")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every benchmark (default: unset)")
    parser.add_argument("--timeout", type=float, help="seconds allowed per benchmark (default: none)")
    parser.add_argument("--bench-dir", default=str(ROOT / "bench"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where to write the JSON")
    args = parser.parse_args(argv)

    files = discover(pathlib.Path(args.bench_dir), args.only.split(",") if args.only else None)
    if not files:
        print(f"no bench_*.py benchmarks found in {args.bench_dir}", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out)
    scratch = out.parent / "out"
    scratch.mkdir(parents=True, exist_ok=True)
    results = []
    for path in files:
        print(f"[{path.stem}] running{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        res = run_module(path, args.quick, scratch, args.threads, args.timeout)
        print(
            f"[{path.stem}] {res['status']} in {res['seconds']:.0f} s"
            + (f": {res['error']}" if res["status"] != "ok" else ""),
            file=sys.stderr,
            flush=True,
        )
        results.append(res)

    print(format_table(results))
    import torch  # imported late: only for the version in the record

    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "benchmarks": [{k: v for k, v in r.items() if k != "rows"} for r in results],
        "rows": [row for r in results for row in r["rows"]],
    }
    out.write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
