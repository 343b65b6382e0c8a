"""Integration: the real `rlk2 train` CLI for 2 RL steps on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

METRIC_KEYS = {
    "step",
    "loss",
    "reward/mean",
    "rewards/math/mean",
    "rewards/math/std",
    "frac_reward_zero_std",
    "frac_unscorable",
    "kl/approx",
    "entropy",
    "completion/mean_length",
    "completion/clipped_ratio",
    "lr",
    "grad_norm",
    "time/rollout",
    "time/reward",
    "time/update",
    "throughput/samples_per_s",
    "throughput/tokens_per_s",
}


def rlk2(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def tiny_overrides(tmp_path: Path, run: str) -> list[str]:
    return [
        f"run.dir={tmp_path / run}",
        "trainer.steps=2",
        "rollout.group_size=4",
        "rollout.prompts_per_step=4",
        "warm_start.steps=5",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "eval.samples=1",
        "eval.greedy=false",
        "tasks.0.eval_size=8",
        "policy.demo.hidden_size=32",
        "policy.demo.num_hidden_layers=2",
    ]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    proc = rlk2("train", *tiny_overrides(tmp, "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", tmp


def test_run_directory_layout(two_step_run):
    run, _ = two_step_run
    for name in (
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "report.md",
        "rollouts/step-1.jsonl",
        "rollouts/step-2.jsonl",
    ):
        assert (run / name).exists(), name
    env = json.loads((run / "env.json").read_text())
    assert {"git_sha", "torch", "transformers"} <= set(env)


def test_metrics_have_contract_names_and_eval_rows(two_step_run):
    run, _ = two_step_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert set(r) >= METRIC_KEYS, METRIC_KEYS - set(r)
    evals = [r for r in rows if "eval/max/pass@1" in r]  # the demo task
    assert [r["step"] for r in evals] == [0, 2]


def test_parameters_changed_and_checkpoint_loads(two_step_run):
    from transformers import AutoModelForCausalLM

    run, tmp = two_step_run
    ckpt = run / "checkpoints" / "step-2"
    assert (ckpt / "trainer_state.pt").exists()
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    start = json.loads((run / "env.json").read_text())["policy_source"]
    base = AutoModelForCausalLM.from_pretrained(start)
    changed = [
        n for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(p, q)
    ]
    assert changed, "RL steps did not change any parameter"


def test_moe_router_metrics_and_bias_update(two_step_run):
    from transformers import AutoModelForCausalLM

    run, _ = two_step_run
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    for r in steps:  # the demo: 2 layers, the first dense, so one MoE layer (index 1)
        keys = {"moe/expert_load_cv", "moe/expert_load_cv/layer_1", "moe/expert_load_cv/max", "moe/router_mismatch"}
        assert keys <= set(r)
        assert 0 < r["moe/expert_load_cv"] == r["moe/expert_load_cv/layer_1"] <= 3**0.5  # <= sqrt(E/k - 1), E=8, k=2
        assert r["moe/router_mismatch"] == 0.0  # same float32 weights sample and train
    # moe.bias_update_rate (default 1e-3) moved DeepSeek-V3's correction bias: 2 steps -> entries in {0, +-1e-3, +-2e-3}
    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-2")
    bias = trained.model.layers[1].mlp.gate.e_score_correction_bias
    assert {round(abs(float(x)) * 1e4) for x in bias} <= {0, 10, 20} and (bias != 0).any()


def test_warm_start_is_cached(two_step_run):
    _, tmp = two_step_run
    proc = rlk2("train", *tiny_overrides(tmp, "again"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing" in proc.stdout + proc.stderr


def test_existing_run_dir_is_refused_without_resume(two_step_run):
    run, tmp = two_step_run
    proc = rlk2("train", *tiny_overrides(tmp, "run"))
    assert proc.returncode == 2
    assert "exists" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["rollout.group_sise=4"], "rollout.group_sise"),
        (["policy.path=/nonexistent/ckpt"], "policy.path"),
        (["tasks.0.source=/nonexistent.jsonl"], "nonexistent.jsonl"),
        (["tasks.0.rewards.0.name=mathh"], "did you mean 'math'"),
        (["optim.lr=fast"], "optim.lr"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp_path, extra, needle):
    proc = rlk2("train", *tiny_overrides(tmp_path, "bad"), *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists()


def test_dataset_row_missing_answer_column(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=?", "answer": "2"}\n' * 12 + '{"prompt": "2+2=?"}\n')
    proc = rlk2("train", *tiny_overrides(tmp_path, "bad"), f"tasks.0.source={data}", "tasks.0.eval_size=2")
    assert proc.returncode == 2
    assert f"{data}:13 has no 'answer'" in proc.stderr, proc.stderr  # the file's line, not the row in its split
    assert not (tmp_path / "bad").exists()


def test_non_causal_lm_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "bert")
    proc = rlk2("train", *tiny_overrides(tmp_path, "bad"), f"policy.path={tmp_path / 'bert'}")
    assert proc.returncode == 2
    assert "not a causal language model" in proc.stderr, proc.stderr


def test_misbehaving_rewards_inside_a_real_run(tmp_path):
    """A reward that raises on some rows, one that sleeps forever, one that spins the CPU forever and an async one,
    all in one real 2-step run: the run finishes, the stuck ones are cut at their timeout, the counts say so."""
    path = Path(__file__).parent / "data" / "fault_rewards.py"
    rewards = (
        f'[{{name: math, weight: 1.0}}, {{name: "{path}:raises_on_some", weight: 1.0, timeout_s: 20}}, '
        f'{{name: "{path}:sleeps_forever", weight: 0.0, timeout_s: 2}}, '
        f'{{name: "{path}:spins_forever", weight: 0.0, timeout_s: 2}}, '
        f'{{name: "{path}:async_length", weight: 0.0}}]'
    )
    one_task = "tasks=[{name: max, source: 'builtin:max', max_new_tokens: 8, eval_size: 8}]"
    proc = rlk2("train", *tiny_overrides(tmp_path, "faults"), one_task, f"tasks.0.rewards={rewards}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "faults" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    n = 16  # 4 prompts x 4 samples
    for r in steps:
        assert r["rewards/sleeps_forever/errors"] == n and r["rewards/spins_forever/errors"] == n
        assert 0 < r["rewards/raises_on_some/errors"] < n  # only the rows it raised on
        assert 0 < r["frac_unscorable"] < 1  # those rows are unscorable, not 0.0
        assert r["rewards/async_length/mean"] > 0
    rollouts_file = tmp_path / "faults" / "rollouts" / "step-1.jsonl"
    rollouts = [json.loads(line) for line in rollouts_file.read_text().splitlines()]
    raised = [x for x in rollouts if x["rewards"]["raises_on_some"] is None]
    assert raised and all(x["reward"] is None for x in raised)


def test_lora_run_saves_a_peft_adapter_that_loads(tmp_path):
    from rlk2.policy import load_policy

    proc = rlk2("train", *tiny_overrides(tmp_path, "lora"), "policy.lora.enabled=true", "policy.lora.r=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "lora" / "checkpoints" / "step-2"
    assert (ckpt / "adapter_config.json").exists()
    model, _ = load_policy(ckpt)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _without_chat_template(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_tokenizer_without_a_chat_template_where_one_is_asked_for(tmp_path, tiny_policy):
    plain = _without_chat_template(tiny_policy, tmp_path / "plain")
    proc = rlk2("train", *tiny_overrides(tmp_path, "bad"), f"policy.path={plain}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "policy.chat_template" in proc.stderr and "no chat template" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    served = subprocess.run(
        [sys.executable, "-m", "rlk2.cli", "serve", str(plain), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode == 2 and "no chat template" in served.stderr and "--plain-prompts" in served.stderr


def test_empty_dataset(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    proc = rlk2("train", *tiny_overrides(tmp_path, "bad"), f"tasks.0.source={data}")
    assert proc.returncode == 2
    assert f"{data}: dataset is empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_non_finite_loss_skips_steps_then_stops_with_a_clear_message(tmp_path):
    """An absurd learning rate blows the weights up after the first update: every later loss is NaN/inf, each of
    those steps is skipped (the weights are not touched again) and the run stops after max_bad_steps in a row."""
    proc = rlk2(
        "train",
        *tiny_overrides(tmp_path, "nan"),
        "trainer.steps=8",
        "trainer.max_bad_steps=3",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "not finite for 3 steps in a row" in last and "trainer.max_bad_steps=3" in last, last
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["skipped_steps"] for r in steps][-2:] == [1, 2]  # the third bad step raised before it was logged


def test_malformed_dataset_line_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=?", "answer": "2"}\n' * 2 + '{"prompt": "2+2=?", "answer": 4\n')
    proc = rlk2("train", *tiny_overrides(tmp_path, "bad"), f"tasks.0.source={data}")
    assert proc.returncode == 2 and f"{data}:3: malformed JSON" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def _two_tasks(source: str) -> str:
    return (
        f"tasks=[{{name: max, source: 'builtin:max', eval_size: 4, rewards: [{{name: math}}]}}, "
        f"{{name: pyfunc, source: '{source}', eval_size: 4, max_new_tokens: 8, rewards: [{{name: code}}]}}]"
    )


def test_without_any_sandbox_the_builtin_code_task_is_left_out_and_user_code_tasks_refused(tmp_path):
    import os

    env = {**os.environ, "RLK2_SANDBOX_BACKEND": "docker", "RLK2_SANDBOX_ENGINES": "unix:///nonexistent/docker.sock"}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "rlk2.cli", "train", *a], capture_output=True, text=True, timeout=600, env=env
    )
    data = Path(__file__).parent / "data" / "code_tasks.jsonl"
    refused = run(*tiny_overrides(tmp_path, "user"), _two_tasks(str(data)))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "tasks[1] (pyfunc): the code reward needs a sandbox and none works here (docker:" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "user").exists()

    demo = run(*tiny_overrides(tmp_path, "demo"), _two_tasks("builtin:pyfunc"))
    assert demo.returncode == 0, demo.stderr[-2000:]
    notes = [line for line in demo.stdout.splitlines() if "no sandbox backend works here" in line]
    assert len(notes) == 1 and "the 'pyfunc' code task is left out" in notes[0]
    rows = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith(("eval/pyfunc", "rewards/code")) for r in rows for k in r)
    assert any("eval/max/pass@1" in r for r in rows)
