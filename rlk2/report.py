"""End-of-run report: a before/after table, report.md and PNG plots in the run directory."""

from __future__ import annotations

import math
from pathlib import Path


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def before_after_table(before: dict, after: dict) -> str:
    keys = sorted(k for k in after if k.startswith("eval/"))
    lines = ["| metric | before RL | after RL | change |", "|---|---:|---:|---:|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        lines.append(f"| {k} | {_fmt(b)} | {_fmt(a)} | {_fmt(delta) if delta is None else f'{delta:+.3f}'} |")
    return "\n".join(lines)


def _plot(rows: list[dict], keys: list[str], path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_run_report(run_dir: str | Path, rows: list[dict], before: dict, after: dict) -> str:
    """Write report.md and plots; return the before/after table (markdown)."""
    run_dir = Path(run_dir)
    table = before_after_table(before, after)
    train_rows = [r for r in rows if "reward/mean" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    plots = []
    reward_keys = ["reward/mean"] + sorted({k for r in train_rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    if _plot(train_rows, reward_keys, run_dir / "reward.png", "training reward"):
        plots.append("reward.png")
    eval_keys = sorted({k for r in eval_rows for k in r if "pass@" in k})
    if _plot(eval_rows, eval_keys, run_dir / "eval.png", "held-out evaluation"):
        plots.append("eval.png")
    if _plot(train_rows, ["loss", "entropy", "kl/approx"], run_dir / "loss.png", "loss / entropy / KL"):
        plots.append("loss.png")
    steps = len(train_rows)
    total_time = sum(r.get("time/rollout", 0) + r.get("time/reward", 0) + r.get("time/update", 0) for r in train_rows)
    md = [f"# Run report: {run_dir.name}", "", f"{steps} RL steps, {total_time:.1f} s of RL step time.", "",
          "## Held-out evaluation", "", table, ""]
    md += [f"![{p}]({p})" for p in plots]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    return table
