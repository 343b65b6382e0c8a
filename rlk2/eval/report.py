"""`rlk2 eval` outputs: report.json (stable keys), report.md (tables to paste into a PR), PNG plots, samples.

report.json, schema version 1 (keys are a contract; new keys may be added, none renamed or removed)::

    {"schema_version": 1, "rlk2_version", "created_at", "settings": {...},
     "checkpoints": [{"label", "spec", "path", "kind", "run_dir", "step"}],
     "tasks": {TASK: {"source", "prompts", "samples_per_prompt", "rewards", "max_new_tokens",
                      "metrics": {LABEL: {METRIC: {"value", "ci"}}},
                      "differences": {LABEL: {"baseline", "metrics": {METRIC: {"value", "ci"}}}},
                      "reward_errors": {LABEL: {REWARD: count}}}},
     "throughput": {LABEL: {"sequences", "tokens", "seconds", "samples_per_s", "tokens_per_s"}},
     "plots": [file names]}

METRIC is `pass@<k>`, `greedy_pass@1`, `mean@<n>`, `maj@<n>`, `reward/<name>`, `mean_length`, `max_length`,
`truncated` or `unscorable`, and for environment tasks `turns` and `tool_calls` (means per sampled episode); "ci"
is [low, high] (95 % bootstrap over prompts) or null where none exists (max_length, turns, tool_calls; nothing
scorable). NaN values are written as null.
"""

from __future__ import annotations

import json
import math
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rlk2.eval.metrics import bootstrap_ci, bootstrap_diff_ci, bootstrap_indices, prompt_stats, ratio
from rlk2.eval.plots import plot_pass_at_k, plot_series, plot_training

SCHEMA_VERSION = 1
REPORT_KEYS = (
    "schema_version",
    "rlk2_version",
    "created_at",
    "settings",
    "checkpoints",
    "tasks",
    "throughput",
    "plots",
)
TASK_KEYS = (
    "source",
    "prompts",
    "samples_per_prompt",
    "rewards",
    "max_new_tokens",
    "metrics",
    "differences",
    "reward_errors",
)


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _metric_order(name: str) -> tuple:
    m = re.fullmatch(r"pass@(\d+)", name)
    if m:
        return (0, int(m.group(1)), name)
    order = [
        "greedy_pass@1",
        "mean@",
        "maj@",
        "reward/",
        "mean_length",
        "max_length",
        "truncated",
        "unscorable",
        "turns",
        "tool_calls",
    ]
    return (1 + next((i for i, p in enumerate(order) if name.startswith(p)), len(order)), 0, name)


