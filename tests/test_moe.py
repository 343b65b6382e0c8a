"""MoE router health (rlk2.moe): expert load statistics, DeepSeek-V3 bias balancing, aux loss, router replay."""

import math

import pytest
import torch

from rlk2.errors import UserError
from rlk2.moe import (
    RouterControl,
    RouterProbe,
    expert_counts,
    find_routers,
    load_cv,
    routing_mismatch,
    update_correction_bias,
)
from rlk2.policy import TinyMoEShape, load_policy, tiny_deepseek_v3_config
from rlk2.rollout import Rollout, concat_rollouts, encode_prompts, generate_rollouts, policy_logprobs
from rlk2.testing import skew_routers

VOCAB = 64


def tiny_model(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "deepseek_v3":
        shape = TinyMoEShape(hidden_size=32, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=16)
        return tf.DeepseekV3ForCausalLM(tiny_deepseek_v3_config(VOCAB, shape))
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    if family == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(**common, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2)
        )
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2))
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common))  # dense


def fake_rollout(B: int = 3, P: int = 5, T: int = 4, seed: int = 0) -> Rollout:
    """Random tokens with left-padded prompts and right-padded completions (row 0 padded on both sides)."""
    g = torch.Generator().manual_seed(seed)
    pm, cm = torch.ones(B, P, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    pm[0, :2] = 0
    cm[0, 2:] = 0
    return Rollout(
        torch.randint(0, VOCAB, (B, P), generator=g) * pm,
        pm,
        torch.randint(0, VOCAB, (B, T), generator=g) * cm,
        cm,
        torch.zeros(B, T),
        torch.zeros(B, dtype=torch.bool),
    )


# ------------------------------------------------------------------------------------------- statistics
def test_expert_counts_and_load_cv_worked_example():
    # E = 4, k = 2. Rows [0,1], [0,1], [2,3] are real, the last row is padding.
    # counts = [2, 2, 1, 1] -> load = [1/3, 1/3, 1/6, 1/6]; mean 1/4; deviations +-1/12 -> std 1/12; cv = 1/3.
    idx = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1]])
    counts = expert_counts(idx, torch.tensor([1, 1, 1, 0]), 4)
    assert counts.tolist() == [2, 2, 1, 1]
    assert load_cv(counts).item() == pytest.approx(1 / 3)
    # Every token on the same 2 of 4 experts: load [.5, .5, 0, 0], cv = sqrt(E/k - 1) = 1. Uniform: 0.
    assert load_cv(torch.tensor([5.0, 5.0, 0, 0])).item() == pytest.approx(math.sqrt(4 / 2 - 1))
    assert load_cv(torch.tensor([3.0, 3.0, 3.0, 3.0])).item() == 0.0


def test_bias_update_is_sign_of_underload():
    # counts [3, 1, 0, 0]: load [.75, .25, 0, 0], mean .25 -> sign(mean - load) = [-1, 0, +1, +1].
    bias = torch.tensor([0.5, 0.5, 0.5, 0.5])
    update_correction_bias(bias, torch.tensor([3.0, 1.0, 0.0, 0.0]), 0.01)
    assert bias.tolist() == pytest.approx([0.49, 0.5, 0.51, 0.51])


def test_mismatch_compares_sets_not_order_and_skips_masked_rows():
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [3, 1], [0, 7]])
    assert routing_mismatch(a, b, torch.tensor([1, 1, 0])) == (1, 2)  # row 0 same set, row 1 differs, row 2 masked


# ------------------------------------------------------------------------------------------- router discovery
@pytest.mark.parametrize(
    "family,layers", [("deepseek_v3", [1, 2]), ("qwen3_moe", [0, 1]), ("mixtral", [0, 1]), ("dense", [])]
)
def test_find_routers(family, layers):
    assert [i for i, _ in find_routers(tiny_model(family))] == layers  # DeepSeek-V3's first layer is dense


def test_dense_policy_is_a_no_op():
    model = tiny_model("dense")
    ctl = RouterControl(model, router_replay=True, bias_update_rate=1e-3, aux_loss_coef=0.1)
    assert not ctl.enabled
    with ctl.training_forward(fake_rollout()) as routed:
        policy_logprobs(model, fake_rollout(), temperature=1.0)
    assert routed.metrics() == {} and routed.aux_loss == 0.0
    ctl.update_bias(routed)


