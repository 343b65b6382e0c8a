"""bench/run_all.py: one table and one JSON over every bench_*.py, failures reported, never hidden."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOOD = """
def run(quick):
    reps = 2 if quick else 5
    return [{"name": "fake/speed", "value": 30.0, "unit": "items/s", "baseline": "slow way",
             "baseline_value": 10.0, "ratio": 3.0, "spread": 0.25, "reps": reps}]
"""
BROKEN = """
def run(quick):
    raise RuntimeError("engine unreachable")
"""
NO_RUN = "def main():\n    return 0\n"
BAD_ROWS = "def run(quick):\n    return [{'name': 'x', 'value': 1.0}]\n"


def _write(folder: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def test_rows_table_and_json(run_all, tmp_path, capsys):
    _write(tmp_path, {"bench_good.py": GOOD, "helper.py": "raise SystemExit('not a benchmark')"})
    out = tmp_path / "results.json"
    assert run_all.main(["--quick", "--bench-dir", str(tmp_path), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    for column in ("bench", "name", "value", "unit", "baseline", "ratio (median)", "spread", "reps"):
        assert column in header
    assert "fake/speed" in table and "items/s" in table and "slow way" in table
    record = json.loads(out.read_text())
    assert record["quick"] is True
    assert [b["bench"] for b in record["benchmarks"]] == ["good"]  # helper.py is not a bench_*.py file
    (row,) = record["rows"]
    assert row == {
        "bench": "good",
        "name": "fake/speed",
        "value": 30.0,
        "unit": "items/s",
        "baseline": "slow way",
        "baseline_value": 10.0,
        "ratio": 3.0,
        "spread": 0.25,
        "reps": 2,
    }  # quick reached run()


def test_failures_are_reported_and_others_still_run(run_all, tmp_path, capsys):
    _write(
        tmp_path,
        {
            "bench_a_broken.py": BROKEN,
            "bench_b_good.py": GOOD,
            "bench_c_norun.py": NO_RUN,
            "bench_d_badrows.py": BAD_ROWS,
        },
    )
    out = tmp_path / "results.json"
    assert run_all.main(["--bench-dir", str(tmp_path), "--out", str(out)]) == 1
    table = capsys.readouterr().out
    assert "engine unreachable" in table and "no run(quick) function" in table and "lacks" in table
    record = json.loads(out.read_text())
    status = {b["bench"]: b["status"] for b in record["benchmarks"]}
    assert status == {"a_broken": "error", "b_good": "ok", "c_norun": "error", "d_badrows": "error"}
    assert [r["bench"] for r in record["rows"]] == ["b_good"]
    assert record["rows"][0]["reps"] == 5  # not quick


def test_only_selects_benchmarks(run_all, tmp_path):
    _write(tmp_path, {"bench_one.py": GOOD, "bench_two.py": BROKEN})
    assert [p.stem for p in run_all.discover(tmp_path, ["one"])] == ["bench_one"]
    assert [p.stem for p in run_all.discover(tmp_path)] == ["bench_one", "bench_two"]


def test_check_rows_names_missing_keys(run_all):
    with pytest.raises(ValueError, match="baseline_value"):
        run_all.check_rows(
            [{"name": "x", "value": 1, "unit": "s", "baseline": "b", "ratio": 1, "spread": 0, "reps": 1}]
        )
    with pytest.raises(ValueError, match="non-empty list"):
        run_all.check_rows({})
