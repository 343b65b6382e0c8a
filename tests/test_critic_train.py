"""Closed-loop critic refinement inside the real `rlk2 train` loop (DESIGN.md 5), and its configuration.

The integration run uses a verifiable reward that any model gets mixed outcomes on (even completion length,
tests/data/critic_rewards.py), so verified pairs exist for a 5-step warm start: the test checks the wiring (pairs
found, critic samples in the update and the rollouts file, agreement measured at step 0 and at the end, the `self`
rubric critic bound to the policy), not that a tiny model learns to judge (tests/test_critic_learning.py does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlk2.config import load_config
from rlk2.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TOY_TEMPLATE = ROOT / "configs/critic/toy_prompt.txt"
TOY_RUBRIC = ROOT / "configs/critic/toy_rubric.toml"
K, PROMPTS = 4, 8


def rlk2(*args):
    return subprocess.run([sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, timeout=600)


def recipe(tmp: Path) -> Path:
    """Two tasks: `par` (verifiable, grounds the critic) and `open` (scored by the `self` rubric critic only)."""
    text = f"""
run: {{name: critic, seed: 0, dir: {tmp / "run"}}}
warm_start: {{steps: 5, batch_size: 16, examples: 200, cache_dir: {tmp / "cache"}}}
policy: {{demo: {{hidden_size: 32, num_hidden_layers: 2}}}}
tasks:
  - name: par
    source: builtin:max
    rewards: [{{name: {ROOT / "tests/data/critic_rewards.py"}:even_length}}]
    max_new_tokens: 8
    eval_size: 16
    weight: 3.0
  - name: open
    source: {ROOT / "configs/critic/open_max.jsonl"}
    rewards:
      - name: rubric
        timeout_s: 300
        kwargs: {{backend: self, template: {TOY_TEMPLATE}, rubrics: [{TOY_RUBRIC}], pairs: 2, max_new_tokens: 8}}
    max_new_tokens: 8
    eval_size: 2
    weight: 1.0
rollout: {{group_size: {K}, prompts_per_step: {PROMPTS}}}
optim: {{name: adamw}}
trainer: {{steps: 2}}
eval: {{samples: 4, greedy: false}}
critic:
  refine: true
  max_pairs: 3
  max_new_tokens: 8
  heldout_pairs: 6
  warm_start_examples: 64