def build_report(ckpts: list, task_cfgs: list, tasks: list, results: list, settings: dict) -> dict:
    """Point estimates, intervals and paired differences (baseline = first checkpoint) for every task."""
    ks, conf = settings["ks"], settings["confidence"]
    out_tasks = {}
    for cfg, task in zip(task_cfgs, tasks):
        outcomes = [r.outcomes[task.name] for r in results]
        idx = bootstrap_indices(
            len(task.prompts), settings["bootstrap_resamples"], seed=settings["seed"], task=task.name
        )
        stats = [prompt_stats(o, ks) for o in outcomes]
        metrics = {}
        for ckpt, st, o, res in zip(ckpts, stats, outcomes, results):
            row = {}
            for name in sorted(st, key=_metric_order):
                ci = bootstrap_ci(st[name], idx, conf)
                row[name] = {"value": _num(ratio(st[name])), "ci": None if ci is None else [ci[0], ci[1]]}
            row["max_length"] = {"value": _num(float(o.tokens.max()) if o.tokens.size else None), "ci": None}
            for name in ("turns", "tool_calls"):  # environment tasks: per sampled episode
                value = getattr(res, "metrics", {}).get(f"eval/{task.name}/{name}")
                if value is not None:
                    row[name] = {"value": _num(value), "ci": None}
            metrics[ckpt.label] = dict(sorted(row.items(), key=lambda kv: _metric_order(kv[0])))
        diffs = {}
        for ckpt, st in zip(ckpts[1:], stats[1:]):
            rows = {}
            for name in sorted(set(st) & set(stats[0]), key=_metric_order):
                a, b = ratio(stats[0][name]), ratio(st[name])
                ci = bootstrap_diff_ci(stats[0][name], st[name], idx, conf)
                rows[name] = {"value": _num(b - a), "ci": None if ci is None else [ci[0], ci[1]]}
            diffs[ckpt.label] = {"baseline": ckpts[0].label, "metrics": rows}
        out_tasks[task.name] = {
            "source": cfg.source,
            "prompts": len(task.prompts),
            "samples_per_prompt": settings["samples"],
            "rewards": [s.name for s in task.specs],
            "max_new_tokens": task.max_new_tokens,
            "metrics": metrics,
            "differences": diffs,
            "reward_errors": {c.label: dict(o.errors) for c, o in zip(ckpts, outcomes)},
        }
    throughput = {}
    for ckpt, res in zip(ckpts, results):
        seqs = sum(t["sequences"] for t in res.timing.values())
        toks = sum(t["tokens"] for t in res.timing.values())
        secs = sum(t["seconds"] for t in res.timing.values())
        throughput[ckpt.label] = {
            "sequences": seqs,
            "tokens": toks,
            "seconds": secs,
            "samples_per_s": seqs / secs if secs else None,
            "tokens_per_s": toks / secs if secs else None,
        }
    try:
        pkg_version = version("rlk2")
    except PackageNotFoundError:
        pkg_version = None
    return {
        "schema_version": SCHEMA_VERSION,
        "rlk2_version": pkg_version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "checkpoints": [
            {
                "label": c.label,
                "spec": c.spec,
                "path": str(c.path),
                "kind": c.kind,
                "run_dir": str(c.run_dir) if c.run_dir else None,
                "step": c.step,
            }
            for c in ckpts
        ],
        "tasks": out_tasks,
        "throughput": throughput,
        "plots": [],
    }


