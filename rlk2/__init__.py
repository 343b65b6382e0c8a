"""rlk2: RL post-training the way Kimi K2 was post-trained (DESIGN.md).

The training system, read top to bottom from `train.py`:

    cli.py          `rlk2 train | eval | export | score | rewards | serve | sandbox`: the arguments; each command's
                    module runs
    config.py       the config tree (frozen dataclasses, docstring per field), its one OmegaConf loader and range checks
    train.py        THE loop: setup() -> Run, then generate / score / refine_critic / advantages / update / log
    tasks.py        a run's tasks: training rows, reward specs, the held-out evaluation task, how each is scored
    data.py         built-in synthetic tasks, dataset files, the prompt sampler (uniform or prioritized)
    algorithms.py   advantages and policy losses (k2, grpo, dr_grpo, dapo, gspo): pure functions in a dict
    controls.py     K2 training controls: temperature decay, success counts, zero-std filtering, PTX
    moe.py          router health, auxiliary-loss-free balancing, router replay
    qat.py          quantization-aware training: expert weights read as INT4 (K2-Thinking), straight-through
    sharding.py     FSDP2: the policy sharded per decoder layer, whole weights for rollouts, gathered checkpoints
    distributed.py  data parallel (DDP) rules: N processes take the same steps as one
    run_dir.py      everything under runs/<name>/: config, env, metrics, rollouts, checkpoints (save and restore)
    signals.py      Ctrl-C / SIGTERM finish the step, checkpoint and exit
    score.py        `rlk2 score` and `rlk2 rewards`
    serve.py        `rlk2 serve`: a checkpoint as an OpenAI-compatible endpoint
    testing.py      fixtures for tests and benchmarks
    rollout/        the one generation seam: batch, prompt encoding, sampling, decoders, training log-probs
    policy/         loading checkpoints, the demo MoE and its tokenizer, the supervised warm start
    optim/          MuonClip (Muon + QK-Clip) and the optimizer factory
    critic/         critic backends on the live policy and closed-loop critic refinement
    eval_checkpoints.py  `rlk2 eval`: checkpoints and run directories evaluated side by side
    export.py       `rlk2 export`: a checkpoint with its experts in INT4 (compressed-tensors) or dequantized
    eval/           metrics and intervals, evaluation, task files, reports and plots

Imports go one way: `rlk2 -> rewards -> sandboxes` (import-linter contracts in pyproject.toml); `rewards` and
`sandboxes` are usable alone.
"""
