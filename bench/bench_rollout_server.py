"""The server rollout engine on a real model (SmolLM2-135M-Instruct): weight push time, engine/trainer mismatch, and
sampling through `rlk2 serve` against sampling in the training process.

`rlk2 serve CKPT --weight-updates` runs as its own process on loopback, twice: decoding in float32
(`RLK2_COMPUTE_DTYPE=float32`) and in the dtype rlk2 picks for this CPU (bfloat16 where it multiplies it natively).
Against each:
- push: the trainer's full float32 state dict (134.5 M parameters, 538 MB) as one safetensors body, until the
  server has copied it into its model and answered (`RolloutServer.push`); median of `reps`;
- mismatch: 8 word-problem prompts x 4 samples x at most 64 new tokens at T = 1, sampled by the server; the
  trainer's float32 forward recomputes the same tokens' log-probs and `rollout/mismatch_kl` is their k3 estimate
  of KL(engine || trainer), as the loop logs it; the same for the local engine (the training process's own
  decoder, same seeds) as its reference;
- sampling seconds for those 32 completions, server vs local (the server's includes HTTP and JSON).

    python bench/bench_rollout_server.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS, GROUP, NEW_TOKENS = 8, 4, 64


def _serve(checkpoint: Path, compute: str | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    if compute:
        env["RLK2_COMPUTE_DTYPE"] = compute
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "serve", str(checkpoint), "--port", "0", "--weight-updates"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )
    line = proc.stdout.readline()
    if " on " not in line:
        raise RuntimeError(f"rlk2 serve did not start: {line!r}")
    return proc, line.split(" on ")[1].strip()


def _mismatch_kl(model, ro) -> float:
    from rlk2.rollout import policy_logprobs

    with torch.no_grad():
        now, _ = policy_logprobs(model, ro, temperature=1.0)
    r = (now - ro.old_logp)[ro.completion_mask.bool()]
    return float((torch.exp(r) - 1 - r).mean())


def measure(reps: int) -> dict:
    from rlk2.data import builtin_split
    from rlk2.distributed import sequence_seeds
    from rlk2.policy import load_policy
    from rlk2.policy.sources import resolve_checkpoint
    from rlk2.rollout import encode_prompts, generate_rollouts
    from rlk2.rollout.server import RolloutServer

    checkpoint = resolve_checkpoint("smollm2-135m-instruct")
    model, tok = load_policy(str(checkpoint), dtype="float32", what="checkpoint")
    rows = builtin_split("word_problems", "eval")[:PROMPTS]
    ids = [i for i in encode_prompts(tok, [r["prompt"] for r in rows], chat_template=True) for _ in range(GROUP)]
    seeds = sequence_seeds(0, 0, PROMPTS, GROUP)
    t0 = time.perf_counter()
    local = generate_rollouts(model, tok, ids, max_new_tokens=NEW_TOKENS, temperature=1.0, seeds=seeds)
    out: dict = {
        "model": "SmolLM2-135M-Instruct",
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples": len(ids),
        "max_new_tokens": NEW_TOKENS,
        "local": {"sample_s": time.perf_counter() - t0, "mismatch_kl": _mismatch_kl(model, local)},
    }
    for label, compute in (("server_float32", "float32"), ("server_default", None)):
        proc, url = _serve(checkpoint, compute)
        try:
            client = RolloutServer(url, timeout_s=600)
            pushes = [client.push(model, version) for version in range(1, reps + 1)]
            t0 = time.perf_counter()
            ro = client.generate(tok, model, ids, max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, seeds=seeds)
            sample_s = time.perf_counter() - t0
            out[label] = {
                "push_s": statistics.median(pushes),
                "push_runs_s": [round(s, 3) for s in pushes],
                "sample_s": sample_s,
                "tokens": int(ro.completion_mask.sum()),
                "mismatch_kl": _mismatch_kl(model, ro),
                "same_tokens_as_local": bool(torch.equal(ro.completion_ids, local.completion_ids)),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        print(f"  {label}: {out[label]}", file=sys.stderr)
    return out


def run(quick: bool) -> list[dict]:
    """`bench/run_all.py`'s entry: the push time, and server sampling against local sampling."""
    res = measure(1 if quick else 3)
    srv = res["server_float32"]
    return [
        {
            "name": "rollout_server/weight_push_s/smollm2",
            "value": srv["push_s"],
            "unit": "s",
            "baseline": "target 2 s",
            "baseline_value": 2.0,
            "ratio": srv["push_s"] / 2.0,
            "spread": 0.0,
            "reps": len(srv["push_runs_s"]),
        },
        {
            "name": "rollout_server/sample_s/smollm2_32x64tok",
            "value": srv["sample_s"],
            "unit": "s",
            "baseline": "local engine (same process, same seeds)",
            "baseline_value": res["local"]["sample_s"],
            "ratio": srv["sample_s"] / res["local"]["sample_s"],
            "spread": 0.0,
            "reps": 1,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="weight pushes per server")
    parser.add_argument("--quick", action="store_true", help="one push per server")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "rollout_server.json"))
    args = parser.parse_args()
    res = measure(1 if args.quick else args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for label in ("server_float32", "server_default"):
        r = res[label]
        print(
            f"| {label} | push {r['push_s']:.2f} s | sample {r['sample_s']:.1f} s (local {res['local']['sample_s']:.1f}"
            f" s) | mismatch_kl {r['mismatch_kl']:.2e} (local engine {res['local']['mismatch_kl']:.2e}) |"
        )


if __name__ == "__main__":
    main()
