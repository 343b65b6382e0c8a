"""K2 training controls (rlk2/controls.py, rlk2/data.py PromptSampler): each changes what it should."""

import io
import math

import pytest
import torch

from rlk2.algorithms import LOSSES, group_advantages
from rlk2.config import load_config
from rlk2.controls import group_success, kept_sequences, load_ptx_rows, ptx_batch, ptx_loss, temperature_at
from rlk2.data import PromptSampler
from rlk2.errors import UserError


# ----------------------------------------------------------------------------------------------- temperature decay
def test_linear_temperature_decay_by_hand():
    # start 1.2, end 0.4, over 4 steps: p = (step - 1) / 4 -> 1.2, 1.0, 0.8, 0.6, 0.4, then held at 0.4
    temps = [temperature_at(s, start=1.2, end=0.4, decay_steps=4) for s in range(1, 8)]
    assert temps == pytest.approx([1.2, 1.0, 0.8, 0.6, 0.4, 0.4, 0.4])


def test_cosine_temperature_decay_by_hand():
    # cosine: end + (start - end) (1 + cos(pi p)) / 2; p = 1/4 -> 0.5 + 1.0 * (1 + 0.70711) / 2 = 1.35355
    t = [temperature_at(s, start=1.5, end=0.5, decay_steps=4, schedule="cosine") for s in (1, 2, 3, 5, 6)]
    assert t == pytest.approx([1.5, 0.5 + (1 + math.cos(math.pi / 4)) / 2, 1.0, 0.5, 0.5])
    # it starts flatter than the linear schedule: above it early, below it late
    assert t[1] > temperature_at(2, start=1.5, end=0.5, decay_steps=4)


def test_temperature_constant_when_decay_is_off():
    assert temperature_at(50, start=0.9, end=None, decay_steps=10) == 0.9
    assert temperature_at(50, start=0.9, end=0.3, decay_steps=0) == 0.9


# ----------------------------------------------------------------------------------------------- success tracking
def test_group_success_counts_rewards_above_threshold_and_skips_unscorable():
    # group 0: 1.0 > 0.5 twice, 0.5 is not above, None not scored -> (2, 3); group 1: -0.5, 0.0, 0.7, 0.2 -> (1, 4)
    totals = [1.0, 0.5, None, 1.0, -0.5, 0.0, 0.7, 0.2]
    assert group_success(totals, 4, threshold=0.5) == [(2, 3), (1, 4)]


# ----------------------------------------------------------------------------------------------- prioritized sampling
def _rows(n):
    return [{"prompt": f"p{i}", "answer": str(i)} for i in range(n)]


def _simulate(sampling, steps=60, n=10, k=8):
    """Prompts with an even index are always solved, odd ones never; outcomes fed back after every step."""
    rows = _rows(40)
    sampler = PromptSampler({"t": rows}, {"t": 1.0}, seed=3, sampling=sampling, priority_floor=0.05)
    drawn = []
    for step in range(1, steps + 1):
        for task, row in sampler.sample(n, step):
            idx = int(row["prompt"][1:])
            drawn.append(idx)
            sampler.record(task, sampler.index_of(task, row), k if idx % 2 == 0 else 0, k)
    return sampler, drawn


def test_prioritized_sampling_draws_solved_prompts_much_less_often():
    _, uniform = _simulate("uniform")
    sampler, prio = _simulate("prioritized")
    solved_uniform = sum(i % 2 == 0 for i in uniform) / len(uniform)
    solved_prio = sum(i % 2 == 0 for i in prio[100:]) / len(prio[100:])  # after every prompt has been seen
    assert solved_uniform == pytest.approx(0.5)  # a shuffled pass over the rows
    # weights: solved max(1 - 1, 0.05) = 0.05, unsolved 1 -> about 0.05 / 1.05 = 5 % of the draws (10 of 20 rows
    # per step are unsolved, so without replacement a step still needs few solved rows)
    assert solved_prio < 0.15
    assert sampler.priority("t", 0) == 0.05 and sampler.priority("t", 1) == 1.0


def test_prioritized_sampling_explores_unseen_prompts_first():
    rows = _rows(30)
    sampler = PromptSampler({"t": rows}, {"t": 1.0}, seed=0, sampling="prioritized", priority_floor=0.05)
    for i in range(20):
        sampler.record("t", i, 4, 4)  # 20 solved prompts; the other 10 never seen (weight 1 each)
    picked = [int(r["prompt"][1:]) for _, r in sampler.sample(10, step=1)]
    assert len(set(picked)) == 10  # without replacement within a step
    assert sum(i >= 20 for i in picked) >= 7


