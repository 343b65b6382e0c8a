"""`rlk2 eval` end to end on tiny checkpoints: an HF directory, a PEFT adapter and an rlk2 run directory.

The run directory is laid out by the real checkpoint writer (rlk2.run_dir.save_checkpoint) with the same
weights as the HF checkpoint, so "a checkpoint against itself" is checked through the whole command.
"""

import json
import shutil

import pytest

from rlk2.cli import main

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"
COMMON = ["--limit", "6", "--k", "1,2", "--samples", "2", "--bootstrap", "200", "--seed", "3"]


@pytest.fixture(scope="module")
def checkpoints(tiny_policy, tmp_path_factory):
    """(hf_dir, adapter_dir, run_dir): the tiny policy, a LoRA adapter on it, and a run whose step-2 is it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlk2.config import load_config, to_yaml
    from rlk2.policy import load_policy
    from rlk2.run_dir import save_checkpoint

    root = tmp_path_factory.mktemp("eval_ckpts")
    model, tok = load_policy(tiny_policy)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)

    run = root / "myrun"
    cfg = load_config(None, [f"run.dir={run}", f"policy.path={tiny_policy}"])
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "env.json").write_text(json.dumps({"policy_source": str(tiny_policy)}))
    rows = [{"step": 0, "eval/arith/pass@1": 0.1, "eval/arith/pass@8": 0.3}]
    rows += [{"step": s, "reward/mean": 0.1 * s, "rewards/math/mean": 0.1 * s, "loss": 0.5} for s in (1, 2)]
    rows += [{"step": 2, "eval/arith/pass@1": 0.2, "eval/arith/pass@8": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base, _ = load_policy(tiny_policy)
    save_checkpoint(run, 2, base, tok, {"step": 2}, keep_last=0)
    return tiny_policy, adapter, run


@pytest.fixture(scope="module")
def first_report(checkpoints, tmp_path_factory):
    hf, adapter, run = checkpoints
    out = tmp_path_factory.mktemp("eval_out") / "report"
    rc = main(["eval", str(hf), str(adapter), str(run), "--tasks", "arith,word_problems", *COMMON, "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_end_to_end_report_files_and_keys(first_report, checkpoints):
    out, report = first_report
    hf, adapter, run = checkpoints
    labels = [c["label"] for c in report["checkpoints"]]
    assert [c["kind"] for c in report["checkpoints"]] == ["hf", "peft", "hf"]
    assert labels[2] == "myrun@step-2" and report["checkpoints"][2]["step"] == 2
    assert report["checkpoints"][2]["path"] == str(run / "checkpoints" / "step-2")
    assert set(report["tasks"]) == {"arith", "word_problems"}
    arith = report["tasks"]["arith"]
    assert arith["prompts"] == 6 and arith["samples_per_prompt"] == 2
    assert list(arith["metrics"][labels[0]]) == [
        "pass@1",
        "pass@2",
        "greedy_pass@1",
        "mean@2",
        "maj@2",
        "reward/math",
        "mean_length",
        "max_length",
        "truncated",
        "unscorable",
    ]
    assert "reward/format" in report["tasks"]["word_problems"]["metrics"][labels[1]]
    for label in labels:
        m = arith["metrics"][label]
        assert 0.0 <= m["pass@1"]["value"] <= m["pass@2"]["value"] <= 1.0
        assert 1 <= m["mean_length"]["value"] <= m["max_length"]["value"] <= 12  # arith's token budget
        assert m["pass@1"]["ci"][0] <= m["pass@1"]["value"] <= m["pass@1"]["ci"][1]
        assert report["throughput"][label]["samples_per_s"] > 0
        assert report["throughput"][label]["sequences"] == 2 * 6 * (2 + 1)  # two tasks, samples + greedy
    # the run's step-2 holds the HF checkpoint's weights: same seeds, same samples, a difference of exactly 0
    for task in report["tasks"].values():
        diffs = task["differences"][labels[2]]
        assert diffs["baseline"] == labels[0]
        for name, d in diffs["metrics"].items():
            assert d["value"] == 0.0 and d["ci"] == [0.0, 0.0], name
    assert set(report["plots"]) == {"pass_at_k_arith.png", "pass_at_k_word_problems.png", "training_myrun.png"}
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
    md = (out / "report.md").read_text()
    assert f"| metric | {labels[0]} | {labels[1]} | {labels[2]} |" in md and "samples/s" in md
    for label in labels:
        lines = (out / "samples" / label / "arith.jsonl").read_text().splitlines()
        assert len(lines) == 6 * 3
        rec = json.loads(lines[0])
        assert {"mode", "prompt", "completion", "passed", "tokens", "rewards", "answer"} <= set(rec)


def test_same_checkpoint_same_seed_same_numbers(first_report, checkpoints, tmp_path):
    out1, report1 = first_report
    hf, _, _ = checkpoints
    rc = main(["eval", str(hf), "--tasks", "arith,word_problems", *COMMON, "--out", str(tmp_path / "again")])
    assert rc == 0
    report2 = json.loads((tmp_path / "again" / "report.json").read_text())
    label = report1["checkpoints"][0]["label"]
    for task in ("arith", "word_problems"):
        assert report2["tasks"][task]["metrics"][label] == report1["tasks"][task]["metrics"][label]
        assert (tmp_path / "again" / "samples" / label / f"{task}.jsonl").read_text() == (
            out1 / "samples" / label / f"{task}.jsonl"
        ).read_text()


def test_run_dir_start_and_default_tasks(checkpoints, tmp_path):
    _, _, run = checkpoints
    out = tmp_path / "r"
    rc = main(["eval", f"{run}:start", f"{run}:step-2", "--limit", "3", "--k", "1", "--no-greedy", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [c["label"] for c in report["checkpoints"]] == ["myrun@start", "myrun@step-2"]
    from rlk2.config import load_config

    own = [t.name for t in load_config(run / "config.yaml").tasks]
    assert list(report["tasks"]) == own  # the run's own task list
    assert "greedy_pass@1" not in report["tasks"][own[0]]["metrics"]["myrun@start"]
    assert report["tasks"][own[0]]["prompts"] == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/nonexistent/ckpt"], "no such directory"),
        (["{hf}", "--k", "0"], "--k"),
        (["{hf}", "--k", "1,x"], "--k"),
        (["{hf}", "--k", "1,8", "--samples", "4"], "--samples"),
        (["{hf}", "--tasks", "nope"], "unknown task 'nope'"),
        (["{hf}", "--temperature", "0"], "--temperature"),
        (["{run}:step-7"], "no checkpoint step-7 (have: step-2)"),
        (["{run}:best"], "'best' is not step-N"),
        (["{empty}"], "is not a Hugging Face checkpoint"),
        (["{norun}"], "no complete checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, capsys, args, needle):
    hf, _, run = checkpoints
    (tmp_path / "empty").mkdir()
    norun = tmp_path / "norun"
    norun.mkdir()
    shutil.copy(run / "config.yaml", norun / "config.yaml")
    (norun / "metrics.jsonl").write_text("")
    args = [a.format(hf=hf, run=run, empty=tmp_path / "empty", norun=norun) for a in args]
    rc = main(["eval", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_evaluate_policy_keeps_the_training_loop_keys(tiny_policy):
    """train.py builds EvalTask positionally and reads these keys from evaluate_policy."""
    from rewards.engine import RewardEngine, RewardSpec
    from rlk2.eval.evaluate import EvalTask, evaluate_policy
    from rlk2.policy import load_policy

    model, tok = load_policy(tiny_policy)
    task = EvalTask("arith", ["1+2=?", "30+4=?", "5+5=?"], {"answer": ["3", "34", "10"]}, [RewardSpec("math")], 8)
    with RewardEngine(num_workers=1) as engine:
        res = evaluate_policy(
            model,
            tok,
            [task],
            engine,
            samples=4,
            temperature=1.0,
            greedy=True,
            batch_size=5,
            chat_template=True,
            seed=0,
            ks=[1, 4],
        )
    for key in (
        "pass@1",
        "greedy_pass@1",
        "pass@4",
        "reward/math",
        "mean_length",
        "truncated",
        "unscorable",
        "mean@4",
        "maj@4",
        "max_length",
    ):
        assert f"eval/arith/{key}" in res.metrics, key
    # batches of 5 split prompts' samples across calls: every prompt still gets its own 4 samples back
    samples = [r for r in res.samples["arith"] if r["mode"] == "sample"]
    assert [r["prompt_index"] for r in samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert res.outcomes["arith"].passed.shape == (3, 4)
    assert res.timing["arith"]["sequences"] == 15 and res.timing["arith"]["samples_per_s"] > 0


def test_evaluation_split_over_processes_gives_the_one_process_numbers(tiny_policy):
    """Split: each process generates every world-th batch and the gathered result is the one-process result. Three
    processes simulated by threads, whose gather is a barrier (what accelerate's gather_object does across
    processes). 3 prompts x 4 samples in batches of 5: batches at 0, 5, 10, one per process; the greedy pass is one
    batch, the first process's."""
    import threading

    from rewards.engine import RewardEngine, RewardSpec
    from rlk2.eval.evaluate import EvalTask, Split, evaluate_policy
    from rlk2.policy import load_policy

    model, tok = load_policy(tiny_policy)
    task = EvalTask("arith", ["1+2=?", "30+4=?", "5+5=?"], {"answer": ["3", "34", "10"]}, [RewardSpec("math")], 8)

    def run(split):
        with RewardEngine(num_workers=1) as engine:
            return evaluate_policy(
                model,
                tok,
                [task],
                engine,
                samples=4,
                temperature=1.0,
                greedy=True,
                batch_size=5,
                chat_template=True,
                seed=0,
                ks=[1, 4],
                split=split,
            )

    world, barrier = 3, threading.Barrier(3)
    posted, shares, results = [None] * world, {r: [] for r in range(world)}, {}

    def gather(rank, mine):
        posted[rank] = list(mine)
        shares[rank].append([start for start, _ in mine])
        barrier.wait()
        everyone = [b for part in posted for b in part]
        barrier.wait()  # all have read before the next gather overwrites
        return everyone

    def process(rank):
        results[rank] = run(Split(rank, world, lambda mine: gather(rank, mine)))

    whole = run(None)
    threads = [threading.Thread(target=process, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert shares == {0: [[0], [0]], 1: [[5], []], 2: [[10], []]}  # (sample batches, greedy batches) per process
    for rank in range(world):
        assert results[rank].metrics == whole.metrics
        assert results[rank].samples == whole.samples