# ------------------------------------------------------------------------------------------- replay mechanics
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_forcing_a_routers_own_choice_changes_nothing_and_forced_experts_get_router_gradient(family):
    routers = find_routers(tiny_model(family))
    _, router = routers[0]
    if family == "deepseek_v3":
        router.routed_scaling_factor = 2.5  # exercise the scaling in the recomputed weights
        router.e_score_correction_bias.normal_()  # the bias moves the choice but not the weights
    hidden = torch.randn(10, router.weight.shape[1])
    logits, weights, idx = router(hidden)
    with RouterProbe(routers[:1], force=idx.unsqueeze(0)) as probe:
        _, w2, idx2 = router(hidden)
    assert torch.equal(idx2, idx) and torch.equal(probe.take()[0], idx)
    torch.testing.assert_close(w2, weights, rtol=1e-6, atol=1e-7)

    forced = (idx + 1) % router.num_experts  # another expert set for every token; -1 row keeps its own choice
    forced[3] = -1
    router.weight.grad = None
    with RouterProbe(routers[:1], force=forced.unsqueeze(0)) as probe:
        _, w3, idx3 = router(hidden)
        (w3 * torch.arange(w3.numel()).view_as(w3)).sum().backward()
    expect = forced.clone()
    expect[3] = idx[3]
    assert torch.equal(idx3, expect) and torch.equal(probe.own[0], idx)
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_forced_routing_of_the_wrong_shape_is_an_error():
    routers = find_routers(tiny_model("qwen3_moe"))
    _, router = routers[0]
    with RouterProbe(routers[:1], force=torch.zeros(1, 5, 2, dtype=torch.long)), pytest.raises(ValueError):
        router(torch.randn(4, router.weight.shape[1]))


