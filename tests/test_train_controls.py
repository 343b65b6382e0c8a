"""Integration: the K2 training controls inside real `rlk2 train` runs on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlk2.data import builtin_split

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data"
TIES = f'[{{name: "{DATA / "control_rewards.py"}:ties_on_even"}}]'  # even first number: the whole group ties at 1.0


def rlk2(*args):
    return subprocess.run([sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, timeout=600)


def tiny(tmp: Path, run: str, steps: int = 3) -> list[str]:
    return [
        f"run.dir={tmp / run}",
        f"trainer.steps={steps}",
        "rollout.group_size=4",
        "rollout.prompts_per_step=4",
        "warm_start.steps=5",
        f"warm_start.cache_dir={tmp / 'cache'}",
        "eval.samples=1",
        "eval.greedy=false",
        ONE_TASK,
        "tasks.0.eval_size=8",
        "policy.demo.hidden_size=32",
        "policy.demo.num_hidden_layers=2",
    ]


# The demo's `max` task alone (the demo also has a code task): these tests count prompts and groups per step.
ONE_TASK = (
    "tasks=[{name: max, source: 'builtin:max', max_new_tokens: 8, overlong_penalty: -0.5, rewards: [{name: math}]}]"
)


def step_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def ptx_runs(tmp_path_factory):
    """Two runs from the same seed on the same 4 PTX rows (one fixed PTX batch per step): weight 0 and weight 2."""
    tmp = tmp_path_factory.mktemp("ptx")
    data = tmp / "ptx.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"max({a},{a + 1},{a + 2})=?", "completion": f"\\boxed{{{a + 2}}}"}) + "\n"
            for a in (11, 23, 47, 60)
        )
    )
    ptx = [f"algo.ptx.source={data}", "algo.ptx.batch_size=4"]
    for run, weight in (("off", 0), ("on", 2)):
        proc = rlk2("train", *tiny(tmp, run), *ptx, f"algo.ptx.weight={weight}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_ptx_loss_is_logged_added_with_its_weight_and_falls(ptx_runs):
    off, on = step_rows(ptx_runs / "off"), step_rows(ptx_runs / "on")
    assert "loss/ptx" not in off[0]  # weight 0: PTX off
    for r in on:
        assert r["loss"] == pytest.approx(r["loss/policy"] + 2 * r["loss/ptx"], rel=1e-5)
    # step 1 samples the same rollouts from the same weights: the RL part of the loss is identical
    assert on[0]["loss/policy"] == pytest.approx(off[0]["loss"], rel=1e-6)
    ptx = [r["loss/ptx"] for r in on]
    assert ptx[-1] < ptx[0], ptx  # the same 4 rows every step: trained on, their loss falls


def test_ptx_changes_the_update(ptx_runs):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(ptx_runs / "off" / "checkpoints" / "step-3")
    b = AutoModelForCausalLM.from_pretrained(ptx_runs / "on" / "checkpoints" / "step-3")
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert diff > 1e-4


def test_temperature_decay_prioritized_sampling_and_filtering_in_one_run(tmp_path):
    proc = rlk2(
        "train",
        *tiny(tmp_path, "run"),
        f"tasks.0.rewards={TIES}",
        "tasks.0.overlong_penalty=0",
        "rollout.temperature=1.5",
        "rollout.temperature_end=0.5",
        "rollout.sampling=prioritized",
        "algo.filter_zero_std=true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = step_rows(tmp_path / "run")
    # linear decay over trainer.steps - 1 = 2 steps: 1.5, 1.0, 0.5
    assert [r["rollout/temperature"] for r in rows] == pytest.approx([1.5, 1.0, 0.5])
    for r in rows:
        assert r["groups/kept"] == round(4 * (1 - r["frac_reward_zero_std"]))
        if r["groups/kept"]:
            # the training forward uses the step's own temperature: pi_theta == pi_old at the (only) inner step
            assert r["kl/approx"] < 1e-6, r["kl/approx"]
        else:  # every group tied: no policy loss, no update
            assert "kl/approx" not in r and r["grad_norm"] == 0.0
    assert any(r["groups/kept"] < 4 for r in rows)  # some even-first prompts were drawn and filtered out
    assert any(r["groups/kept"] > 0 for r in rows)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
    success = state["sampler"]["success"]["max"]
    assert sum(n for _, n in success.values()) == 3 * 4 * 4  # every scored response of 3 steps x 4 prompts x K=4
    rows_max = builtin_split("max", "train")
    solved = [i for i in success if int(rows_max[i]["prompt"][4:6]) % 2 == 0]
    assert solved and all(success[i] == [4, 4] for i in solved)  # tied at 1.0: success rate 1 -> weight = floor


@pytest.mark.slow
def test_resume_with_every_control_on_matches_an_uninterrupted_run(tmp_path):
    """Success counts, the PTX data position and the temperature schedule all continue exactly after a resume."""
    controls = [
        f"tasks.0.rewards={TIES}",
        "tasks.0.overlong_penalty=0",
        "rollout.temperature=1.5",
        "rollout.temperature_end=0.5",
        "rollout.temperature_decay_steps=3",
        "rollout.sampling=prioritized",
        "algo.filter_zero_std=true",
        "algo.ptx.weight=0.5",
        "algo.ptx.source=builtin:max",
        "algo.ptx.batch_size=3",
        "trainer.save_every=1",
        "trainer.keep_last=0",
    ]
    full = rlk2("train", *tiny(tmp_path, "full", steps=4), *controls)
    assert full.returncode == 0, full.stderr[-2000:]
    part = rlk2("train", *tiny(tmp_path, "part", steps=2), *controls)
    assert part.returncode == 0, part.stderr[-2000:]
    resumed = rlk2("train", "--resume", str(tmp_path / "part"), "trainer.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def stable(run):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in step_rows(run)]

    a, b = stable(tmp_path / "full"), stable(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    assert [r["rollout/temperature"] for r in a] == pytest.approx([1.5, 1.5 - 1 / 3, 0.5 + 1 / 3, 0.5])
    states = [
        torch.load(tmp_path / run / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=False)
        for run in ("full", "part")
    ]
    assert states[0]["sampler"]["success"] == states[1]["sampler"]["success"]  # 4 steps of counts in both
    assert sum(n for _, n in states[1]["sampler"]["success"]["max"].values()) == 4 * 4 * 4
    assert states[0]["ptx_sampler"] == states[1]["ptx_sampler"]


@pytest.mark.parametrize("scale", [None, True, False])
def test_scale_rewards_decides_whether_advantages_are_std_scaled(tmp_path, scale):
    """grpo scales by the group's reward std by default; `algo.scale_rewards=false` turns it off (and true turns it
    on for k2): the advantages written in the rollouts file are r - mean(r), divided by std(r) + 1e-6 or not."""
    loss = "k2" if scale else "grpo"
    extra = [] if scale is None else [f"algo.scale_rewards={str(scale).lower()}"]
    parity = f'[{{name: "{DATA / "critic_rewards.py"}:even_length"}}]'  # mixed outcomes from any policy
    proc = rlk2("train", *tiny(tmp_path, "run", steps=1), f"algo.loss={loss}", f"tasks.0.rewards={parity}", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    scaled = scale is not False  # grpo's default, or forced on
    checked = 0
    for g in range(0, len(recs), 4):
        rewards = torch.tensor([r["reward"] for r in recs[g : g + 4]])
        if rewards.std() == 0:
            continue
        centred = rewards - rewards.mean()
        expect = centred / (rewards.std(unbiased=False) + 1e-6) if scaled else centred
        got = torch.tensor([r["advantage"] for r in recs[g : g + 4]])
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked > 0  # some group had a reward spread


def test_gradients_are_clipped_to_optim_grad_clip(tmp_path, monkeypatch):
    """The optimizer steps on gradients whose norm is at most `optim.grad_clip`, while `grad_norm` logs the norm
    before clipping. (The loop once handed torch's `clip_grads_with_norm_` the gradients instead of the parameters:
    it found no `.grad` on them and clipped nothing, in every one-process and DDP run.)"""
    import torch

    from rlk2.config import load_config
    from rlk2.train import train

    stepped = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        stepped.append(float(torch.nn.utils.get_total_norm(grads)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(load_config(None, [*tiny(tmp_path, "clip", steps=2), "optim.name=adamw", "optim.grad_clip=0.001"]))
    rows = step_rows(tmp_path / "clip")
    assert len(rows) == 2 and all(r["grad_norm"] > 0.01 for r in rows)  # far above the bound before clipping
    rl = stepped[-2:]  # the last two: the warm start's supervised steps (TRL, AdamW) come first
    assert len(stepped) >= 2 and all(0 < n <= 0.001 * (1 + 1e-4) for n in rl), stepped
