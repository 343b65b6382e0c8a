"""The closed-loop critic inside `rlk2 train`: what the loop calls, at set-up, every step, and when it logs.

`ClosedLoop.from_config` builds it (None when `critic.refine` is off); then
- `warm_start_rows` / `warm_start_key`: critic-format rows for the demo's supervised warm start and their cache key;
- `start`: the held-out verified pairs (from the step-0 evaluation samples, or the run directory's file on a
  resume) and the step-0 `critic/agreement`;
- `samples`: this step's critic-role rollouts, judged pairs of the step's own verified responses;
- `agreement`: `critic/agreement` on the held-out pairs, with its time.
The refinement itself (pairing, prompts, rewards, advantages) is `rlk2.critic.refine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rewards.rubric import DEFAULT_RUBRICS, RubricError
from rlk2.config import Config, TaskConfig, critic_tasks
from rlk2.critic.refine import (
    CriticRefiner,
    CriticSamples,
    VerifiedPair,
    check_refine_launch,
    format_warmup_rows,
    load_pairs,
    pairs_from_records,
    save_pairs,
)
from rlk2.errors import UserError


def critic_standard(tasks: list[TaskConfig]) -> tuple[str | None, list[str]]:
    """The critic prompt template and rubric sets the run's rubric reward judges with (its `template` and
    `rubrics` options), so the refined critic is trained on the standard it is used with; the shipped ones when no
    task has a rubric reward. Two rubric rewards with different standards are refused: there is one critic."""
    found = {
        (r.kwargs.get("template"), tuple(r.kwargs.get("rubrics", DEFAULT_RUBRICS)))
        for t in tasks
        for r in t.rewards
        if r.name.rsplit(":", 1)[-1] == "rubric"
    }
    if len(found) > 1:
        raise UserError(
            "tasks: the rubric rewards use different `template` / `rubrics` options, and the refined "
            "critic (critic.refine) can learn one standard; give them the same ones"
        )
    template, rubrics = found.pop() if found else (None, DEFAULT_RUBRICS)
    return template, [rubrics] if isinstance(rubrics, str) else list(rubrics)


@dataclass
class ClosedLoop:
    refiner: CriticRefiner
    grounding: list[str]
    """Tasks whose verifiable rewards ground the critic."""
    template: str | None
    rubrics: list[str]
    heldout_pairs: int
    agreement_every: int
    pair_baseline: bool
    warm_examples: int
    warm_verdicts: str
    heldout: list[VerifiedPair] = field(default_factory=list)

    @staticmethod
    def from_config(cfg: Config, num_processes: int) -> ClosedLoop | None:
        """The loop's critic when `critic.refine` is on (template and rubric files checked now), else None."""
        if not cfg.critic.refine:
            return None
        check_refine_launch(num_processes)
        c = cfg.critic
        template, rubrics = critic_standard(cfg.tasks)
        try:
            refiner = CriticRefiner(
                template=template,
                rubrics=rubrics,
                pairs_per_prompt=c.pairs_per_prompt,
                max_pairs=c.max_pairs,
                max_new_tokens=c.max_new_tokens,
                chat_template=cfg.policy.chat_template,
                unparsable_reward=c.unparsable_reward,
                reward=c.reward,
            )
        except RubricError as exc:
            raise UserError(f"critic (the rubric reward's template / rubrics): {exc}") from None
        return ClosedLoop(
            refiner,
            critic_tasks(cfg),
            template,
            rubrics,
            c.heldout_pairs,
            c.agreement_every,
            c.pair_baseline,
            c.warm_start_examples,
            c.warm_start_verdicts,
        )

    # ------------------------------------------------------------------------------------------- warm start
    def warm_start_rows(self, task_rows: dict[str, list[dict]], *, seed: int) -> list[dict]:
        """Critic-format rows from the grounding tasks' gold completions (`format_warmup_rows`)."""
        if not self.warm_examples:
            return []
        grounding = [r for name in self.grounding for r in task_rows.get(name, [])]
        return format_warmup_rows(
            grounding, n=self.warm_examples, refiner=self.refiner, seed=seed, verdicts=self.warm_verdicts
        )

    def warm_start_key(self) -> list:
        """What the warm-start rows depend on, for the warm start's cache key."""
        return [self.warm_examples, self.template, list(self.rubrics), self.grounding, self.refiner.max_new_tokens] + (
            [self.warm_verdicts] if self.warm_verdicts != "both" else []
        )

    # ------------------------------------------------------------------------------------------- held out
    def start(self, heldout_file: Path, eval_records: dict[str, list[dict]] | None, *, seed: int) -> list[str]:
        """Fix the held-out pairs: from the step-0 evaluation records (a new run; saved to `heldout_file`) or from
        `heldout_file` (a resumed run: the same pairs as before). Returns warnings to print."""
        if eval_records is not None:
            records = [r for name in self.grounding for r in eval_records.get(name, [])]
            self.heldout = pairs_from_records(records, n_pairs=self.heldout_pairs, seed=seed)
            save_pairs(heldout_file, self.heldout)
        elif heldout_file.exists():
            self.heldout = load_pairs(heldout_file)
        if self.heldout:
            return []
        return [
            "warning: critic.refine: no held-out verified pairs (no evaluation prompt of "
            f"{', '.join(self.grounding)} had both a passed and a failed sample; raise eval.samples or "
            "eval_size); critic/agreement is logged as NaN"
        ]

    def due(self, step: int, last_step: int) -> bool:
        return step % self.agreement_every == 0 or step == last_step

    def agreement(self, model, tokenizer) -> dict[str, float]:
        """critic/agreement on the held-out verified pairs (greedy, both orders), with its time."""
        t0 = time.perf_counter()
        res = (
            self.refiner.agreement(model, tokenizer, self.heldout)
            if self.heldout
            else {"critic/agreement": float("nan"), "critic/heldout_pairs": 0.0}
        )
        return {**res, "time/critic_agreement": time.perf_counter() - t0}

    # ------------------------------------------------------------------------------------------- every step
    def samples(
        self,
        model,
        tokenizer,
        *,
        prompts: list[str],
        texts: list[str],
        totals: list[float | None],
        group_size: int,
        temperature: float,
        seed: int,
        record_routing: bool,
    ) -> CriticSamples | None:
        """Critic-role samples on this step's verified pairs (`prompts`, `texts`, `totals`: the grounding tasks'
        samples, K per prompt), or None when no group has two responses whose rewards differ."""
        return self.refiner.samples(
            model,
            tokenizer,
            prompts,
            texts,
            totals,
            group_size=group_size,
            temperature=temperature,
            seed=seed,
            record_routing=record_routing,
        )
