"""MuonClip optimizer step vs `torch.optim.Muon` vs AdamW, and the forward cost of QK-Clip's logit recording.

Models: the demo policy (`rlk2.policy.tiny_deepseek_v3_config`, default shape, vocab 160) and a ~50 M-parameter
DeepSeek-V3 config (`_shape_50m()`), both real `DeepseekV3ForCausalLM`s with random weights and random gradients.

- MuonClip vs torch.optim.Muon on the same 2-D matrices: a model copy where only the 2-D hidden matrices
  train, so MuonClip's step (Muon + QK-Clip) and `torch.optim.Muon(adjust_lr_fn="match_rms_adamw", ns_steps=5)`
  update exactly the same tensors; MuonClip picks the Newton-Schulz precision per CPU (`rlk2.optim.ns_dtype`),
  torch always runs bfloat16.
- The same optimizer rows on an AVX2 CPU without bfloat16 instructions (most laptops; the kind the issue's
  figures came from), rows `cpu_avx2/...`: a child process whose oneDNN, MKL and ATen kernels are capped at AVX2
  by their documented switches (`ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`, `ATEN_CPU_CAPABILITY`), so
  torch's bfloat16 matmuls run emulated and float32 GEMMs use AVX2 FMA, as they would there.
- MuonClip's whole step (Muon on 2-D and 3-D expert matrices, AdamW on the rest, QK-Clip on logits recorded by
  an untimed grad-enabled forward just before each step) vs what stock torch offers for the same model:
  `torch.optim.Muon` on every hidden matrix with each expert split out as its own 2-D tensor, plus AdamW on the
  rest; and vs `torch.optim.AdamW` on every parameter.
- Newton-Schulz batched (what MuonClip does: one call per matrix shape) vs one call per matrix.
- Forward: grad-enabled forward of the same batch on two copies of the model, one with the recording hooks,
  interleaved repetition by repetition.
- Optimizer share: MuonClip step vs forward+backward of one demo RL batch (128 sequences x 28 tokens); a
  demo RL step also generates and scores, so this overstates the share.

Rows of steps/s have ratio = value / baseline (how many times faster); rows of seconds have ratio = value /
baseline (forward overhead factor, optimizer share). Median of the repetitions; spread = (max - min) / 2 of
the per-repetition ratios.

    python bench/bench_optim.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 160
EMULATED_ISA = "AVX2"  # a CPU without bfloat16 dot products (most laptops and older servers), via oneDNN's ISA cap


def _shape_50m():
    from rlk2.policy import TinyMoEShape

    return TinyMoEShape(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        intermediate_size=1408,
        moe_intermediate_size=256,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=512,
    )


def _model(shape=None, attn: str = "eager"):
    from transformers import DeepseekV3ForCausalLM

    from rlk2.policy import TinyMoEShape, tiny_deepseek_v3_config

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_deepseek_v3_config(VOCAB, shape or TinyMoEShape()))
    model.config._attn_implementation = attn
    return model


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _row(name, value, unit, baseline, baseline_value, ratios, reps):
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": statistics.median(ratios),
        "spread": (max(ratios) - min(ratios)) / 2,
        "reps": reps,
    }


def optimizer_rows(label: str, shape, reps: int, batch: tuple[int, int], stock: bool = True) -> list[dict]:
    """MuonClip vs torch.optim.Muon (same 2-D matrices), vs stock torch on the whole model (`stock`), vs AdamW."""
    from rlk2.optim import MuonClip

    model = _model(shape)
    ids = torch.randint(0, VOCAB, batch, generator=torch.Generator().manual_seed(0))
    muonclip = MuonClip(model, lr=1e-3)  # everything: Muon on 2-D and 3-D, AdamW, QK-Clip
    hidden_2d_names = {n for n, p in muonclip.routing.muon if p.ndim == 2}
    adamw_params = [p for _, p in muonclip.routing.adamw + muonclip.routing.adamw_no_decay]
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))

    # Same 2-D matrices for both: a copy of the model where only the 2-D hidden matrices train.
    twin = copy.deepcopy(model)
    for n, p in twin.named_parameters():
        p.requires_grad_(n in hidden_2d_names)
    muonclip_2d = MuonClip(twin, lr=1e-3)
    torch_muon_2d = torch.optim.Muon(
        [p for p in twin.parameters() if p.requires_grad], lr=1e-3, adjust_lr_fn="match_rms_adamw", ns_steps=5
    )

    # What stock torch offers for the whole model: Muon on every hidden matrix, each expert as its own 2-D
    # tensor (torch.optim.Muon rejects 3-D), plus AdamW on the rest.
    per_expert = [
        torch.nn.Parameter(m.detach().clone()) for _, p in muonclip.routing.muon for m in p.reshape(-1, *p.shape[-2:])
    ]
    torch_muon_all = torch.optim.Muon(per_expert, lr=1e-3, adjust_lr_fn="match_rms_adamw", ns_steps=5)
    torch_adamw_rest = torch.optim.AdamW(adamw_params, lr=1e-3, betas=(0.9, 0.95))

    for p in list(model.parameters()) + list(twin.parameters()) + per_expert:
        p.grad = torch.randn_like(p) * 1e-3

    def clip_step(opt, net):
        with torch.enable_grad():
            net(ids)  # untimed: gives QK-Clip real recorded logits to act on
        return _timed(opt.step)

    def stock_step():
        return _timed(torch_muon_all.step) + _timed(torch_adamw_rest.step)

    times: dict[str, list[float]] = {k: [] for k in ("full", "adamw", "clip_2d", "torch_2d", "stock")}
    for rep in range(reps + 1):  # the first repetition warms up and creates optimizer states; not kept
        got = {
            "full": clip_step(muonclip, model),
            "adamw": _timed(adamw.step),
            "clip_2d": clip_step(muonclip_2d, twin),
            "torch_2d": _timed(torch_muon_2d.step),
        }
        if stock:
            got["stock"] = stock_step()
        for k, v in got.items():
            if rep:
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items() if v}

    def speedup(base: str, ours: str) -> list[float]:
        return [b / o for o, b in zip(times[ours], times[base])]

    n_params = sum(p.numel() for p in model.parameters())
    tag = f"optim_step/{label}_{n_params / 1e6:.1f}M"
    rows = [
        _row(
            f"{tag}/muonclip_vs_torch_muon_same_{len(hidden_2d_names)}_2d_matrices",
            1 / med["clip_2d"],
            "steps/s",
            "torch.optim.Muon (bf16 Newton-Schulz), same matrices, 5 steps",
            1 / med["torch_2d"],
            speedup("torch_2d", "clip_2d"),
            reps,
        )
    ]
    if stock:
        rows.append(
            _row(
                f"{tag}/muonclip_vs_torch_muon_per_expert_plus_adamw",
                1 / med["full"],
                "steps/s",
                f"torch.optim.Muon on all {len(per_expert)} matrices (experts split) + AdamW",
                1 / med["stock"],
                speedup("stock", "full"),
                reps,
            )
        )
    rows.append(
        _row(
            f"{tag}/muonclip_vs_adamw",
            1 / med["full"],
            "steps/s",
            "torch.optim.AdamW, all parameters",
            1 / med["adamw"],
            speedup("adamw", "full"),
            reps,
        )
    )
    return rows


def newton_schulz_rows(reps: int) -> list[dict]:
    from rlk2.optim import newton_schulz, route_parameters

    mats = [torch.randn_like(p) for _, p in route_parameters(_model()).muon]
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for m in mats:
        by_shape.setdefault(tuple(m.shape[-2:]), []).append(m.reshape(-1, *m.shape[-2:]))

    def batched():
        for group in by_shape.values():
            newton_schulz(torch.cat(group))

    def per_matrix():
        for m in mats:
            for one in m.reshape(-1, *m.shape[-2:]):
                newton_schulz(one)

    batched(), per_matrix()
    t_b, t_l = [], []
    for _ in range(reps):
        t_b.append(_timed(batched))
        t_l.append(_timed(per_matrix))
    count = sum(m.reshape(-1, *m.shape[-2:]).shape[0] for m in mats)
    return [
        _row(
            f"newton_schulz/demo/batched_by_shape_{count}_matrices",
            1 / statistics.median(t_b),
            "calls/s",
            "one newton_schulz call per matrix",
            1 / statistics.median(t_l),
            [lt / b for b, lt in zip(t_b, t_l)],
            reps,
        )
    ]


def forward_rows(label: str, shape, attn: str, batch: tuple[int, int], reps: int) -> list[dict]:
    from rlk2.optim import MuonClip

    plain = _model(shape, attn)
    hooked = copy.deepcopy(plain)
    MuonClip(hooked, lr=0.0)  # registers the recording hooks on `hooked`
    ids = torch.randint(0, VOCAB, batch, generator=torch.Generator().manual_seed(0))
    hooked(ids), plain(ids)  # warm-up
    t_plain, t_hooked = [], []
    for _ in range(reps):
        t_plain.append(_timed(lambda: plain(ids)))
        t_hooked.append(_timed(lambda: hooked(ids)))
    return [
        _row(
            f"forward/{label}_{attn}_{batch[0]}x{batch[1]}/with_logit_recording",
            statistics.median(t_hooked),
            "s",
            "same forward, no hooks",
            statistics.median(t_plain),
            [h / p for p, h in zip(t_plain, t_hooked)],
            reps,
        )
    ]


def share_rows(reps: int) -> list[dict]:
    from rlk2.optim import MuonClip

    model = _model()
    opt = MuonClip(model, lr=1e-4)
    ids = torch.randint(0, VOCAB, (128, 28), generator=torch.Generator().manual_seed(0))

    def fwd_bwd():
        model(ids, labels=ids).loss.backward()

    fwd_bwd(), opt.step()
    t_fb, t_opt = [], []
    for _ in range(reps):
        t_fb.append(_timed(fwd_bwd))
        t_opt.append(_timed(opt.step))
        opt.zero_grad()
    return [
        _row(
            "optim_step/demo/share_of_forward_backward_128x28",
            statistics.median(t_opt),
            "s",
            "forward+backward of one demo RL batch",
            statistics.median(t_fb),
            [o / f for f, o in zip(t_fb, t_opt)],
            reps,
        )
    ]


def _reps(quick: bool) -> tuple[int, int]:
    return (5, 2) if quick else (15, 3)


def all_optimizer_rows(quick: bool, emulated: bool = False) -> list[dict]:
    """Optimizer rows of both models. `emulated` (no native bfloat16): the 53 M model's whole-model stock-torch
    row is left out, its 280 emulated bfloat16 Newton-Schulz runs take minutes per step."""
    reps_small, reps_large = _reps(quick)
    return optimizer_rows("demo", None, reps_small, (8, 32)) + optimizer_rows(
        "deepseek_v3", _shape_50m(), reps_large, (2, 32), stock=not emulated
    )


def emulated_cpu_rows(quick: bool, isa: str = EMULATED_ISA) -> list[dict]:
    """The optimizer rows again in a child process whose kernels are capped at `isa`, as on a CPU without bfloat16
    instructions: torch's bfloat16 matmuls run emulated, and MuonClip's `ns_dtype` sees oneDNN's cap and picks
    float32. Rows are prefixed `cpu_<isa>/`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--optimizer-rows-to", str(out), "--threads", str(torch.get_num_threads())]
        # oneDNN (bfloat16 matmuls), MKL (float32 GEMM) and ATen's own vector kernels, each capped at `isa`
        env = {
            **os.environ,
            "ONEDNN_MAX_CPU_ISA": isa,
            "MKL_ENABLE_INSTRUCTIONS": isa,
            "ATEN_CPU_CAPABILITY": isa.lower(),
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run(cmd + (["--quick"] if quick else []), env=env, check=True)
        rows = json.loads(out.read_text())
    for r in rows:
        r["name"] = f"cpu_{isa.lower()}/{r['name']}"
    return rows


def run(quick: bool) -> list[dict]:
    logging.getLogger("rlk2.optim").setLevel(logging.ERROR)
    reps_small, reps_large = _reps(quick)
    rows = all_optimizer_rows(quick)
    rows += emulated_cpu_rows(quick)
    rows += newton_schulz_rows(reps_small)
    for attn in ("eager", "sdpa"):
        rows += forward_rows("demo", None, attn, (128, 28), reps_small)
    rows += forward_rows("deepseek_v3_53M", _shape_50m(), "sdpa", (4, 256), reps_large + 2)
    rows += share_rows(reps_small)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--optimizer-rows-to", type=pathlib.Path, help=argparse.SUPPRESS)  # emulated_cpu_rows' child
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.optimizer_rows_to:
        logging.getLogger("rlk2.optim").setLevel(logging.ERROR)
        args.optimizer_rows_to.write_text(json.dumps(all_optimizer_rows(args.quick, emulated=True)))
        sys.exit(0)
    rows = run(args.quick)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'name':64} {'value':>9} {'unit':8} {'baseline_value':>14} {'ratio':>7} {'spread':>7} reps")
    for r in rows:
        print(
            f"{r['name']:64} {r['value']:>9.4g} {r['unit']:8} {r['baseline_value']:>14.4g} {r['ratio']:>7.3f} "
            f"{r['spread']:>7.3f} {r['reps']}"
        )
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "optim.json").write_text(json.dumps(rows, indent=1))
