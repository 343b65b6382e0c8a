"""MuonClip on sharded parameters (FSDP2 DTensors): whole matrices for Newton-Schulz, work split across ranks.

Newton-Schulz needs each matrix whole; FSDP2 keeps a row slice of every parameter on each rank (`Shard(0)` over a
one-dimensional mesh). For one optimizer step (Moonlight's distributed Muon, arXiv 2502.16982 §2.3, with the
orthogonalisations spread over ranks as Dion and Megatron's layer-wise optimizer do):

1. each rank updates the momentum of its own slices (momentum state stays sharded);
2. a parameter whose slicing cuts its matrices (the sharded dim is one of the last two) is all-gathered whole;
   one whose slicing runs along a leading dim (an expert stack `[E, n, m]` split by experts) already holds whole
   matrices on each rank and is orthogonalised where it is, without communication;
3. the gathered matrices are dealt out to owner ranks (largest first, each to the least-loaded rank; the same
   deterministic order on every rank), each rank orthogonalises only the ones it owns, batched by shape;
4. each owner broadcasts its results (one flat buffer per rank), and every rank keeps its own slice of each.

A negative control in the tests orthogonalises each rank's slice alone (what a ZeRO optimizer that feeds
Newton-Schulz a partition does, DeepSpeed #7807) and must not match the one-process update.

QK-Clip's row rescaling goes through `local_rows`: the recorded head maxima are all-reduced across ranks already
(`qk_clip`), and each rank scales the rows of its own slice that fall in a clipped head.

Written here because torch's own `torch.optim.Muon` refuses DTensors and no maintained library implements
Muon over FSDP2 shards with QK-Clip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local slice (a view: writing to it writes the parameter)."""
    return t.to_local() if is_dtensor(t) else t


def _shard_dim(p: torch.Tensor) -> int | None:
    """The dim a DTensor is sharded along (None: replicated or a plain tensor); one-dimensional meshes only."""
    if not is_dtensor(p):
        return None
    if p.device_mesh.ndim != 1:
        raise ValueError(
            f"MuonClip: a parameter of shape {tuple(p.shape)} lives on a {p.device_mesh.ndim}-D device mesh; "
            "sharded parameters are supported on one-dimensional meshes (FSDP2's default) only"
        )
    (placement,) = p.placements
    return placement.dim if placement.is_shard() else None


def splits_matrices(p: torch.Tensor) -> bool:
    """Whether this rank's slice of `p` holds parts of matrices (so Newton-Schulz needs them gathered)."""
    dim = _shard_dim(p)
    return dim is not None and dim % p.ndim >= p.ndim - 2


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of `t`, the global index of its first row): rows are dim 0, as QK-Clip scales them."""
    if _shard_dim(t) != 0:
        return local(t), 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[0])


def orthogonalise(
    params: list[torch.Tensor], updates: list[torch.Tensor], ns: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """`ns` (batched Newton-Schulz) applied to every parameter's whole matrices; `updates` are this rank's slices
    (plain tensors), and so are the results. Collective when any parameter splits its matrices: every rank must
    call it with the same parameters in the same order."""
    out: list[torch.Tensor | None] = [None] * len(params)
    split = [i for i, p in enumerate(params) if splits_matrices(p)]
    whole = sorted(set(range(len(params))) - set(split))
    for i, o in zip(whole, _batched(ns, [updates[i] for i in whole])):
        out[i] = o
    if split:
        for i, o in zip(split, _orthogonalise_split([params[i] for i in split], [updates[i] for i in split], ns)):
            out[i] = o
    return out


def _batched(ns: Callable[[torch.Tensor], torch.Tensor], updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Matrices of one shape go through Newton-Schulz as one batch (per-call overhead dominates small models)."""
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        groups.setdefault((tuple(u.shape[-2:]), u.device, u.dtype), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(updates)
    for (shape, _, _), members in groups.items():
        result = ns(torch.cat([updates[i].reshape(-1, *shape) for i in members]))  # [k, n, m]
        offset = 0
        for i in members:
            count = updates[i].numel() // (shape[0] * shape[1])
            out[i] = result[offset : offset + count].view_as(updates[i])
            offset += count
    return out


def _orthogonalise_split(params, updates, ns) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor, Replicate

    mesh = params[0].device_mesh
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    fulls = [
        DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        for p, u in zip(params, updates)
    ]
    owner, load = [0] * len(params), [0] * world
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += params[i].numel()
    mine = [i for i in range(len(params)) if owner[i] == rank]
    for i, o in zip(mine, _batched(ns, [fulls[i] for i in mine])):
        fulls[i] = o
    for r in range(world):  # each owner's results in one flat buffer
        theirs = [i for i in range(len(params)) if owner[i] == r]
        if not theirs:
            continue
        flat = torch.cat([fulls[i].reshape(-1) for i in theirs]) if r == rank else None
        if flat is None:
            flat = torch.empty(sum(fulls[i].numel() for i in theirs), dtype=fulls[theirs[0]].dtype)
            flat = flat.to(fulls[theirs[0]].device)
        torch.distributed.broadcast(flat, src=torch.distributed.get_global_rank(group, r), group=group)
        offset = 0
        for i in theirs:
            n = fulls[i].numel()
            fulls[i] = flat[offset : offset + n].view_as(fulls[i])
            offset += n
    return [
        DTensor.from_local(full, p.device_mesh, [Replicate()]).redistribute(p.device_mesh, p.placements).to_local()
        for p, full in zip(params, fulls)
    ]
