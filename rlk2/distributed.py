"""Data parallelism for `rlk2 train`: N processes under `accelerate launch` take the same steps as one process.

With the same seed and the same global batch (`rollout.prompts_per_step` prompts x K responses), a run on N
processes logs the same metrics and ends with the same weights as a run on one, up to float rounding. How:

- every rank draws the same global list of prompts (the sampler is seeded and identical on every rank), orders it
  as one process would (by task), and keeps a contiguous slice of whole groups: a prompt's K responses stay on one
  rank, because its advantages need all K rewards;
- each response is sampled with its own seed, a function of (step, global group index, sample index) only
  (`rlk2.rollout` counter-based noise), so a group draws the same completions whichever rank samples it;
- completions are right-padded to the global width: `dr_grpo` divides by that width, and QK-Clip records the
  padded positions as one process would;
- DDP averages gradients over ranks. A loss that is a mean over sequences, computed on equal slices, averages to
  the one-process loss as it is; a loss that is one mean over all tokens (`dapo`) does not, so each rank's loss is
  multiplied by N * local_units / global_units (`loss_scale`) before backward;
- every logged number (loss, rewards, lengths, entropy, KL, ...) is computed from the gathered global batch;
  QK-Clip all-reduces its per-head maxima itself, and the gradient norm is read after DDP's all-reduce;
- only the main process writes files; evaluation is shared: each process generates and scores every N-th batch of
  the held-out prompts (the batches and seeds of one process) and the results are gathered, so the numbers are
  the one-process numbers (rlk2.eval.evaluate.Split).

DDP needs `find_unused_parameters=True`: an MoE expert that no token of a rank's slice was routed to gets no
gradient on that rank. FSDP2 launches shard the policy instead of replicating it (rlk2.sharding); the rest of the
above holds unchanged, FSDP2's reduce-scatter averaging gradients as DDP's all-reduce does. DeepSpeed and
Megatron launches are refused at start-up with a one-line error.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object

from rlk2.errors import UserError
from rlk2.rollout import Rollout

# What each loss of rlk2.algorithms.LOSSES averages over: "sequence" (a mean over the B responses; per-sequence
# token means or sums inside) or "token" (one mean over every unmasked token of the batch).
LOSS_UNIT: dict[str, str] = {
    "k2": "sequence",
    "grpo": "sequence",
    "dr_grpo": "sequence",
    "dapo": "token",
    "gspo": "sequence",
}

_REFUSED = ("DEEPSPEED", "MEGATRON_LM")  # FSDP2: rlk2.sharding


def ddp_kwargs() -> list:
    """Accelerate kwargs handlers: DDP that tolerates parameters without a gradient on a rank (MoE experts no token
    of its slice was routed to), and a process-group timeout long enough for the others to wait while the main
    process evaluates or saves a large model alone (the default is 10 minutes for NCCL)."""
    return [
        DistributedDataParallelKwargs(find_unused_parameters=True),
        InitProcessGroupKwargs(timeout=timedelta(hours=2)),
    ]


def cpu_only_launch() -> bool:
    """True when a launcher started several processes on a machine without GPUs (or other accelerators).

    Accelerate then needs `cpu=True` to join them with gloo; without it each process runs alone (and they all write
    the same run directory). `accelerate launch --cpu` starts a single process unless MPI is set up, so several
    CPU processes come from its torchrun path (`--multi_gpu`, configs/accelerate/cpu_2proc.yaml) or torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def check_launch(
    *, distributed_type: str, num_processes: int, prompts_per_step: int, optimizer: str, loss: str
) -> None:
    """Refuse, in one line, the launches the loop cannot run exactly (before anything is written)."""
    kind = str(getattr(distributed_type, "value", distributed_type)).upper()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise UserError(
            f"{launched} processes were launched but Accelerate joined {num_processes} "
            f"({kind}); each would run alone and write the same run directory"
        )
    if kind in _REFUSED:
        if optimizer == "muonclip":
            raise UserError(
                f"optim.name=muonclip: parameters sharded by {kind} are not supported (Newton-Schulz needs "
                "whole matrices); supported: a single process, DDP or FSDP2 (configs/accelerate/fsdp2.yaml)"
            )
        raise UserError(
            f"rlk2 train: {kind} launches are not supported; supported: a single process, DDP "
            "(configs/accelerate/ddp.yaml) or FSDP2 (configs/accelerate/fsdp2.yaml)"
        )
    if loss not in LOSS_UNIT:
        raise UserError(f"algo.loss: '{loss}' does not say what it averages over (rlk2.distributed.LOSS_UNIT)")
    if prompts_per_step % num_processes:
        raise UserError(
            f"rollout.prompts_per_step: {prompts_per_step} does not split into whole groups over "
            f"{num_processes} processes (use a multiple of {num_processes})"
        )


def local_groups(
    picked: list[tuple[str, dict]], task_order: list[str], *, rank: int, world: int
) -> tuple[list[tuple[str, dict]], int]:
    """This rank's contiguous slice of the step's prompt groups, in the one-process order (by task, then draw).

    Returns (the slice, the global index of its first group)."""
    ordered = sorted(picked, key=lambda item: task_order.index(item[0]))  # stable: draw order within a task
    per_rank = len(ordered) // world
    first = rank * per_rank
    return ordered[first : first + per_rank], first


def sequence_seeds(step_seed: int, first_group: int, groups: int, group_size: int) -> list[int]:
    """One sampling seed per response: a hash of (step seed, global group index, sample index), so the same group
    gets the same seeds on any rank and in any batch."""
    out = []
    for g in range(first_group, first_group + groups):
        for k in range(group_size):
            digest = hashlib.blake2b(f"{step_seed}/{g}/{k}".encode(), digest_size=8).digest()
            out.append(int.from_bytes(digest, "little"))
    return out