"""
    path = tmp / "critic.yaml"
    path.write_text(text)
    return path


@pytest.mark.integration
@pytest.mark.slow
def test_train_with_critic_refinement(tmp_path):
    proc = rlk2("train", str(recipe(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    # critic/agreement before any update (step 0) and after the last one, on the same held-out pairs
    agreement = {r["step"]: r for r in rows if "critic/agreement" in r}
    assert {0, 2} <= set(agreement)
    heldout = (run / "critic_heldout.jsonl").read_text().splitlines()
    assert len(heldout) == 6  # 16 eval prompts x 4 samples of a coin-flip reward: enough mixed prompts
    for step in (0, 2):
        assert 0.0 <= agreement[step]["critic/agreement"] <= 1.0
        assert agreement[step]["critic/heldout_pairs"] == 6

    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        pairs = r["critic/train_pairs"]
        assert 1 <= pairs <= 3  # max_pairs caps them
        # each pair judged in both orders, K verdicts per order, next to PROMPTS * K policy samples
        critic_samples = 2 * pairs * K
        assert r["critic/batch_share"] == pytest.approx(critic_samples / (PROMPTS * K + critic_samples))
        assert r["time/critic"] > 0 and 0 < r["time/critic_share"] < 1
        assert r["rewards/rubric/verdicts"] > 0  # the open task's responses were judged

    records = [json.loads(line) for line in (run / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    critic = [rec for rec in records if rec["task"] == "critic"]
    policy = [rec for rec in records if rec["task"] != "critic"]
    assert len(policy) == PROMPTS * K
    assert len(critic) == 2 * steps[0]["critic/train_pairs"] * K
    for rec in critic:
        assert rec["expected"] in ("A", "B") and rec["verdict"] in ("A", "B", "tie", None)
        assert {"reason", "reward", "advantage", "completion"} <= set(rec)
        assert rec["reward"] == float(rec["verdict"] == rec["expected"])  # unparsable scores 0.0 too
    assert {rec["expected"] for rec in critic} == {"A", "B"}  # both orders of each pair
    # the open task's samples keep the rubric critic's judgments (verdict and reason) with them
    judged = [j for rec in policy if rec["task"] == "open" for j in rec["extras"]["rubric/judgments"]]
    assert judged and all({"verdict", "reason", "vs"} <= set(j) for j in judged)
    # the `self` critic is bound to the live policy: it replied every time (unbound, the reward raises instead)
    assert all(j["error"] is None and isinstance(j["reason"], str) for j in judged)
    assert all(records[j["vs"]]["task"] == "open" for j in judged)  # `vs` is a line of this file


# ------------------------------------------------------------------------------------------ configuration
def test_critic_config_errors_name_the_key(tmp_path):
    demo = ROOT / "configs/demo_critic.yaml"
    cfg = load_config(demo)
    assert cfg.critic.refine and cfg.critic.max_pairs == 16  # the shipped recipe's section is live
    cases = {
        "critic.tasks=[nope]": "critic.tasks[0]",
        "critic.pairs_per_prompt=0": "critic.pairs_per_prompt",
        "critic.agreement_every=0": "critic.agreement_every",
        "critic.max_pairs=0": "critic.max_pairs",
        "critic.warm_start_examples=-1": "critic.warm_start_examples",
        "critic.bogus=1": "critic.bogus",
    }
    for override, key in cases.items():
        with pytest.raises(UserError, match=key.replace(".", r"\.").replace("[", r"\[")):
            load_config(demo, [override])
    # every task scored by the rubric reward: nothing verifiable to ground the critic
    with pytest.raises(UserError, match=r"critic\.refine"):
        load_config(demo, ["tasks=[{name: open, source: configs/critic/open_max.jsonl, rewards: [{name: rubric}]}]"])
    assert load_config(demo, ["critic.refine=false", "critic.tasks=[]"]).critic.refine is False


def test_critic_config_error_on_the_command_line_is_one_line(tmp_path):
    proc = rlk2("train", str(ROOT / "configs/demo_critic.yaml"), "critic.tasks=[nope]", f"run.dir={tmp_path / 'r'}")
    assert proc.returncode != 0
    assert "critic.tasks[0]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_refinement_is_refused_on_several_processes():
    from rlk2.critic.refine import check_refine_launch

    check_refine_launch(1)
    with pytest.raises(UserError, match=r"critic\.refine: supported on one process only, this launch has 2"):
        check_refine_launch(2)


# ------------------------------------------------------------------------------------------ router replay
def test_critic_samples_keep_router_replay(tiny_policy):
    """Critic rollouts record routing too, so the joined batch still replays every sequence's experts."""
    import torch

    from rlk2.critic import CriticRefiner
    from rlk2.moe import find_routers
    from rlk2.policy import load_policy
    from rlk2.rollout import concat_rollouts, encode_prompts, generate_rollouts

    torch.manual_seed(0)
    model, tok = load_policy(tiny_policy)
    assert find_routers(model)  # the demo model is an MoE
    ids = encode_prompts(tok, ["1+1=?"], chat_template=True)
    policy_ro = generate_rollouts(model, tok, ids * 2, max_new_tokens=4, seed=0, record_routing=True)
    refiner = CriticRefiner(template=str(TOY_TEMPLATE), rubrics=[str(TOY_RUBRIC)], max_new_tokens=4)
    args = (model, tok, ["1+1=?"] * 2, ["\\boxed{2}", "\\boxed{3}"], [1.0, 0.0])
    cs = refiner.samples(*args, group_size=2, temperature=1.0, seed=1, record_routing=True)
    joined = concat_rollouts([policy_ro, cs.rollout], tok.pad_token_id)
    assert joined.routed_experts is not None
    assert joined.routed_experts.shape[1] == 2 + 4  # policy samples + one pair x 2 orders x 2 verdicts
    critic_rows = joined.routed_experts[:, 2:]
    assert (critic_rows >= 0).any()  # the critic prompts' tokens carry their recorded experts
    # without recording, the join would drop replay for the whole batch (what the loop must avoid)
    bare = refiner.samples(*args, group_size=2, temperature=1.0, seed=1)
    assert concat_rollouts([policy_ro, bare.rollout], tok.pad_token_id).routed_experts is None
