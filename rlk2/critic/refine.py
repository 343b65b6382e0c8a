"""Closed-loop critic refinement (Kimi K2): ground the self-critic in verifiable rewards, inside the RL loop.

The policy is also the critic (`self` backend). On prompts that have a verifier, two responses of the same
group whose verifiable rewards differ make a *verified pair*. The policy, prompted as critic with the same
template and rubrics as the `rubric` reward, judges the pair in both orders (position bias cancels out of the
training signal); each critic prompt gets K sampled verdicts. A verdict that picks the verifier's better response
scores 1.0, the other response or a tie 0.0. The 2K verdicts on a pair (both orders) share one advantage baseline
(`pair_advantages`, `critic.pair_baseline`): with one group per order, a critic that always names the same
position ties in every group and gets no gradient at all, which made that collapse permanent in the demo. Those
samples join the same policy update (they are ordinary rollouts with old log-probs), so the critic's standards
move with the policy.

A reply with no parsable verdict scores 0.0 here (`unparsable_reward`), as math scores an answer it cannot find:
it is the critic role's own failure, not an infrastructure one. Measured on the demo model (probe with a
learnable judgement, k2 loss, AdamW 5e-4): with None instead, unparsable replies get advantage 0, nothing pulls
the model back from them, and within 60 steps every critic reply was unparsable; with 0.0 held-out agreement
went from 40 % to 99 % in 150 steps. (In the `rubric` reward an unparsable verdict stays None: there it would
score *another* sample, the policy's response, for the critic's failure.)

`critic/agreement` is measured separately, greedy, on a fixed set of held-out verified pairs (built once from
the step-0 evaluation samples, prompts never trained on), each judged in both orders: a critic that always
answers "A" scores exactly 50 %. Unparsable verdicts count as disagreement there and are reported too.

    refiner = CriticRefiner(template=None, rubrics=["core", "prescriptive"], pairs_per_prompt=1)
    heldout = pairs_from_records(eval_records, n_pairs=128, seed=0)       # once, at start-up
    batch = refiner.samples(policy, tokenizer, prompts, completions, rewards, group_size=K, temperature=1.0,
                            seed=step_seed)                              # every step; None if no pair differs
    metrics = refiner.agreement(policy, tokenizer, heldout)              # {"critic/agreement": ..., ...}
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rewards.rubric import DEFAULT_RUBRICS, fill_template, load_rubrics, load_template, parse_verdict, render_rubrics
from rlk2.algorithms import group_advantages
from rlk2.critic.backends import generate_texts
from rlk2.errors import UserError
from rlk2.rollout import encode_prompts, generate_rollouts


@dataclass(frozen=True)
class VerifiedPair:
    prompt: str
    better: str
    """The response with the higher verifiable reward."""
    worse: str


def verified_pairs(
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[float | None],
    *,
    group_size: int,
    per_prompt: int,
    rng: random.Random,
) -> list[VerifiedPair]:
    """Up to `per_prompt` random pairs per group (consecutive blocks of `group_size`) whose rewards differ.

    Unscorable responses (None) are never paired; pairs with identical texts are skipped (nothing to judge).
    """
    out = []
    for g in range(0, len(completions), group_size):
        idx = [i for i in range(g, min(g + group_size, len(completions))) if rewards[i] is not None]
        cands = [
            (i, j)
            for a, i in enumerate(idx)
            for j in idx[a + 1 :]
            if rewards[i] != rewards[j] and completions[i] != completions[j]
        ]
        rng.shuffle(cands)
        seen = set()
        for i, j in cands:
            hi, lo = (i, j) if rewards[i] > rewards[j] else (j, i)
            key = (completions[hi], completions[lo])
            if key in seen:
                continue
            seen.add(key)
            out.append(VerifiedPair(prompts[g], completions[hi], completions[lo]))
            if len(seen) >= per_prompt:
                break
    return out


def pairs_from_records(records: Sequence[dict], *, n_pairs: int, seed: int) -> list[VerifiedPair]:
    """Held-out pairs from evaluation samples (`prompt`, `completion`, `passed`): one passed vs one failed response
    per prompt, prompts drawn at random, at most `n_pairs`."""
    by_prompt: dict[str, tuple[list[str], list[str]]] = {}
    for r in records:
        good, bad = by_prompt.setdefault(r["prompt"], ([], []))
        (good if r["passed"] else bad).append(r["completion"])
    rng = random.Random(seed)
    prompts = sorted(p for p, (good, bad) in by_prompt.items() if good and set(bad) - set(good))
    rng.shuffle(prompts)
    out = []
    for p in prompts[:n_pairs]:
        good, bad = by_prompt[p]
        out.append(VerifiedPair(p, rng.choice(good), rng.choice(sorted(set(bad) - set(good)))))
    return out


def agreement_reward(verdict: str | None, expected: str, *, unparsable: float | None = 0.0) -> float | None:
    """The critic role's verifiable reward: 1.0 for the verifier's choice, 0.0 for the other or a tie; a reply
    without a verdict gets `unparsable` (0.0 by default, see CriticRefiner; None leaves it out of the baseline)."""
    return unparsable if verdict is None else float(verdict == expected)


def both_orders_rewards(rewards: Sequence[float | None], *, group_size: int) -> list[float | None]:
    """`critic.reward: both_orders`: a verdict pays only when its partner in the other order (the sample with the
    same index among the pair's other `group_size` verdicts) is right too. `rewards` are per-order agreement
    rewards laid out as CriticSamples holds them: pairs one after another, each as [order 1 x K, order 2 x K].

    A critic that names the same position whatever it is shown is right in exactly one order, so it earns nothing
    (with per-order rewards it earns 0.5 on every pair). An unscorable partner (None) leaves both samples None.
    >>> both_orders_rewards([1.0, 1.0, 0.0, 1.0], group_size=2)  # one pair, K = 2: couples (0, 2) and (1, 3)
    [0.0, 1.0, 0.0, 1.0]
    >>> both_orders_rewards([1.0, 1.0, 0.0, 0.0], group_size=2)  # always "A": right shown first, wrong shown second
    [0.0, 0.0, 0.0, 0.0]
    """
    k = group_size
    if len(rewards) % (2 * k):
        raise ValueError(f"both_orders_rewards: {len(rewards)} rewards are not whole pairs of 2 x {k} verdicts")
    out: list[float | None] = []
    for n, r in enumerate(rewards):
        partner = rewards[n + k if (n // k) % 2 == 0 else n - k]
        out.append(None if r is None or partner is None else float(r == 1.0 and partner == 1.0))
    return out


def agreement_metrics(verdicts: Sequence[str | None], expected: Sequence[str]) -> dict[str, float]:
    """Held-out agreement from verdicts given in pair order (both orders of a pair next to each other).

    Three pairs: right in both orders (2 agree); always "A" (1 agrees); one unparsable, one right (1 agrees):
    >>> m = agreement_metrics(["A", "B", "A", "A", None, "B"], ["A", "B"] * 3)
    >>> m["critic/agreement"], m["critic/unparsable"], m["critic/position_consistency"]  # 4/6, 1/6, 1 of 2
    (0.6666666666666666, 0.16666666666666666, 0.5)
    >>> m["critic/pair_accuracy"]  # pairs judged right in both orders: 1 of 3
    0.3333333333333333
    """
    agree = [v == e for v, e in zip(verdicts, expected, strict=True)]
    both = [(verdicts[k], verdicts[k + 1]) for k in range(0, len(verdicts) - 1, 2)]
    parsed = [(a, b) for a, b in both if a in ("A", "B") and b in ("A", "B")]
    return {
        "critic/agreement": sum(agree) / len(agree),
        # a pair counts only when both of its orders are right: a constant verdict scores 0 here, not 0.5
        "critic/pair_accuracy": sum(agree[k] and agree[k + 1] for k in range(0, len(agree) - 1, 2)) / (len(agree) // 2),
        "critic/unparsable": sum(v is None for v in verdicts) / len(verdicts),
        # does the critic pick the same response whichever is shown first? (A then B, or B then A)
        "critic/position_consistency": sum(a != b for a, b in parsed) / len(parsed) if parsed else float("nan"),
    }


def pair_advantages(rewards: torch.Tensor, valid: torch.Tensor, *, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of critic samples with one baseline per pair: rewards, valid [M, K] with the two orders of each
    pair in consecutive rows; returns (advantages [M, K], zero_std [M], true for both rows of a tied pair).

    Why per pair and not per order: a critic that always answers "B" is wrong on every sample of the order that
    shows the better response first and right on every sample of the other, so each order's group ties and
    carries no gradient, and the collapse is absorbing. Pooled, the same verdicts differ in reward and the
    update pushes "B" up where B is better and down where it is not, which only judging the responses can satisfy.

    Always "B" on one pair, K = 2: order 1 (better shown as A) rewards [0, 0], order 2 [1, 1]; pooled mean 0.5,
    so the advantages are -0.5 and +0.5 (scaled by the pooled std 0.5: -1 and +1), where per-order groups give 0.
    >>> adv, tied = pair_advantages(torch.tensor([[0., 0.], [1., 1.]]), torch.ones(2, 2, dtype=torch.bool), scale=True)
    >>> adv.round(decimals=4).tolist(), tied.tolist()
    ([[-1.0, -1.0], [1.0, 1.0]], [False, False])
    """
    m, k = rewards.shape
    if m % 2:
        raise ValueError(f"pair_advantages: {m} critic prompts, expected both orders of each pair")
    adv, zero_std = group_advantages(rewards.reshape(m // 2, 2 * k), valid.reshape(m // 2, 2 * k), scale=scale)
    return adv.reshape(m, k), zero_std.repeat_interleave(2)


@dataclass
class CriticSamples:
    """Critic-role rollouts for one step, ready to be concatenated with the policy's own."""

    rollout: object
    """rlk2.rollout.Rollout, [M * K] sequences: M critic prompts, K sampled verdicts each, old log-probs recorded.
    The M prompts are M / 2 pairs, each shown in both orders one after the other (better first, then worse first)."""
    rewards: list[float | None]
    """Agreement with the verifier per sample: 1.0 / 0.0 (with `reward="both_orders"`, 1.0 only when the partner
    verdict in the other order agrees too); an unparsable verdict gets `unparsable_reward`."""
    prompts: list[str]
    """The critic prompt of each sample (user message, before the chat template)."""
    records: list[dict] = field(default_factory=list)
    """One per sample for rollouts/step-N.jsonl: prompt, completion, verdict, reason, expected, reward."""
    metrics: dict[str, float] = field(default_factory=dict)
    """critic/train_agreement, critic/train_both_orders, critic/train_unparsable, critic/train_pairs,
    critic/skipped_long."""


class CriticRefiner:
    """Builds critic prompts from verified pairs, samples verdicts from the policy, scores them by agreement."""

    def __init__(
        self,
        *,
        template: str | None = None,
        rubrics: Sequence[str] | str = DEFAULT_RUBRICS,
        pairs_per_prompt: int = 1,
        max_pairs: int | None = None,
        max_new_tokens: int = 64,
        chat_template: bool = True,
        unparsable_reward: float | None = 0.0,
        reward: str = "per_order",
    ) -> None:
        if pairs_per_prompt < 1:
            raise ValueError("pairs_per_prompt must be >= 1")
        if reward not in ("per_order", "both_orders"):
            raise ValueError(f"reward must be per_order or both_orders, got {reward!r}")
        self.reward = reward
        self.template = load_template(template)  # validated now: a bad file fails at start-up, not at step 1
        self.rubrics = load_rubrics(rubrics)
        self.pairs_per_prompt, self.max_pairs = pairs_per_prompt, max_pairs
        self.max_new_tokens, self.chat_template = max_new_tokens, chat_template
        self.unparsable_reward = unparsable_reward

    def critic_prompt(self, prompt: str, response_a: str, response_b: str) -> str:
        return fill_template(
            self.template,
            {
                "prompt": prompt,
                "response_a": response_a,
                "response_b": response_b,
                "rubrics": render_rubrics(self.rubrics),
                "rubric_names": ", ".join(r.name for r in self.rubrics),
            },
        )

    def _jobs(self, pairs: Sequence[VerifiedPair]) -> list[tuple[str, str, VerifiedPair]]:
        """(critic prompt, expected verdict, pair): every pair in both orders."""
        return [
            job
            for p in pairs
            for job in (
                (self.critic_prompt(p.prompt, p.better, p.worse), "A", p),
                (self.critic_prompt(p.prompt, p.worse, p.better), "B", p),
            )
        ]

    def _fits(self, model, ids: list[int]) -> bool:
        limit = getattr(model.config, "max_position_embeddings", None)
        return not limit or len(ids) + self.max_new_tokens <= limit

    def samples(
        self,
        model,
        tokenizer,
        prompts: Sequence[str],
        completions: Sequence[str],
        rewards: Sequence[float | None],
        *,
        group_size: int,
        temperature: float,
        seed: int,
        record_routing: bool = False,
    ) -> CriticSamples | None:
        """Critic-role samples for this step's verifiable groups (`prompts` repeated per sample), or None.

        `record_routing` records the experts of every token (as the policy's own rollouts do under router
        replay): `concat_rollouts` keeps recorded routing only when every part has it.
        """
        rng = random.Random(seed)
        pairs = verified_pairs(
            prompts, completions, rewards, group_size=group_size, per_prompt=self.pairs_per_prompt, rng=rng
        )
        if self.max_pairs is not None and len(pairs) > self.max_pairs:
            pairs = rng.sample(pairs, self.max_pairs)
        jobs = self._jobs(pairs)
        ids = encode_prompts(tokenizer, [j[0] for j in jobs], chat_template=self.chat_template)
        # A pair stays only if both of its orders fit: the two orders sit next to each other (pair_advantages).
        keep = [k for k in range(len(ids)) if self._fits(model, ids[k]) and self._fits(model, ids[k ^ 1])]
        if not keep:
            return None
        jobs, ids = [jobs[k] for k in keep], [ids[k] for k in keep]
        ro = generate_rollouts(
            model,
            tokenizer,
            [x for x in ids for _ in range(group_size)],
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            seed=seed,
            record_routing=record_routing,
        )
        records, texts = [], []
        for n, text in enumerate(ro.texts):
            prompt, expected, pair = jobs[n // group_size]
            v = parse_verdict(text)
            texts.append(prompt)
            records.append(
                {
                    "task": "critic",
                    "prompt": prompt,
                    "completion": text,
                    "verdict": v.verdict,
                    "reason": v.reason,
                    "expected": expected,
                    "reward": agreement_reward(v.verdict, expected, unparsable=self.unparsable_reward),
                }
            )
        out_rewards = [rec["reward"] for rec in records]
        both = both_orders_rewards([float(r["verdict"] == r["expected"]) for r in records], group_size=group_size)
        if self.reward == "both_orders":
            out_rewards = [
                self.unparsable_reward if rec["verdict"] is None else b for rec, b in zip(records, both, strict=True)
            ]
            for rec, r in zip(records, out_rewards, strict=True):
                rec["reward"] = r
        verdicts = [rec["verdict"] for rec in records]
        metrics = {
            "critic/train_agreement": sum(rec["verdict"] == rec["expected"] for rec in records) / len(records),
            "critic/train_both_orders": sum(both) / len(both),
            "critic/train_unparsable": sum(v is None for v in verdicts) / len(records),
            "critic/train_pairs": float(len(pairs)),
            "critic/skipped_long": float(2 * len(pairs) - len(keep)),
        }
        return CriticSamples(ro, out_rewards, texts, records, metrics)

    def agreement(self, model, tokenizer, pairs: Sequence[VerifiedPair], *, batch_size: int = 256) -> dict[str, float]:
        """Greedy verdicts on held-out pairs, both orders: agreement with the verifier (unparsable = disagree)."""
        if not pairs:
            return {}
        jobs = self._jobs(pairs)
        replies = generate_texts(
            model,
            tokenizer,
            [j[0] for j in jobs],
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            seed=0,
            chat_template=self.chat_template,
            batch_size=batch_size,
        )
        verdicts = [parse_verdict(r.text).verdict for r in replies]
        return {**agreement_metrics(verdicts, [job[1] for job in jobs]), "critic/heldout_pairs": float(len(pairs))}


def format_warmup_rows(
    rows: Sequence[dict], *, n: int, refiner: CriticRefiner, seed: int, verdicts: str = "both"
) -> list[dict]:
    """Supervised rows that initialise the critic role of a model that has never seen a critic prompt.

    From task rows with a gold `completion`: the critic prompt shows the gold and another row's (different)
    completion in random order; the target reply is the gold completion as the "reason" (solve it yourself, then
    compare) followed by a verdict. `verdicts="both"` writes every critic prompt twice, once with each verdict:
    the rows teach the reply format and no judgement, and the model learns P(A) = P(B) = 1/2 for every prompt,
    so the critic starts at chance *and* explores (one random verdict per prompt would be memorised: confident
    arbitrary verdicts, K identical samples per critic prompt, no group signal; measured). `verdicts="gold"`
    names the gold: a critic initialised on synthetic preference pairs (K2 initialised its critic on preference
    data), whose wrong answers are other rows' answers, not the near misses the policy makes.
    """
    if verdicts not in ("both", "gold"):
        raise ValueError(f"verdicts must be 'both' or 'gold', got {verdicts!r}")
    pool = [r for r in rows if r.get("completion")]
    if len(pool) < 2:
        return []
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        row, other = rng.sample(pool, 2)
        if other["completion"] == row["completion"]:
            continue
        gold_first = rng.random() < 0.5
        a, b = (row["completion"], other["completion"]) if gold_first else (other["completion"], row["completion"])
        prompt = refiner.critic_prompt(row["prompt"], a, b)
        for verdict in "AB" if verdicts == "both" else "A" if gold_first else "B":
            out.append({"prompt": prompt, "completion": f"{row['completion']} Verdict: {verdict}"})
    return out[:n]


def check_refine_launch(num_processes: int) -> None:
    """Refinement runs on one process only: its verified pairs are drawn from the whole step's batch, and splitting
    the critic samples across ranks so that N processes reproduce one (as rlk2.distributed does for the policy's
    own groups) is not implemented. Refused at start-up rather than trained differently per rank."""
    if num_processes > 1:
        raise UserError(
            f"critic.refine: supported on one process only, this launch has {num_processes} (critic "
            "samples are not split across ranks); launch one process or set critic.refine=false"
        )


def save_pairs(path: Path, pairs: Sequence[VerifiedPair]) -> None:
    """Held-out pairs, one JSON object a line: a resumed run measures agreement on the same pairs."""
    Path(path).write_text("".join(json.dumps(asdict(p)) + "\n" for p in pairs))


def load_pairs(path: Path) -> list[VerifiedPair]:
    return [VerifiedPair(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