def test_sampler_state_round_trips_through_a_checkpoint_file():
    sampler, _ = _simulate("prioritized", steps=5)
    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)  # the checkpoint path: trainer_state.pt
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    fresh = PromptSampler({"t": sampler.task_rows["t"]}, {"t": 1.0}, seed=3, sampling="prioritized")
    fresh.load_state_dict(state)
    assert fresh.success == sampler.success and sum(v[1] for v in fresh.success["t"].values()) == 5 * 10 * 8
    assert fresh.sample(10, 6) == sampler.sample(10, 6)


def test_sampler_loads_a_state_without_success_counts():
    rows = _rows(5)
    sampler = PromptSampler({"t": rows}, {"t": 1.0}, seed=0)
    sampler.load_state_dict({"pos": {"t": 2}, "epoch": {"t": 1}})  # written before success tracking existed
    assert sampler.success == {"t": {}} and sampler.pos == {"t": 2}


# ----------------------------------------------------------------------------------------------- zero-std filtering
def _batch(seed=0, P=4, K=3, T=5):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # groups 1, 3 tie
    adv, zero_std = group_advantages(rewards, torch.ones(P, K, dtype=torch.bool), scale=False)
    mask = (torch.rand(P * K, T, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    old = -torch.rand(P * K, T, generator=g)
    return adv.view(-1), zero_std, mask, old


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_filtered_loss_equals_loss_of_batch_without_tied_groups(name):
    adv, zero_std, mask, old = _batch()
    keep = kept_sequences(zero_std, 3)
    assert zero_std.tolist() == [False, True, False, True] and keep.tolist() == [0, 1, 2, 6, 7, 8]
    hp = {"tau": 0.1, "clip_low": 0.2, "clip_high": 0.28}
    # on-policy start of an update: logp == old_logp, gradient taken w.r.t. logp
    full_logp = old.clone().requires_grad_(True)
    full, _ = LOSSES[name](full_logp, old, adv, mask, **hp)
    full.backward()
    kept_logp = old[keep].clone().requires_grad_(True)
    kept, _ = LOSSES[name](kept_logp, old[keep], adv[keep], mask[keep], **hp)
    kept.backward()
    # Tied groups have advantage 0, so they add nothing to the gradient's numerator, only to its normalisation:
    # means over sequences (k2, grpo, gspo, dr_grpo) scale by B / B' = 12 / 6, dapo's token mean by tokens ratio.
    scale = mask.sum() / mask[keep].sum() if name == "dapo" else 12 / 6
    assert torch.all(full_logp.grad[zero_std.repeat_interleave(3)] == 0)
    assert torch.allclose(kept_logp.grad, full_logp.grad[keep] * scale, atol=1e-6)


def test_k2_off_policy_tied_groups_still_pull_unless_filtered():
    # inner_steps > 1: logp != old_logp, so a tied response still feeds (tau * log-ratio)^2 into the loss
    adv, zero_std, mask, old = _batch(seed=1)
    logp = (old + 0.1).requires_grad_(True)
    loss, _ = LOSSES["k2"](logp, old, adv, mask, tau=0.5)
    loss.backward()
    dropped = zero_std.repeat_interleave(3)
    assert (logp.grad[dropped] * mask[dropped]).abs().sum() > 0


def test_filtering_a_real_rollout_gives_the_gradient_of_the_smaller_batch(tiny_policy):
    from rlk2.policy import load_policy
    from rlk2.rollout import Rollout, encode_prompts, generate_rollouts, left_pad, policy_logprobs

    model, tok = load_policy(tiny_policy)
    prompts = ["1+2=?", "45+67=?", "9+99=?"]
    K = 2
    ids = encode_prompts(tok, prompts, chat_template=True)
    ro = generate_rollouts(model, tok, [i for i in ids for _ in range(K)], max_new_tokens=6, seed=0)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # the middle group ties
    adv, zero_std = group_advantages(rewards, torch.ones(3, K, dtype=torch.bool), scale=False)
    adv = adv.view(-1)

    def grads(rollout, a, keep=None):  # the loop's filtering: forward on the whole batch, loss on the kept rows
        model.zero_grad()
        logp, _ = policy_logprobs(model, rollout, temperature=1.0)
        old, mask = rollout.old_logp, rollout.completion_mask.float()
        if keep is not None:
            logp, old, mask, a = logp[keep], old[keep], mask[keep], a[keep]
        loss, _ = LOSSES["k2"](logp, old, a, mask, tau=0.1)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    keep = kept_sequences(zero_std, K)
    assert keep.tolist() == [0, 1, 4, 5]
    filtered = grads(ro, adv, keep)
    # the batch with the tied group removed, packed afresh from its token lists (its own padding widths)
    rows = [0, 1, 4, 5]
    prompts_kept = [ro.prompt_ids[j][ro.prompt_mask[j].bool()].tolist() for j in rows]
    completions = [ro.completion_ids[j][ro.completion_mask[j].bool()].tolist() for j in rows]
    p_ids, p_mask = left_pad(prompts_kept, tok.pad_token_id)
    T = max(len(c) for c in completions)
    c_ids = torch.full((4, T), tok.pad_token_id, dtype=torch.long)
    c_mask = torch.zeros((4, T), dtype=torch.long)
    old = torch.zeros(4, T)
    for i, (j, c) in enumerate(zip(rows, completions)):
        c_ids[i, : len(c)], c_mask[i, : len(c)], old[i, : len(c)] = torch.tensor(c), 1, ro.old_logp[j, : len(c)]
    smaller = Rollout(p_ids, p_mask, c_ids, c_mask, old, ro.truncated[rows])
    assert torch.allclose(filtered, grads(smaller, adv[rows]), atol=1e-6)
    unfiltered = grads(ro, adv)
    assert torch.allclose(unfiltered * 6 / 4, filtered, atol=1e-5)  # the tied group only diluted the mean


# ----------------------------------------------------------------------------------------------- PTX loss
def test_ptx_rows_from_a_builtin_task():
    for source in ("max", "builtin:max"):
        rows = load_ptx_rows(source)
        assert len(rows) == 18_000 and rows[0]["completion"].startswith("\\boxed{")


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', "row 2 has no 'completion'"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 3}\n', "row 2 has no 'completion'"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": \n', "ptx.jsonl:2: malformed JSON"),
        ("", "has no rows"),
    ],
)
def test_bad_ptx_file_is_a_one_line_error(tmp_path, content, needle):
    path = tmp_path / "ptx.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        load_ptx_rows(str(path))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_ptx_source_names_the_key():
    with pytest.raises(UserError, match="algo.ptx.source: 'nope' is neither a built-in task"):
        load_ptx_rows("nope")


