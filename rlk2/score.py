"""`rlk2 score` and `rlk2 rewards`: debug a reward offline before spending a GPU hour on it.

`rlk2 score --reward NAME [--input FILE]` reads JSONL rows (stdin without FILE), each with a `completion`, an
optional `prompt` and the dataset columns the reward needs (e.g. `answer`), and writes one JSON line per input
row, in the same order (a blank line is not a row): `{"reward": 1.0, "error": null}` (plus `"extras"` when the reward
returns some).
Rows run through the same engine as training (worker processes, timeouts), so what you see is what training sees.

`rlk2 rewards [NAME ...] [--config CONFIG]` lists the built-in and entry-point rewards with the columns each one
needs; extra NAMEs and the rewards a training config names (dotted paths, files) are described too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from rewards import (
    RewardEngine,
    RewardError,
    RewardSpec,
    describe_reward,
    list_rewards,
    required_columns,
    resolve_reward,
)
from rlk2.config import load_config
from rlk2.errors import UserError
from sandboxes.jsonl import JsonlError, iter_jsonl

_BATCH = 256  # rows per engine call: output streams while a large file is scored


def _options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def read_rows(stream: Any, source: str) -> list[dict]:
    """The rows to score (`sandboxes.jsonl`: blank lines are not rows; a bad line is one UserError naming it)."""
    rows = []
    try:
        for lineno, row in iter_jsonl(stream, source):
            if not isinstance(row.get("completion"), str):
                raise UserError(f"{source}:{lineno}: field 'completion' must be a string")
            if not isinstance(row.get("prompt", ""), str):
                raise UserError(f"{source}:{lineno}: field 'prompt' must be a string")
            rows.append(row)
    except JsonlError as exc:
        raise UserError(str(exc)) from None
    return rows


def run_score(args: argparse.Namespace) -> int:
    """`rlk2 score --reward NAME [--input FILE]` (arguments: rlk2.cli)."""
    options = _options(args.option)
    if options.get("backend") == "checkpoint":  # the rubric reward's local-checkpoint critic lives in rlk2.critic,
        import rlk2.critic  # noqa: F401        # which registers it (and costs torch's import: only when asked for)
    try:
        spec = RewardSpec(args.reward, timeout_s=args.timeout, kwargs=options)
        fn = resolve_reward(spec.name)
    except RewardError as exc:
        raise UserError(str(exc)) from None
    if not 1 <= args.workers <= 64:
        raise UserError(f"--workers: {args.workers} is not in 1..64")
    source = args.input or "<stdin>"
    if args.input:
        try:
            with open(args.input, "rb") as f:
                rows = read_rows(f, source)
        except OSError as exc:
            raise UserError(f"cannot read {args.input}: {exc.strerror}") from None
    else:
        rows = read_rows(getattr(sys.stdin, "buffer", sys.stdin), source)
    needed = [c for c in required_columns(fn) if c not in spec.kwargs]
    for lineno, row in enumerate(rows, start=1):
        for col in needed:
            if col not in row:
                raise UserError(f"{source}:{lineno}: reward {spec.name!r} needs column {col!r}")
    keys = sorted({k for row in rows for k in row} - {"completion", "prompt"})
    out, failed = sys.stdout, []
    logging.getLogger("rewards").setLevel(logging.ERROR)  # each row's error is in its own output line already
    with RewardEngine(num_workers=args.workers) as engine:
        try:
            engine.check_columns([spec], set(keys) | set(needed), where=source)
        except RewardError as exc:
            raise UserError(str(exc)) from None
        for lo in range(0, len(rows), _BATCH):
            batch = rows[lo : lo + _BATCH]
            columns = {k: [row.get(k) for row in batch] for k in keys}
            try:
                result = engine.score(
                    [spec], [r["completion"] for r in batch], [r.get("prompt", "") for r in batch], columns
                )
            except RewardError as exc:
                raise UserError(str(exc)) from None
            values, errors = result.rewards[spec.name], result.sample_errors[spec.name]
            prefix = f"{spec.name}/"
            failed += [e for e in errors if e is not None]
            for i, (value, error) in enumerate(zip(values, errors)):
                line: dict[str, Any] = {"reward": value, "error": error}
                extras = {k[len(prefix) :]: v[i] for k, v in result.extras.items() if k.startswith(prefix)}
                if extras:
                    line["extras"] = extras
                out.write(json.dumps(line, default=repr) + "\n")
            out.flush()
    if rows and len(failed) == len(rows):  # the reward itself is broken, not the rows: say so, exit non-zero
        raise UserError(f"reward {spec.name!r} failed on every one of the {len(rows)} rows (first: {failed[0]})")
    return 0


def run_rewards(args: argparse.Namespace) -> int:
    """`rlk2 rewards [NAME ...] [--config CONFIG]` (arguments: rlk2.cli)."""
    rows = list_rewards()
    extra = [(name, "given") for name in args.names]
    if args.config:
        cfg = load_config(args.config)
        extra += [(r.name, f"config task {task.name!r}") for task in cfg.tasks for r in task.rewards]
    listed = {r[0] for r in rows}
    for name, source in extra:
        if name not in listed:
            listed.add(name)
            rows.append((name, source, *describe_reward(name)))
    if args.json:
        for name, source, columns, note in rows:
            print(
                json.dumps(
                    {"name": name, "source": source, "columns": columns, "available": columns is not None, "doc": note}
                )
            )
        return 0
    table = [("NAME", "COLUMNS", "SOURCE", "DESCRIPTION")]
    for name, source, columns, note in rows:
        cols = "unavailable" if columns is None else (", ".join(columns) or "-")
        table.append((name, cols, source, note))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0
