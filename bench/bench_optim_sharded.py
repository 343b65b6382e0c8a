"""MuonClip on FSDP2 shards: per-rank memory of parameters + gradients + optimizer state against DDP, and the
optimizer step's time on 2 processes against 1, on a model where those tensors dominate.

The model: a Llama of 8 layers, hidden 512, MLP 1536, vocabulary 8,192 (~38 M parameters, 150 MB in float32),
random weights and one batch of random tokens. Three launches, each its own set of processes (gloo, CPU, one
thread per process):
- `single`: one process, whole parameters;
- `ddp`: two processes, `DistributedDataParallel` (every rank holds everything);
- `fsdp`: two processes, `fully_shard` on every decoder layer and the root.
Memory is measured on the live objects after two steps: the bytes of every parameter's local tensor, of every
gradient's, and of every tensor in the optimizer state, on rank 0 (`ratio` = FSDP2 / DDP; target <= 0.6). The step
time is the median of `reps` `optimizer.step()` calls after a backward, rank 0's clock after a barrier (target:
2-process FSDP2 no slower than 1 process, because Newton-Schulz work is split between the ranks).

    python bench/bench_optim_sharded.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tensor_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if type(t).__name__ == "DTensor" else t
            total += t.numel() * t.element_size()
    return total


def worker(mode: str, reps: int, out: str) -> None:
    """One process of a launch (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlk2.optim import MuonClip

    torch.set_num_threads(1)
    distributed = mode != "single"
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = MuonClip(model, lr=1e-3, qk_clip_tau=100.0)
    tokens = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(rank))
    times = []
    for i in range(reps + 1):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        if distributed:
            torch.distributed.barrier()
        start = time.perf_counter()
        optimizer.step()
        if distributed:
            torch.distributed.barrier()
        if i:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    params = list(model.parameters())
    row = {
        "mode": mode,
        "parameters": sum(p.numel() for p in params),
        "param_bytes": _tensor_bytes(params),
        "grad_bytes": _tensor_bytes(p.grad for p in params),
        "state_bytes": _tensor_bytes(v for s in optimizer.state.values() for v in s.values()),
        "step_s": statistics.median(times),
        "step_runs_s": [round(t, 4) for t in times],
    }
    row["total_bytes"] = row["param_bytes"] + row["grad_bytes"] + row["state_bytes"]
    if rank == 0:
        Path(out).write_text(json.dumps(row))
    if distributed:  # leave without tearing gloo down (see tests/fsdp_muonclip_worker.py)
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _launch(mode: str, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable]
        if mode != "single":
            cmd += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
        cmd += [__file__, "--worker", mode, "--reps", str(reps), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} failed: {proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(reps: int) -> dict:
    rows = {mode: _launch(mode, reps) for mode in ("single", "ddp", "fsdp")}
    for mode, row in rows.items():
        print(f"  {mode}: {row}", file=sys.stderr)
    return {
        "rows": rows,
        "memory_fsdp_over_ddp": rows["fsdp"]["total_bytes"] / rows["ddp"]["total_bytes"],
        "step_fsdp2_over_single": rows["fsdp"]["step_s"] / rows["single"]["step_s"],
        "step_ddp_over_single": rows["ddp"]["step_s"] / rows["single"]["step_s"],
    }


def run(quick: bool) -> list[dict]:
    """`bench/run_all.py`'s entry: the memory ratio and the step-time ratio."""
    res = measure(3 if quick else 7)
    rows = res["rows"]
    return [
        {
            "name": "optim_sharded/per_rank_bytes/fsdp2_2proc",
            "value": rows["fsdp"]["total_bytes"],
            "unit": "bytes",
            "baseline": "DDP, 2 processes",
            "baseline_value": rows["ddp"]["total_bytes"],
            "ratio": res["memory_fsdp_over_ddp"],
            "spread": 0.0,
            "reps": 1,
        },
        {
            "name": "optim_sharded/muonclip_step_s/fsdp2_2proc",
            "value": rows["fsdp"]["step_s"],
            "unit": "s",
            "baseline": "1 process, whole parameters",
            "baseline_value": rows["single"]["step_s"],
            "ratio": res["step_fsdp2_over_single"],
            "spread": 0.0,
            "reps": len(rows["fsdp"]["step_runs_s"]),
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 timed steps per launch")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "optim_sharded.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.reps, args.out)
        return
    res = measure(3 if args.quick else args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    r = res["rows"]
    mib = 2**20
    print(
        f"| per-rank params+grads+state | single {r['single']['total_bytes'] / mib:.0f} MiB | DDP "
        f"{r['ddp']['total_bytes'] / mib:.0f} MiB | FSDP2 {r['fsdp']['total_bytes'] / mib:.0f} MiB | FSDP2/DDP "
        f"{res['memory_fsdp_over_ddp']:.2f} |\n"
        f"| MuonClip step | single {r['single']['step_s'] * 1e3:.0f} ms | DDP {r['ddp']['step_s'] * 1e3:.0f} ms | "
        f"FSDP2 {r['fsdp']['step_s'] * 1e3:.0f} ms | FSDP2/single {res['step_fsdp2_over_single']:.2f} |"
    )


if __name__ == "__main__":
    main()
