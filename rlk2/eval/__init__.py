"""Evaluation: one implementation for the training loop's held-out evaluation and `rlk2 eval`.

- `metrics`: pass@k (unbiased), maj@n, mean@n and the rest as ratios of per-prompt sums; bootstrap intervals.
- `evaluate`: `EvalTask` and `evaluate_policy` (generate, score while the next batch generates, measure).
- `tasks`: evaluation task files (`configs/eval/*.yaml`) and a training task's held-out split as an `EvalTask`.
- `report`: report.json / report.md of `rlk2 eval`, and a run's end-of-run report.md.
- `plots`: every PNG plot (pass@k curves, training curves, a run's own curves).

The `rlk2 eval` command (checkpoints and run directories side by side) is `rlk2.eval_checkpoints`.
"""

from rlk2.eval.evaluate import EvalResult, EvalTask, evaluate_policy
from rlk2.eval.metrics import TaskOutcome, pass_at_k

__all__ = ["EvalResult", "EvalTask", "TaskOutcome", "evaluate_policy", "pass_at_k"]