def test_ptx_batch_renders_prompts_like_rollouts_and_masks_only_the_completion(tiny_policy):
    from rlk2.policy import load_policy
    from rlk2.rollout import encode_prompts

    _, tok = load_policy(tiny_policy)
    rows = [{"prompt": "1+2=?", "completion": "\\boxed{3}"}, {"prompt": "45+67=?", "completion": "\\boxed{112}"}]
    batch = ptx_batch(tok, rows, chat_template=True)
    for i, row in enumerate(rows):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        assert prompt == encode_prompts(tok, [row["prompt"]], chat_template=True)[0]
        completion = batch.completion_ids[i][batch.completion_mask[i].bool()].tolist()
        assert completion[-1] == tok.eos_token_id
        assert tok.decode(completion[:-1]) == row["completion"]
        assert torch.all(batch.completion_ids[i][~batch.completion_mask[i].bool()] == tok.pad_token_id)


def test_ptx_loss_falls_when_trained_on_its_data(tiny_policy):
    from rlk2.policy import load_policy

    torch.manual_seed(0)
    model, tok = load_policy(tiny_policy)
    rows = [{"prompt": f"{a}+{a}=?", "completion": f"\\boxed{{{2 * a}}}"} for a in (3, 14, 25, 41)]
    batch = ptx_batch(tok, rows, chat_template=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = ptx_loss(model, batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0], losses
    # a random model's next-token loss starts near log(vocab): the loss is over real tokens, not padding
    assert losses[0] > 1.0


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["algo.ptx.weight=0.5"], "algo.ptx.source"),
        (["algo.ptx.weight=-1"], "algo.ptx.weight"),
        (["algo.ptx.batch_size=0", "algo.ptx.weight=1", "algo.ptx.source=max"], "algo.ptx.batch_size"),
        (["rollout.temperature_end=0"], "rollout.temperature_end"),
        (["rollout.temperature_schedule=exp"], "rollout.temperature_schedule"),
        (["rollout.temperature_decay_steps=-2"], "rollout.temperature_decay_steps"),
        (["rollout.sampling=greedy"], "rollout.sampling"),
        (["rollout.priority_floor=0"], "rollout.priority_floor"),
        (["algo.filter_zero_std=maybe"], "algo.filter_zero_std"),
    ],
)
def test_bad_control_settings_name_the_key(overrides, needle):
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)