def pad_to_global_width(accelerator, ro: Rollout, pad_id: int) -> Rollout:
    """Right-pad the completions to the widest completion of any rank (what one process's batch would have)."""
    if accelerator.num_processes == 1:
        return ro
    width = int(accelerator.gather(torch.tensor([ro.completion_ids.shape[1]], device=accelerator.device)).max())
    extra = width - ro.completion_ids.shape[1]
    if extra:
        ro.completion_ids = F.pad(ro.completion_ids, (0, extra), value=pad_id)
        ro.completion_mask = F.pad(ro.completion_mask, (0, extra), value=0)
        ro.old_logp = F.pad(ro.old_logp, (0, extra), value=0.0)
        if ro.entropy is not None:
            ro.entropy = F.pad(ro.entropy, (0, extra), value=0.0)
        if ro.loss_mask is not None:
            ro.loss_mask = F.pad(ro.loss_mask, (0, extra), value=0)
        if ro.routed_experts is not None:  # [L, B, P+T, k]: padding positions have no recorded routing (-1)
            ro.routed_experts = F.pad(ro.routed_experts, (0, 0, 0, extra), value=-1)
    return ro


def loss_scale(accelerator, loss: str, mask: torch.Tensor) -> float:
    """Factor for this rank's loss so that DDP's average over ranks of the gradients is the one-process gradient.

    The one-process loss is sum(l) / U over U global units (sequences or tokens); rank r computes sum_r(l) / U_r and
    DDP divides the sum over ranks by N, so rank r's loss is scaled by N * U_r / U. Exactly 1.0 on one process."""
    if accelerator.num_processes == 1:
        return 1.0
    units = mask.sum() if LOSS_UNIT[loss] == "token" else torch.tensor(float(mask.shape[0]), device=mask.device)
    total = accelerator.gather(units.detach().float().reshape(1)).sum()
    return float(accelerator.num_processes * units / total.clamp(min=1.0))


def global_loss(
    accelerator,
    loss_fn,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    hp: dict,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss and its metrics over the global batch (gathered, no gradient): what one process would log.
    `rows` (indices into this rank's batch, e.g. the groups kept by zero-std filtering) restricts it to those rows."""
    with torch.no_grad():
        tensors = [accelerator.gather(t.detach().contiguous()) for t in (logp, old_logp, adv, mask)]
        if rows is not None:  # gather a 0/1 selector (same shape on every rank), then cut
            selected = torch.zeros(logp.shape[0], dtype=torch.long, device=logp.device)
            selected[rows] = 1
            picked = accelerator.gather(selected).bool()
            tensors = [t[picked] for t in tensors]
        return loss_fn(*tensors, **hp)


def gather_step(
    accelerator,
    *,
    ro: Rollout,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    adv: torch.Tensor,
    zero_std: torch.Tensor,
    totals: list,
    per_reward: dict[str, list],
    errors: dict[str, int],
    rows: list[dict],
    task_of_group: list[str],
) -> tuple:
    """Everything the log section reads, over the global batch, in the same order one process would hold it.

    The returned Rollout carries the completions, masks and texts (its prompt tensors are empty: not logged)."""

    def cat(t: torch.Tensor) -> torch.Tensor:
        return accelerator.gather(t.contiguous())

    trunc = cat(ro.truncated.long()).bool()  # gloo does not all-gather bool tensors
    empty = torch.zeros((trunc.shape[0], 0), dtype=torch.long, device=trunc.device)
    whole = Rollout(
        empty,
        empty,
        cat(ro.completion_ids),
        cat(ro.completion_mask),
        cat(ro.old_logp),
        trunc,
        gather_object(list(ro.texts)),
        loss_mask=cat(ro.policy_mask),
    )
    # Rank slices may hold different tasks, hence different reward names: align them as one process does.
    parts = gather_object([(per_reward, len(totals), errors)])
    names = list(dict.fromkeys(name for part, _, _ in parts for name in part))
    rewards_all = {name: [v for part, n, _ in parts for v in part.get(name, [None] * n)] for name in names}
    errors_all: dict[str, int] = {}
    for _, _, errs in parts:
        for name, count in errs.items():
            errors_all[name] = errors_all.get(name, 0) + count
    return (
        whole,
        cat(entropy),
        cat(mask),
        cat(adv),
        cat(zero_std.long()).bool(),
        gather_object(list(totals)),
        rewards_all,
        errors_all,
        gather_object(list(rows)),
        gather_object(list(task_of_group)),
    )


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a stop signal may reach only some ranks: they must agree)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), reduction="sum").item())


# ----------------------------------------------------------------------------------------------- one process
_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _alone(fn, args: tuple, kwargs: dict) -> None:
    for name in list(os.environ):
        if name in _LAUNCHER_VARS or name.startswith(("ACCELERATE_", "TORCHELASTIC_", "FSDP_")):
            del os.environ[name]
    fn(*args, **kwargs)


def run_alone(num_processes: int, fn, *args, **kwargs) -> None:
    """Run `fn` on this process only. Under a multi-process launch it runs in a fresh child process that does not
    see the launcher's environment: a library that sets up its own Accelerate state (TRL's SFTTrainer in the warm
    start) would otherwise join the job's process group and wait for ranks that never come."""
    if num_processes == 1:
        fn(*args, **kwargs)
        return
    child = multiprocessing.get_context("spawn").Process(target=_alone, args=(fn, args, kwargs))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its own process (exit code {child.exitcode})")