# ================================================================================================ markdown
def _fmt(name: str, v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    digits = 1 if name in ("mean_length", "max_length") else 3
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _cell(name: str, entry: dict, signed: bool = False) -> str:
    text = _fmt(name, entry["value"], signed)
    if entry["ci"] is not None:
        text += f" [{_fmt(name, entry['ci'][0], signed)}, {_fmt(name, entry['ci'][1], signed)}]"
    return text


def markdown_tables(report: dict) -> str:
    """One table per task: metric rows, a column per checkpoint, and a Δ column per non-baseline checkpoint."""
    labels = [c["label"] for c in report["checkpoints"]]
    lines = []
    for task, t in report["tasks"].items():
        lines += [f"### {task} ({t['prompts']} prompts, {t['samples_per_prompt']} samples each)", ""]
        head = ["metric", *labels, *(f"{lab} − {labels[0]}" for lab in labels[1:])]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for name in t["metrics"][labels[0]]:
            cells = [_cell(name, t["metrics"][lab][name]) for lab in labels]
            for lab in labels[1:]:
                d = t["differences"][lab]["metrics"].get(name)
                cells.append(_cell(name, d, signed=True) if d else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    md = [
        "# Evaluation report",
        "",
        f"{s['samples']} samples per prompt at temperature {s['temperature']}"
        f"{', plus one greedy' if s['greedy'] else ''}; seed {s['seed']}. "
        f"Brackets: 95 % bootstrap intervals over prompts ({s['bootstrap_resamples']} resamples); "
        "differences are paired (same prompts, same seeds).",
        "",
        "| checkpoint | kind | path |",
        "|---|---|---|",
    ]
    md += [f"| {c['label']} | {c['kind']} | `{c['path']}` |" for c in report["checkpoints"]]
    md += [
        "",
        markdown_tables(report),
        "### Throughput",
        "",
        "| checkpoint | samples | tokens | seconds | samples/s | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, t in report["throughput"].items():
        md.append(
            f"| {label} | {t['sequences']} | {t['tokens']} | {t['seconds']:.1f} | "
            f"{t['samples_per_s'] or 0:.1f} | {t['tokens_per_s'] or 0:.0f} |"
        )
    md += [""] + [f"![{p}]({p})" for p in report["plots"]]
    path.write_text("\n".join(md) + "\n")


# ================================================================================================ files
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def write_outputs(
    report: dict, ckpts: list, tasks: list, results: list, out: Path, run_metrics: dict[Path, list[dict]]
) -> None:
    """report.json, report.md, plots and samples/<checkpoint>/<task>.jsonl into `out`; `run_metrics` holds the
    metrics rows of the runs the checkpoints come from (for their training curves)."""
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        name = f"pass_at_k_{_safe(task.name)}.png"
        plot_pass_at_k(
            task.name,
            [(c.label, r.outcomes[task.name]) for c, r in zip(ckpts, results)],
            report["tasks"][task.name]["metrics"],
            out / name,
        )
        report["plots"].append(name)
    runs: dict[Path, list] = {}
    for c in ckpts:
        if c.run_dir is not None:
            runs.setdefault(c.run_dir, []).append(c)
    for run_dir, members in runs.items():
        name = f"training_{_safe(run_dir.resolve().name)}.png"
        if plot_training(run_dir.resolve().name, run_metrics.get(run_dir, []), members, report, out / name):
            report["plots"].append(name)
    for c, res in zip(ckpts, results):
        folder = out / "samples" / _safe(c.label)
        folder.mkdir(parents=True, exist_ok=True)
        for task_name, records in res.samples.items():
            with (folder / f"{_safe(task_name)}.jsonl").open("w") as fh:
                for rec in records:
                    fh.write(json.dumps(rec) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_markdown(report, out / "report.md")


# ================================================================================================ run report
# The end-of-run report of `rlk2 train`: a before/after table of the held-out metrics, report.md and PNG plots.
def _fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def before_after_table(before: dict, after: dict) -> str:
    keys = sorted(k for k in after if k.startswith("eval/"))
    lines = ["| metric | before RL | after RL | change |", "|---|---:|---:|---:|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        lines.append(
            f"| {k} | {_fmt_value(b)} | {_fmt_value(a)} | {_fmt_value(delta) if delta is None else f'{delta:+.3f}'} |"
        )
    return "\n".join(lines)


def write_run_report(run_dir: str | Path, rows: list[dict], before: dict, after: dict) -> str:
    """Write report.md and plots; return the before/after table (markdown)."""
    run_dir = Path(run_dir)
    table = before_after_table(before, after)
    train_rows = [r for r in rows if "reward/mean" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    plots = []
    reward_keys = ["reward/mean"] + sorted(
        {k for r in train_rows for k in r if k.startswith("rewards/") and k.endswith("/mean")}
    )
    if plot_series(train_rows, reward_keys, run_dir / "reward.png", "training reward"):
        plots.append("reward.png")
    eval_keys = sorted({k for r in eval_rows for k in r if "pass@" in k})
    if plot_series(eval_rows, eval_keys, run_dir / "eval.png", "held-out evaluation"):
        plots.append("eval.png")
    if plot_series(train_rows, ["loss", "entropy", "kl/approx"], run_dir / "loss.png", "loss / entropy / KL"):
        plots.append("loss.png")
    steps = len(train_rows)
    total_time = sum(r.get("time/rollout", 0) + r.get("time/reward", 0) + r.get("time/update", 0) for r in train_rows)
    md = [
        f"# Run report: {run_dir.name}",
        "",
        f"{steps} RL steps, {total_time:.1f} s of RL step time.",
        "",
        "## Held-out evaluation",
        "",
        table,
        "",
    ]
    md += [f"![{p}]({p})" for p in plots]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    return table
