"""The `rlk2` console script: one entry, one subcommand per user task (DESIGN.md 2.1).

Every subcommand's arguments are declared here, so `rlk2 --help` and argument errors never import torch; the
command's module (`rlk2.train`, `rlk2.eval_checkpoints`, `rlk2.score`, `rlk2.serve`, `sandboxes.cli`) is imported
only to
run it. Errors the user caused (`UserError`, a reward named wrong) print as one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from rewards.engine import RewardError
from rlk2.errors import UserError
from rlk2.signals import exit_at_once_from_now
from sandboxes.cli import add_arguments as _sandbox_arguments


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=4")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="HF checkpoint dir, PEFT adapter dir, or rlk2 run dir (latest checkpoint; "
        "RUN_DIR:step-N for one step, RUN_DIR:start for the policy the run started from)",
    )
    parser.add_argument(
        "--tasks",
        help="comma-separated task names in configs/eval/ or .yaml paths "
        "(default: the run's own tasks when a run dir is given, else arith)",
    )
    parser.add_argument("--k", default="1,4,8", help="pass@k values, comma-separated (default 1,4,8)")
    parser.add_argument("--samples", type=int, help="samples per prompt, n >= every k (default: the largest k)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and the bootstrap (default 0)")
    parser.add_argument("--out", help="output directory (default evals/<date-time>)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N prompts of each task")
    parser.add_argument("--batch-size", type=int, default=256, help="sequences generated at once (default 256)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy pass@1 measurement")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--reward-workers", type=int, default=2, help="reward worker processes (default 2)")
    parser.add_argument(
        "--quantize",
        choices=["int4-experts"],
        help="round each checkpoint's routed experts to INT4 before evaluating (post-training quantization, "
        "K2-Thinking's scheme: symmetric, per group; see rlk2.qat)",
    )
    parser.add_argument(
        "--quantize-modules",
        default="experts",
        help="with --quantize: comma-separated modules whose weights are rounded (default experts; e.g. mlp)",
    )
    parser.add_argument("--quantize-group-size", type=int, default=32, help="with --quantize: group size (default 32)")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="HF checkpoint dir or rlk2 run dir (as for rlk2 eval)")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument(
        "--format",
        choices=["int4", "dequantized"],
        default="int4",
        help="int4: packed in the compressed-tensors format (default); dequantized: plain weights at INT4 values",
    )
    parser.add_argument(
        "--modules", help="comma-separated modules to quantize (default: the run's qat.modules, else experts)"
    )
    parser.add_argument("--group-size", type=int, help="INT4 group size (default: the run's qat.group_size, else 32)")


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reward",
        required=True,
        metavar="NAME",
        help="a built-in name (see `rlk2 rewards`), pkg.module:function, or an entry point",
    )
    parser.add_argument("--input", metavar="FILE", help="JSONL file of rows (default: stdin)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword option passed to the reward; VALUE is parsed as JSON when it can be",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="deadline per call (per sample for elementwise rewards such as math), default 10",
    )
    parser.add_argument("--workers", type=int, default=2, help="reward worker processes, 1..64 (default 2)")


def _episode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env", required=True, metavar="SPEC", help="pkg.module:Class, path/file.py:Class or an entry point"
    )
    parser.add_argument("--input", metavar="FILE", help='JSONL of {"row": {...}, "assistant": [...]} (default: stdin)')
    parser.add_argument("--tools", help="built-in tools to add, comma-separated (calculator, python)")
    parser.add_argument("--tool-parser", default="hermes", help="how tool calls are read from a turn (default hermes)")
    parser.add_argument("--tool-timeout", type=float, default=10.0, metavar="S", help="deadline per tool call (10)")
    parser.add_argument(
        "--reward", action="append", default=[], metavar="NAME", help="also score the last assistant message"
    )


def _rewards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="also describe these rewards (e.g. dotted paths)")
    parser.add_argument("--config", metavar="CONFIG", help="also describe the rewards that this training config names")
    parser.add_argument("--json", action="store_true", help="one JSON object per reward instead of a table")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="local Hugging Face checkpoint directory (or PEFT adapter)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the URL is printed)")
    parser.add_argument("--model-name", help="model id reported by /v1/models (default: the directory name)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max-batch", type=int, default=32, help="most sequences generated together (default 32)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="wait for more requests to batch")
    parser.add_argument(
        "--plain-prompts",
        action="store_true",
        help="for a tokenizer without a chat template: join the messages' contents as plain text",
    )
    parser.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request has none")
    parser.add_argument(
        "--weight-updates",
        action="store_true",
        help="accept POST /rlk2/weights (the trainer's weight push for `rollout.engine: server`)",
    )


# name -> (arguments, "module:function" that runs it, one-line help)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str, str]] = {
    "train": (_train_arguments, "rlk2.train:run", "run an RL fine-tune (no CONFIG = configs/demo.yaml)"),
    "score": (
        _score_arguments,
        "rlk2.score:run_score",
        "score JSONL rows offline with a reward: one JSON result line per input row",
    ),
    "episode": (
        _episode_arguments,
        "rlk2.replay:run",
        "replay scripted assistant turns through an environment: messages and reward per input line",
    ),
    "rewards": (
        _rewards_arguments,
        "rlk2.score:run_rewards",
        "list the available rewards and the dataset columns each one needs",
    ),
    "sandbox": (
        _sandbox_arguments,
        "sandboxes.cli:run",
        "sandboxes: build the image, check the backends (doctor), run JSONL jobs (exec), serve over HTTP",
    ),
    "serve": (
        _serve_arguments,
        "rlk2.serve:run",
        "serve a local checkpoint as an OpenAI-compatible endpoint (loopback); a rollout engine for rlk2 train",
    ),
    "export": (
        _export_arguments,
        "rlk2.export:run",
        "write a checkpoint for deployment with its experts in INT4 (compressed-tensors, or dequantized)",
    ),
    "eval": (
        _eval_arguments,
        "rlk2.eval_checkpoints:run",
        "evaluate checkpoints side by side: pass@k, maj@n, rewards, 95 %% intervals, report and plots",
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"rlk2: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlk2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_arguments, target, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"))
        add_arguments(sp)
        sp.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, function = args._target.partition(":")
    try:
        return int(getattr(importlib.import_module(module), function)(args) or 0)
    except (UserError, RewardError) as exc:
        print(f"rlk2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlk2 {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the process ends with the command: a signal during shutdown exits without a traceback
            exit_at_once_from_now()


if __name__ == "__main__":
    sys.exit(main())