# ------------------------------------------------------------------------------------------- recording in rollouts
def _rollout(tiny_policy, n: int = 12, record: bool = True):
    model, tok = load_policy(tiny_policy)
    prompts = ["1+2=?", "45+67=?", "9+99=?", "123+4=?"] * (n // 4)  # different lengths -> left padding
    ids = encode_prompts(tok, prompts, chat_template=True)
    return model, tok, generate_rollouts(model, tok, ids, max_new_tokens=12, seed=5, record_routing=record)


def test_recorded_routing_covers_fed_tokens_only(tiny_policy):
    model, tok, ro = _rollout(tiny_policy)
    routes = ro.routed_experts  # [L, B, P+T, k]
    L = len(find_routers(model))
    assert routes.shape == (L, *ro.prompt_ids.shape[:1], ro.prompt_ids.shape[1] + ro.completion_ids.shape[1], 2)
    has = (routes >= 0).all(dim=-1)  # [L, B, S]
    assert torch.equal(has, (routes >= 0).any(dim=-1))  # a token's record is all k experts or nothing
    P = ro.prompt_ids.shape[1]
    assert torch.equal(has[:, :, :P], ro.prompt_mask.bool().expand(L, -1, -1))  # left padding never recorded
    # Completion tokens were fed back except each sequence's last one (EOS, or the budget's last token).
    fed = ro.completion_mask.clone()
    fed[torch.arange(fed.shape[0]), ro.num_tokens - 1] = 0
    assert torch.equal(has[:, :, P:], fed.bool().expand(L, -1, -1))
    assert generate_rollouts(model, tok, [[1, 2]], max_new_tokens=2).routed_experts is None  # off by default


def test_recorded_routing_is_what_a_full_forward_chooses(tiny_policy):
    # Same weights: the training forward (no cache, whole batch) routes every recorded token as generation did.
    model, _, ro = _rollout(tiny_policy)
    ctl = RouterControl(model, router_replay=False, bias_update_rate=0, aux_loss_coef=0)
    with ctl.training_forward(ro) as routed:
        policy_logprobs(model, ro, temperature=1.0)
    assert routed.metrics()["moe/router_mismatch"] == 0.0
    assert routed.mismatch[1] > 0


def test_concat_keeps_each_tokens_routing(tiny_policy):
    model, tok, a = _rollout(tiny_policy, n=4)
    b = generate_rollouts(model, tok, [[5, 6, 7, 8, 9, 10, 11, 12, 13]], max_new_tokens=3, seed=1, record_routing=True)
    joined = concat_rollouts([a, b], tok.pad_token_id)
    for part, rows in ((a, slice(0, 4)), (b, slice(4, 5))):
        P, T = part.prompt_ids.shape[1], part.completion_ids.shape[1]
        Pj = joined.prompt_ids.shape[1]
        got = joined.routed_experts[:, rows]
        assert torch.equal(got[:, :, Pj - P : Pj], part.routed_experts[:, :, :P])
        assert torch.equal(got[:, :, Pj : Pj + T], part.routed_experts[:, :, P:])
        assert (got[:, :, : Pj - P] == -1).all() and (got[:, :, Pj + T :] == -1).all()


# ------------------------------------------------------------------------------------------- replay in training
def _experts_inputs(model):
    """Forward pre-hooks on every MoE layer's experts module: the top-k indices the experts really computed with."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if name.endswith("mlp.experts"):
            handles.append(mod.register_forward_pre_hook(lambda m, args, n=name: seen.__setitem__(n, args[1])))
    return seen, handles


@pytest.mark.parametrize("replay", [True, False])
def test_replay_forces_recorded_experts_after_the_router_moved(tiny_policy, replay):
    model, _, ro = _rollout(tiny_policy)
    torch.manual_seed(1)
    with torch.no_grad():  # move the router between sampling and training so its own choice differs
        for _, router in find_routers(model):
            router.weight.add_(0.5 * router.weight.std() * torch.randn_like(router.weight))
    ctl = RouterControl(model, router_replay=replay, bias_update_rate=0, aux_loss_coef=0)
    seen, handles = _experts_inputs(model)
    with ctl.training_forward(ro) as routed:
        logp, _ = policy_logprobs(model, ro, temperature=1.0)
    for h in handles:
        h.remove()
    used = torch.stack([seen[k] for k in sorted(seen)])  # [L, B*S, k], the experts that ran
    rec = ro.routed_experts.flatten(1, 2).long()
    has = (rec >= 0).all(dim=-1)
    differ, compared = routing_mismatch(used, rec, has)
    mismatch = routed.metrics()["moe/router_mismatch"]
    assert mismatch > 0.05  # the moved router disagrees with the recording on many token-layers
    if replay:
        assert differ == 0  # exactly the recorded experts ran
        assert torch.equal(used[has], rec[has])
        logp.sum().backward()  # and the router still learns through the recomputed gate weights
        assert all(r.weight.grad.abs().sum() > 0 for _, r in find_routers(model))
    else:
        assert differ / compared == pytest.approx(mismatch)  # the logged rate is the routing that ran


def test_replay_with_unchanged_weights_gives_the_same_logprobs(tiny_policy):
    model, _, ro = _rollout(tiny_policy)
    plain, _ = policy_logprobs(model, ro, temperature=1.0)
    with RouterControl(model, router_replay=True, bias_update_rate=0, aux_loss_coef=0).training_forward(ro):
        replayed, _ = policy_logprobs(model, ro, temperature=1.0)
    torch.testing.assert_close(replayed, plain, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- balancing
def test_bias_updates_rebalance_a_skewed_deepseek_router():
    model = tiny_model("deepseek_v3")
    ro = fake_rollout(B=8, P=12, T=12, seed=3)
    skew_routers(model, ro)
    ctl = RouterControl(model, router_replay=False, bias_update_rate=0.01, aux_loss_coef=0)
    cvs = []
    for _ in range(60):
        with torch.no_grad(), ctl.training_forward(ro) as routed:
            policy_logprobs(model, ro, temperature=1.0)
        cvs.append(routed.metrics()["moe/expert_load_cv"])
        ctl.update_bias(routed)
    # Skewed: most slots on experts 0 and 1 (cv near the all-on-two bound sqrt(8/2 - 1) = 1.73).
    assert cvs[0] > 1.0, cvs[0]
    assert min(cvs[-10:]) < 0.5 * cvs[0], (cvs[0], cvs[-10:])
    # The bias pushed the favoured experts down and the others up.
    bias = find_routers(model)[0][1].e_score_correction_bias
    assert bias[:2].max() < 0 < bias[2:].min()


def test_zero_rate_leaves_the_bias_alone():
    model = tiny_model("deepseek_v3")
    ctl = RouterControl(model, router_replay=False, bias_update_rate=0.0, aux_loss_coef=0)
    with ctl.training_forward(fake_rollout()) as routed:
        policy_logprobs(model, fake_rollout(), temperature=1.0)
    ctl.update_bias(routed)
    assert all((r.e_score_correction_bias == 0).all() for _, r in find_routers(model))


# ------------------------------------------------------------------------------------------- aux loss
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_aux_loss_uses_transformers_and_reaches_the_router(family):
    model = tiny_model(family)
    ro = fake_rollout()
    off = RouterControl(model, router_replay=True, bias_update_rate=0, aux_loss_coef=0)
    with off.training_forward(ro) as routed:
        policy_logprobs(model, ro, temperature=1.0)
    assert routed.aux_loss == 0.0 and "moe/aux_loss" not in routed.metrics()

    on = RouterControl(model, router_replay=True, bias_update_rate=0, aux_loss_coef=0.1)
    with on.training_forward(ro) as routed:
        policy_logprobs(model, ro, temperature=1.0)
    # Switch loss E * sum_i f_i P_i is >= k-ish and positive; 0.1 of it is what the loop adds to the loss.
    assert routed.metrics()["moe/aux_loss"] > 0
    model.zero_grad()
    routed.aux_loss.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for _, r in find_routers(model))


def test_aux_loss_on_deepseek_is_a_user_error():
    with pytest.raises(UserError, match="moe.aux_loss_coef"):
        RouterControl(tiny_model("deepseek_v3"), router_replay=True, bias_update_rate=0, aux_loss_coef=0.1)


@pytest.mark.parametrize("override", ["moe.bias_update_rate=-0.1", "moe.aux_loss_coef=-1"])
def test_negative_rates_are_rejected_naming_the_key(override):
    from rlk2.config import load_config

    with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])
