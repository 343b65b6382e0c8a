"""FSDP2 for `rlk2 train`: each rank keeps a slice of every weight, gradient and optimizer state.

Launched through Accelerate with an FSDP config of `fsdp_version: 2` (configs/accelerate/fsdp2.yaml on GPUs,
configs/accelerate/cpu_2proc_fsdp2.yaml on CPUs). rlk2 applies torch's `fully_shard` itself, with the launch file's
settings (reshard after forward, mixed precision, CPU offload), before it builds the optimizer, so:

- the same code shards on GPUs and on CPUs: Accelerate's FSDP mode exists for accelerators only (on a CPU-only
  launch it joins the processes as MULTI_CPU), so what runs in the CPU tests is what runs on a cluster;
- MuonClip is built over the sharded parameters it will step (rlk2.optim.sharded), not over whole ones swapped
  afterwards.

Decoder layers are the sharding unit (one all-gather per layer in the training forward), the model itself the root
(embeddings, final norm, head). Three phases need whole weights, and get them from `whole_weights`, which gathers
every layer once and keeps it whole until the block ends:

- rollouts: every rank samples its own groups with its plain-function decoder (rlk2.rollout), thousands of decode
  steps with no collective in between. Gathering layer by layer at every decode step instead (what keeps memory at
  one layer) would cost an all-gather per layer per token, and make every rank run as many steps as the slowest;
  peers that sample from an inference engine hold whole weights there too (verl, TRL's vLLM colocate mode);
- evaluation: every process evaluates a share of the batches, as under DDP;
- checkpoints: the gathered full state dict is written as an ordinary HF checkpoint (`from_pretrained` loads it),
  and each rank writes its own optimizer shard next to it (`optimizer-rank<r>.pt`) for an exact resume on the same
  number of processes.

Gradients and optimizer state, which dominate training memory (AdamW keeps two more copies, MuonClip one), stay
sharded throughout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rlk2.errors import UserError
from rlk2.optim.sharded import is_dtensor, local


def fsdp_plugin(accelerator):
    """The launch's FSDP settings (Accelerate's plugin) when it asked for FSDP, else None; FSDP1 is refused.

    On accelerators Accelerate made the plugin; on a CPU-only launch it joined the processes as MULTI_CPU and dropped
    it, so the plugin is rebuilt from the same `FSDP_*` variables `accelerate launch` exported."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.num_processes > 1:
        plugin = FullyShardedDataParallelPlugin()
    else:
        return None
    if plugin.fsdp_version != 2:
        raise UserError(
            f"fsdp_config.fsdp_version: {plugin.fsdp_version} is not supported; rlk2 train shards with FSDP2 "
            "(fsdp_version: 2, configs/accelerate/fsdp2.yaml)"
        )
    return plugin


def shard_policy(model: nn.Module, plugin, device: torch.device) -> int:
    """`fully_shard` every decoder layer, then the model; returns how many layers. In place (FSDP2 swaps each
    parameter for a DTensor holding this rank's rows)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": plugin.cpu_offload,
    }
    if not isinstance(kwargs["mp_policy"], MixedPrecisionPolicy):  # an FSDP1-style policy object
        kwargs["mp_policy"] = MixedPrecisionPolicy()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"FSDP2: {type(model).__name__} has no model.layers to shard by decoder layer")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    # MoE: an expert that no token of this rank's sequences reached has no gradient here, but may have one on
    # another rank. FSDP2 reduce-scatters only the gradients a rank has, so ranks that disagree on that set would
    # reduce mismatched buffers. Zeros go in for unused parameters (DDP's find_unused_parameters), and
    # `drop_unused_grads` then clears the gradients no rank produced. (transformers 5's DeepSeek-V3 keeps each
    # layer's experts in one stacked parameter, which every rank uses; models with one module per expert do not.)
    model.set_reduce_scatter_unused_params(True)
    return len(layers)


def drop_unused_grads(model: nn.Module) -> int:
    """After a backward on a sharded model: the gradient of every parameter that no rank used (an MoE expert no
    token reached anywhere) is reset to None, as on one process, so the optimizer leaves it and its state alone
    instead of stepping it on a zero gradient. Collective; returns how many were reset. A parameter that was used
    has an exactly-zero gradient everywhere only by accident."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0
    peaks = torch.stack([_peak(local(p.grad)) for p in params])
    torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    unused = [p for p, peak in zip(params, peaks.tolist()) if peak == 0.0]
    for p in unused:
        p.grad = None
    return len(unused)


def _peak(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().amax().float() if t.numel() else torch.zeros((), device=t.device)


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole_weights(model: nn.Module) -> Iterator[None]:
    """Within the block every parameter of a sharded model is whole on every rank (a no-op for an unsharded one).

    Collective on entry (every rank must enter); inside, forwards and direct reads of `module.weight` see plain
    full tensors and no forward communicates, so ranks may run different numbers of them."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    for m in modules:
        m.unshard()
    # A forward inside must not reshard behind the decoder's back. What fully_shard chose (the root stays whole
    # after its forward, the layers reshard) is kept on FSDP's state and put back as it was.
    states = [m._get_fsdp_state() for m in modules]  # noqa: SLF001 - the settings set_reshard_after_forward changes
    before = [(s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups]) for s in states]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        for s, (auto, infos) in zip(states, before):
            s._auto_reshard_after_forward = auto
            for g, info in zip(s._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on the main process (on CPU), None elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if torch.distributed.get_rank() == 0 else None


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of gradients, some of which may be DTensor shards (the norm of the whole gradients)."""
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if is_dtensor(norm) else norm


def clip_grads(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients (plain tensors or DTensor shards) so their global norm is at most `max_norm`, given the
    norm just computed (torch's `clip_grads_with_norm_` takes the parameters, not their gradients: handed the
    gradients, it finds no `.grad` on them and clips nothing, which is what the loop did before)."""
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


# ------------------------------------------------------------------------------------------------ optimizer shards
def shard_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"optimizer-rank{rank}.pt"


def local_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with each DTensor replaced by its local slice (loadable without the mesh) and the
    places where they were recorded, so `load_local_optimizer_state` makes them DTensors again."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copied, not written to
    dtensors, slices = [], {}
    for index, entry in state["state"].items():
        slices[index] = {key: value.to_local() if is_dtensor(value) else value for key, value in entry.items()}
        dtensors += [(index, key) for key, value in entry.items() if is_dtensor(value)]
    return {**state, "state": slices, "dtensors": dtensors}


def load_local_optimizer_state(optimizer, state: dict) -> None:
    from torch.distributed.tensor import DTensor

    dtensors = state.pop("dtensors", [])
    state.pop("ranks", None)
    optimizer.load_state_dict(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, key in dtensors:
        p = params[index]
        entry = optimizer.state[p]
        entry[key] = DTensor.from_local(
            entry[key], p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
