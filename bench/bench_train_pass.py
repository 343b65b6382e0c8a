"""The training pass with shared prompts (`rlk2.rollout.SharedPrompts`) vs one forward over every row.

A group's K sequences share their prompt; `policy_logprobs(shared=...)` runs each distinct prompt once and lets
the completions attend to it through a KV cache (same log-probs and gradient, tested). Measured: forward +
backward of the completion log-probs for G groups x K = 8 sequences, prompts of P tokens, completions of T
tokens, the demo policy shape (random weights), eager attention, float32, CPU; the two ways alternate, median of
`reps` repetitions of 5 passes. Ratio = how many times faster the shared pass is. The loop switches sharing on
when it saves at least `trainer.shared_prompt_tokens` (256) prompt tokens: the extra forward call costs more than
a few tokens save.

    python bench/bench_train_pass.py [--quick] [--threads N]
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 160
K = 8
PASSES = 5


def _batch(groups: int, prompt_len: int, completion_len: int):
    from rlk2.rollout import Rollout

    gen = torch.Generator().manual_seed(0)
    B = groups * K
    prompts = torch.randint(3, VOCAB, (groups, prompt_len), generator=gen).repeat_interleave(K, 0)
    completions = torch.randint(3, VOCAB, (B, completion_len), generator=gen)
    return Rollout(
        prompts,
        torch.ones_like(prompts),
        completions,
        torch.ones_like(completions),
        torch.zeros(B, completion_len),
        torch.zeros(B, dtype=torch.bool),
    )


def _pass_time(model, rollout, shared) -> float:
    from rlk2.rollout import policy_logprobs

    start = time.perf_counter()
    for _ in range(PASSES):
        logp, _ = policy_logprobs(model, rollout, temperature=1.0, shared=shared)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / PASSES


def run(quick: bool) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from transformers import DeepseekV3ForCausalLM

    from rlk2.policy import TinyMoEShape, tiny_deepseek_v3_config
    from rlk2.rollout import SharedPrompts

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_deepseek_v3_config(VOCAB, TinyMoEShape())).train()
    model.config._attn_implementation = "eager"
    reps = 3 if quick else 7
    cases = [(4, 10, 6), (8, 10, 6), (4, 46, 6), (8, 46, 6)] if not quick else [(8, 10, 6), (8, 46, 6)]
    rows = []
    for groups, prompt_len, completion_len in cases:
        rollout = _batch(groups, prompt_len, completion_len)
        shared = SharedPrompts.of(rollout)
        _pass_time(model, rollout, None), _pass_time(model, rollout, shared)  # warm-up
        base, ours = [], []
        for _ in range(reps):
            base.append(_pass_time(model, rollout, None))
            ours.append(_pass_time(model, rollout, shared))
        speedups = [b / o for b, o in zip(base, ours)]
        rows.append(
            {
                "name": f"train_pass/demo_{groups}x{K}_prompt{prompt_len}_completion{completion_len}"
                f"/shared_prompts(saves {shared.saved_tokens(rollout)} tokens)",
                "value": statistics.median(ours),
                "unit": "s/pass",
                "baseline": "one forward over every row",
                "baseline_value": statistics.median(base),
                "ratio": statistics.median(speedups),
                "spread": (max(speedups) - min(speedups)) / 2,
                "reps": reps,
            }
        )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import run_all  # this file's folder is on sys.path

    run_all.standalone(run, "train_pass", __doc__, "fewer repetitions and cases")
