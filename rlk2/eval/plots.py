"""PNG plots: pass@k curves per task and training curves (`rlk2 eval`), and a run's own curves (report.md)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window: set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from rlk2.eval.metrics import pass_at_k  # noqa: E402


def plot_pass_at_k(task: str, outcomes: list, metrics: dict, path: Path) -> None:
    """pass@k for every k from 1 to n per checkpoint (the estimator is cheap), with the report's 95 % intervals
    drawn at the requested k."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, o in outcomes:
        n = o.n
        correct = o.passed.sum(axis=1)
        ks = np.arange(1, n + 1)
        curve = [float(np.mean([pass_at_k(n, int(c), int(k)) for c in correct])) for k in ks]
        (line,) = ax.plot(ks, curve, label=label)
        for name, entry in metrics[label].items():
            if name.startswith("pass@") and entry["ci"] is not None and entry["value"] is not None:
                k = int(name.split("@")[1])
                lo, hi = entry["ci"]
                ax.errorbar(
                    [k],
                    [entry["value"]],
                    yerr=[[entry["value"] - lo], [hi - entry["value"]]],
                    fmt="o",
                    color=line.get_color(),
                    capsize=3,
                    markersize=4,
                )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4, 8 rather than 2^0, 2^1, ...
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{task}: pass@k (95 % bootstrap intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def plot_training(run_name: str, rows: list[dict], ckpts: list, report: dict, path: Path) -> bool:
    """Training reward (left) and the run's own periodic eval (right) from its metrics rows, with this evaluation's
    pass@1 at the evaluated steps. False when the run logged nothing to plot."""
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not train and not evals:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = ["reward/mean"] + sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in train if _finite(r.get(key))]
        if pts:
            left.plot(*zip(*pts), label=key)
    left.set_title(f"{run_name}: training reward")
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and ("pass@" in k or "maj@" in k)})
    for key in eval_keys:
        pts = [(r["step"], r[key]) for r in evals if _finite(r.get(key))]
        if pts:
            right.plot(*zip(*pts), marker=".", label=f"{key} (run)")
    for c in ckpts:
        if c.step is None:
            continue
        for task, t in report["tasks"].items():
            entry = t["metrics"][c.label].get("pass@1")
            if entry and entry["value"] is not None:
                right.scatter(
                    [c.step],
                    [entry["value"]],
                    marker="*",
                    s=80,
                    zorder=3,
                    label=f"eval/{task}/pass@1 ({c.label}, this report)",
                )
    right.set_title("held-out evaluation")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_series(rows: list[dict], keys: list[str], path: Path, title: str) -> bool:
    """One line per metric key over `step`; False (nothing written) when no row has any of the keys."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for key in keys:
        pts = [
            (r["step"], r[key])
            for r in rows
            if key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))
        ]
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
