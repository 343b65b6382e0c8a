"""Critic backends on a tiny real checkpoint, and closed-loop refinement: verified pairs, the agreement reward,
critic samples that go through the same K2 loss as the policy's own rollouts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rewards.rubric import Reply, RubricError, parse_verdict, rubric
from rlk2.algorithms import group_advantages
from rlk2.critic import (
    CheckpointCritic,
    CriticRefiner,
    PolicyCritic,
    VerifiedPair,
    format_warmup_rows,
    generate_texts,
    pairs_from_records,
    verified_pairs,
)
from rlk2.critic.refine import agreement_metrics, agreement_reward, both_orders_rewards, pair_advantages

ROOT = Path(__file__).resolve().parent.parent
TOY = {
    "template": str(ROOT / "configs/critic/toy_prompt.txt"),
    "rubrics": [str(ROOT / "configs/critic/toy_rubric.toml")],
}


@pytest.fixture(scope="module")
def policy(tiny_policy):
    from rlk2.policy import load_policy

    return load_policy(tiny_policy)


# ----------------------------------------------------------------------------------------------- backends
def test_self_critic_is_refused_outside_training_and_the_live_critic_sees_the_weights(policy):
    model, tok = policy
    with pytest.raises(RubricError, match="only `rlk2 train`"):  # the name alone: no live policy to find
        rubric(["a", "b"], prompts=["p", "p"], backend="self")
    critic = PolicyCritic(model, tok)  # what the loop passes in the reward's options instead of the name
    first = critic.complete(["1+1=?", "2+2=?"], max_new_tokens=6, temperature=0.0, seed=0)
    assert all(isinstance(r.text, str) and r.error is None for r in first)
    assert first == critic.complete(["1+1=?", "2+2=?"], max_new_tokens=6, temperature=0.0, seed=0)
    state = torch.get_rng_state()
    critic.complete(["1+1=?"], max_new_tokens=6, temperature=1.0, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # sampling with its own generator: the global RNG untouched
    with torch.no_grad():  # move the live weights: the same critic object now answers differently
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.mul_(-1.0)
    try:
        moved = critic.complete(["1+1=?", "2+2=?"], max_new_tokens=6, temperature=0.0, seed=0)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert moved != first


def test_checkpoint_critic_and_too_long_prompts(tiny_policy, policy):
    critic = CheckpointCritic(str(tiny_policy), device="cpu")
    out = critic.complete(["3+4=?", "x" * 400], max_new_tokens=5, temperature=0.0, seed=0)
    assert out[0].error is None and out[0].text is not None
    assert out[1].text is None and out[1].error.startswith("critic prompt too long")
    # the same weights in process give the same greedy reply
    assert generate_texts(*policy, ["3+4=?"], max_new_tokens=5, temperature=0.0, seed=0)[0] == out[0]
    with pytest.raises(RubricError, match="critic checkpoint: policy.path"):
        CheckpointCritic(str(tiny_policy / "missing"))


def test_rubric_reward_with_a_real_local_critic(policy):
    """The untrained tiny model writes no verdicts: every sample is None and every judgment is counted."""
    out = rubric(
        ["\\boxed{3}", "\\boxed{4}"], prompts=["1+2=?"] * 2, backend=PolicyCritic(*policy), max_new_tokens=8, **TOY
    )
    assert len(out["rewards"]) == 2
    for r, j in zip(out["rewards"], out["extras"]["judgments"]):
        assert len(j) == 2 and all(x["error"] is None for x in j)  # generated fine
        assert r is None or 0.0 <= r <= 1.0
        assert (r is None) == all(x["verdict"] is None for x in j)


# ----------------------------------------------------------------------------------------------- refinement
def test_verified_pairs_only_where_outcomes_differ():
    prompts = ["p"] * 4 + ["q"] * 4 + ["r"] * 4
    texts = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "i", "j", "k"]
    rewards = [1.0, 0.0, 0.0, None, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, None, None]
    pairs = verified_pairs(prompts, texts, rewards, group_size=4, per_prompt=5, rng=random.Random(0))
    # group p: a beats b and c (None is never paired); q: all tie -> none; r: "i" vs "i" same text -> none
    assert sorted((p.prompt, p.better, p.worse) for p in pairs) == [("p", "a", "b"), ("p", "a", "c")]
    one = verified_pairs(prompts, texts, rewards, group_size=4, per_prompt=1, rng=random.Random(0))
    assert len(one) == 1 and one[0].better == "a"


def test_held_out_pairs_from_eval_records():
    records = [
        {"prompt": "p", "completion": "4", "passed": True},
        {"prompt": "p", "completion": "5", "passed": False},
        {"prompt": "q", "completion": "1", "passed": True},
        {"prompt": "q", "completion": "1", "passed": True},
        {"prompt": "r", "completion": "0", "passed": False},
    ]
    assert pairs_from_records(records, n_pairs=10, seed=0) == [VerifiedPair("p", "4", "5")]


def test_agreement_reward_and_metrics():
    assert [agreement_reward(v, "A") for v in ("A", "B", "tie", None)] == [1.0, 0.0, 0.0, 0.0]
    assert agreement_reward(None, "A", unparsable=None) is None  # opt-in: left out of the group baseline
    # always "B": right exactly once per pair -> 0.5, and never picks the same response in both orders
    m = agreement_metrics(["B", "B"] * 3, ["A", "B"] * 3)
    assert m == {
        "critic/agreement": 0.5,
        "critic/pair_accuracy": 0.0,
        "critic/unparsable": 0.0,
        "critic/position_consistency": 0.0,
    }
    # right in both orders on pairs 1 and 3, position-locked on pair 2
    m = agreement_metrics(["A", "B", "A", "A", "A", "B"], ["A", "B"] * 3)
    assert m["critic/pair_accuracy"] == 2 / 3 and m["critic/position_consistency"] == 2 / 3


def test_both_orders_reward_pays_only_a_pair_judged_right_both_ways():
    K = 3
    # pair 1: verdicts right in order 1 on samples 0, 1, 2 and in order 2 on samples 1, 2 -> couples 1 and 2 pay
    # pair 2: a constant verdict, right shown first and wrong shown second -> nothing pays
    per_order = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0] + [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    out = both_orders_rewards(per_order, group_size=K)
    assert out == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0] + [0.0] * 6
    assert both_orders_rewards([1.0, None, 1.0, 1.0], group_size=1) == [None, None, 1.0, 1.0]
    with pytest.raises(ValueError, match="whole pairs"):
        both_orders_rewards([1.0] * 5, group_size=K)
    with pytest.raises(ValueError, match="per_order or both_orders"):
        CriticRefiner(reward="pairs", **TOY)


def test_critic_prompt_uses_the_rubric_template():
    ref = CriticRefiner(**TOY)
    assert ref.critic_prompt("1+2=?", "\\boxed{3}", "\\boxed{4}") == "Judge 1+2=? by correct: A=\\boxed{3} B=\\boxed{4}"
    with pytest.raises(RubricError, match="rubric file not found"):
        CriticRefiner(template=TOY["template"], rubrics=["nope/missing.toml"])


def test_format_warmup_rows_teach_format_not_judgement():
    rows = [{"prompt": f"{a}+1=?", "completion": f"\\boxed{{{a + 1}}}"} for a in range(50)]
    out = format_warmup_rows(rows, n=400, refiner=CriticRefiner(**TOY), seed=0)
    assert len(out) == 400
    agree = 0
    for r in out:
        gold = r["completion"].split(" Verdict")[0]
        v = parse_verdict(r["completion"])
        assert v.verdict in ("A", "B") and v.reason == gold
        shown_a = r["prompt"].split("A=")[1].split(" B=")[0]
        agree += (v.verdict == "A") == (shown_a == gold)
    assert 150 < agree < 250  # coin-flip verdicts: about half agree with the gold, far from 0 or 400


def test_format_warmup_rows_with_gold_verdicts_name_the_gold():
    rows = [{"prompt": f"{a}+1=?", "completion": f"\\boxed{{{a + 1}}}"} for a in range(50)]
    out = format_warmup_rows(rows, n=200, refiner=CriticRefiner(**TOY), seed=0, verdicts="gold")
    assert len(out) == 200
    shown_first = 0
    for r in out:
        gold = r["completion"].split(" Verdict")[0]
        shown_a = r["prompt"].split("A=")[1].split(" B=")[0]
        assert parse_verdict(r["completion"]).verdict == ("A" if shown_a == gold else "B")
        shown_first += shown_a == gold
    assert 70 < shown_first < 130  # the gold is shown first about half the time: position carries no signal
    with pytest.raises(ValueError, match="verdicts"):
        format_warmup_rows(rows, n=2, refiner=CriticRefiner(**TOY), seed=0, verdicts="some")


def _policy_and_critic_samples(policy, K: int, **refiner_options):
    """Two prompts x K policy rollouts, a pretend verifier (response 0 of each group right, the rest wrong), and
    the critic samples the refiner draws on them: (rollout, rewards, CriticSamples)."""
    from rlk2.rollout import encode_prompts, generate_rollouts

    model, tok = policy
    prompts = ["1+2=?", "3+4=?"]
    ro = generate_rollouts(
        model,
        tok,
        [i for i in encode_prompts(tok, prompts, chat_template=True) for _ in range(K)],
        max_new_tokens=6,
        temperature=1.0,
        seed=0,
    )
    rewards = [1.0 if j % K == 0 else 0.0 for j in range(len(ro.texts))]
    texts = [f"t{j}" if j % K else "right" for j in range(len(ro.texts))]  # distinct texts so pairs exist
    ref = CriticRefiner(pairs_per_prompt=2, max_new_tokens=8, **refiner_options, **TOY)
    cs = ref.samples(
        model, tok, [p for p in prompts for _ in range(K)], texts, rewards, group_size=K, temperature=1.0, seed=1
    )
    return ro, rewards, cs


def test_critic_samples_join_the_same_k2_update(policy):
    from rlk2.algorithms import LOSSES, group_advantages
    from rlk2.rollout import concat_rollouts, policy_logprobs

    model, tok = policy
    K = 4
    ro, rewards, cs = _policy_and_critic_samples(policy, K)
    assert cs is not None and cs.metrics["critic/train_pairs"] == 4.0
    assert len(cs.rewards) == len(cs.prompts) == len(cs.records) == 4 * 2 * K  # pairs x orders x K
    assert cs.rollout.completion_ids.shape[0] == len(cs.rewards)
    for rec, r in zip(cs.records, cs.rewards):
        assert r == agreement_reward(parse_verdict(rec["completion"]).verdict, rec["expected"])
    assert [rec["expected"] for rec in cs.records[::K]] == ["A", "B"] * 4  # both orders of every pair

    joined = concat_rollouts([ro, cs.rollout], tok.pad_token_id)
    totals = rewards + cs.rewards
    valid = torch.tensor([r is not None for r in totals]).view(-1, K)
    r = torch.tensor([x if x is not None else 0.0 for x in totals]).view(-1, K)
    adv, _ = group_advantages(r, valid, scale=False)
    logp, _ = policy_logprobs(model, joined, temperature=1.0)
    assert torch.allclose(logp * joined.completion_mask, joined.old_logp, atol=1e-4)  # pi_theta == pi_old at start
    loss, _ = LOSSES["k2"](
        logp,
        joined.old_logp,
        adv.view(-1),
        joined.completion_mask.float(),
        tau=0.05,
        length_norm=False,
        clip_low=0.2,
        clip_high=0.2,
    )
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_no_differing_pair_means_no_critic_samples(policy):
    ref = CriticRefiner(**TOY)
    assert ref.samples(*policy, ["p"] * 2, ["a", "b"], [1.0, 1.0], group_size=2, temperature=1.0, seed=0) is None


def test_heldout_agreement_on_a_real_model(policy):
    ref = CriticRefiner(max_new_tokens=8, **TOY)
    pairs = [VerifiedPair(f"{a}+1=?", f"\\boxed{{{a + 1}}}", f"\\boxed{{{a + 2}}}") for a in range(6)]
    m = ref.agreement(*policy, pairs)
    assert m["critic/heldout_pairs"] == 6.0 and 0.0 <= m["critic/agreement"] <= 1.0
    assert m["critic/agreement"] <= 1.0 - m["critic/unparsable"]  # unparsable verdicts never count as agreement
    assert ref.agreement(*policy, []) == {}


def test_reply_is_text_or_reason():
    assert Reply("x") == ("x", None) and Reply(None, "down").error == "down"


def test_pair_advantages_give_a_position_biased_critic_a_gradient():
    """Always "B": each order's group ties (no gradient per order); pooled per pair, the two orders get opposite
    signs."""
    k = 4
    rewards = torch.tensor([[0.0] * k, [1.0] * k, [1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])  # 2 pairs x 2 orders
    valid = torch.ones(4, k, dtype=torch.bool)
    per_order, tied_per_order = group_advantages(rewards, valid, scale=True)
    assert tied_per_order[:2].all() and not per_order[:2].any()  # the collapse is absorbing per order
    adv, tied = pair_advantages(rewards, valid, scale=True)
    assert not tied.any()
    assert (adv[0] < 0).all() and (adv[1] > 0).all()  # "B" pushed down where A was better, up where B was
    pooled, _ = group_advantages(rewards.view(2, 2 * k), valid.view(2, 2 * k), scale=True)
    assert torch.equal(adv, pooled.view(4, k))  # the definition: one group of 2K per pair


def test_pair_advantages_tie_only_when_both_orders_tie_together():
    right_everywhere = torch.ones(2, 3)
    adv, tied = pair_advantages(right_everywhere, torch.ones(2, 3, dtype=torch.bool), scale=False)
    assert tied.tolist() == [True, True] and not adv.any()
    with pytest.raises(ValueError, match="both orders"):
        pair_advantages(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool), scale=False)


def test_both_orders_critic_samples_score_couples(policy):
    K = 4
    _, _, cs = _policy_and_critic_samples(policy, K, reward="both_orders")
    agree = [float(rec["verdict"] == rec["expected"]) for rec in cs.records]
    want = [
        0.0 if rec["verdict"] is None else b for rec, b in zip(cs.records, both_orders_rewards(agree, group_size=K))
    ]
    assert cs.rewards == want == [rec["reward"] for rec in cs.records]
    assert cs.metrics["critic/train_both_orders"] == sum(both_orders_rewards(agree, group_size=K)) / len(agree)
    assert cs.metrics["critic/train_both_orders"] <= cs.metrics["critic/train_agreement"]


def test_refine_docstring_examples_run():
    import doctest

    import rlk2.critic.refine

    result = doctest.testmod(rlk2.critic.refine)
    assert result.attempted >= 6 and result.failed == 0
