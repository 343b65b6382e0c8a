"""Worker for tests/test_multiprocess.py: a few MuonClip steps on a tiny DeepSeek-V3 MoE, whole or FSDP2-sharded.

    python tests/fsdp_muonclip_worker.py reference OUT          # one process, whole parameters, the full batch
    torchrun --nproc_per_node 2 tests/fsdp_muonclip_worker.py sharded OUT      # FSDP2, each rank half the batch
    torchrun --nproc_per_node 2 tests/fsdp_muonclip_worker.py shard_only OUT   # negative control (below)

Writes the full final state dict and each step's QK-Clip metrics to OUT (rank 0). `shard_only` orthogonalises each
rank's slice of every matrix on its own, as a ZeRO optimizer that hands Newton-Schulz a partition does.
"""

import os
import sys

import torch

STEPS, BATCH, LENGTH, VOCAB = 3, 4, 16, 64


def main(mode: str, out: str) -> None:
    from transformers import DeepseekV3ForCausalLM

    from rlk2.optim import MuonClip
    from rlk2.policy import TinyMoEShape, tiny_deepseek_v3_config

    torch.manual_seed(0)
    shape = TinyMoEShape(hidden_size=32, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16)
    model = DeepseekV3ForCausalLM(tiny_deepseek_v3_config(VOCAB, shape))
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    rank, world = 0, 1
    if mode != "reference":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if mode == "shard_only":
            import rlk2.optim.sharded

            rlk2.optim.sharded.splits_matrices = lambda p: False
    optimizer = MuonClip(
        model, lr=2e-2, weight_decay=0.1, qk_clip_tau=0.01
    )  # the tiny model's logits are ~0.05: heads clip every step
    rows = tokens.chunk(world)[rank]  # equal halves: the mean of the ranks' means is the full batch's mean
    metrics = []
    for _ in range(STEPS):
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics.append(optimizer.metrics())
    state = {k: v.full_tensor() if type(v).__name__ == "DTensor" else v for k, v in model.state_dict().items()}
    sharded = sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor")
    if rank == 0:
        torch.save({"state": state, "metrics": metrics, "sharded": sharded}, out)
    if mode != "reference":
        # Leave without tearing gloo down: in the full suite a rank aborted now and then in its C++ destructors
        # after the work was done and written ("terminate called without an active exception"), which says
        # nothing about the optimizer. Every rank is past its last collective once the barrier returns.
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
