"""rlk2.sharding on a one-process gloo group: FSDP2 shards a model even over one rank (every parameter becomes a
DTensor), which is enough to check the gathering, state and decoder plumbing without launching processes. The
two-process runs against one process are in tests/test_multiprocess.py (slow tier)."""

import copy

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from rlk2.optim.sharded import is_dtensor
from rlk2.rollout.dense import DenseDecoder, family
from rlk2.sharding import (
    clip_grads,
    drop_unused_grads,
    grad_norm,
    load_local_optimizer_state,
    local_optimizer_state,
    shard_policy,
    whole_weights,
)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _plugin():
    from types import SimpleNamespace

    return SimpleNamespace(reshard_after_forward=True, mixed_precision_policy=None, cpu_offload=None)


def _pair():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    whole = LlamaForCausalLM(cfg)
    sharded = copy.deepcopy(whole)
    assert shard_policy(sharded, _plugin(), torch.device("cpu")) == 2
    return whole, sharded


def test_whole_weights_gathers_for_the_block_and_shards_again(group):
    whole, sharded = _pair()
    assert all(is_dtensor(p) for p in sharded.parameters())
    assert type(sharded).__name__ == "FSDPLlamaForCausalLM" and family(sharded) == "LlamaForCausalLM"
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with whole_weights(sharded):
        assert not any(is_dtensor(p) for p in sharded.parameters())  # plain tensors a decoder can read
        assert DenseDecoder.supports(sharded)  # the fast decoder takes the sharded model (its class is renamed)
        with torch.no_grad():
            inside = [sharded(input_ids=ids).logits for _ in range(2)]  # forwards do not reshard inside
        assert not any(is_dtensor(p) for p in sharded.parameters())
    assert all(is_dtensor(p) for p in sharded.parameters())
    with torch.no_grad():
        ref = whole(input_ids=ids).logits
    for logits in inside:
        torch.testing.assert_close(logits, ref)
    # after the block, training works as before: resharding after forward is back on for the layers
    loss = sharded(input_ids=ids, labels=ids).loss
    loss.backward()
    whole(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in sharded.parameters()]
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in whole.parameters()])
    torch.testing.assert_close(grad_norm(grads), ref_norm)
    norm = grad_norm(grads)
    clip_grads(grads, float(norm) / 2, norm)
    torch.testing.assert_close(grad_norm(grads), norm / 2, rtol=1e-4, atol=0)


def test_optimizer_slices_round_trip_without_touching_the_live_state(group):
    _, sharded = _pair()
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    sharded(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    saved = local_optimizer_state(opt)
    assert saved["dtensors"], "nothing was a DTensor: the round trip would be vacuous"
    live = next(iter(opt.state.values()))
    assert is_dtensor(live["exp_avg"])  # saving copied the slices: the optimizer's own state is unchanged
    assert not any(is_dtensor(v) for entry in saved["state"].values() for v in entry.values())
    fresh = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    load_local_optimizer_state(fresh, dict(saved))
    for p in sharded.parameters():
        a, b = opt.state[p], fresh.state[p]
        assert is_dtensor(b["exp_avg"]) and is_dtensor(b["exp_avg_sq"])
        torch.testing.assert_close(b["exp_avg"].to_local(), a["exp_avg"].to_local())
    # and the restored optimizer steps (a plain tensor where a DTensor belongs would raise here)
    sharded(input_ids=ids, labels=ids).loss.backward()
    fresh.step()


class _Block(torch.nn.Module):
    """A decoder layer whose forward uses `a` only: `b` is an expert no token reached."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x)


class _OneLayer(torch.nn.Module):
    """`model.layers` as shard_policy expects."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Block()])

    def forward(self, x):
        return self.model.layers[0](x)


def test_a_parameter_no_rank_used_has_no_gradient_as_on_one_process(group):
    model = _OneLayer()
    shard_policy(model, _plugin(), torch.device("cpu"))
    model(torch.ones(2, 4)).sum().backward()
    used, unused = model.model.layers[0].a, model.model.layers[0].b
    # FSDP2 reduce-scattered a zero gradient for the unused expert (ranks must agree on what they reduce) ...
    assert all(p.grad is not None and not p.grad.to_local().any() for p in unused.parameters())
    assert drop_unused_grads(model) == 2
    # ... which is cleared, so an optimizer skips it as it would on one process; the used one keeps its own
    assert all(p.grad is None for p in unused.parameters())
    assert all(p.grad is not None and p.grad.to_local().any() for p in used.parameters())


def test_a_missing_optimizer_slice_is_one_line_on_resume(tmp_path, monkeypatch):
    from rlk2.errors import UserError
    from rlk2.run_dir import RunDir

    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    state = {"optimizer": {"state": {}, "param_groups": [], "ranks": 2}, "scheduler": {}, "rng": None, "step": 3}
    with pytest.raises(UserError, match=r"optimizer-rank1.pt \(rank 1's optimizer slice\) does not load") as err:
        RunDir.restore(state, optimizer=None, scheduler=None, samplers={}, sharded_from=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="sharded over 2 processes; this launch has 4"):
        monkeypatch.setattr(dist, "get_world_size", lambda: 4)
        RunDir.restore(state, optimizer=None, scheduler=None, samplers={}, sharded_from=tmp_path)
