"""The `rlk2` console script: one entry, one subcommand per user task (DESIGN.md 2.1).

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
dispatches, so a command's heavy imports (torch, transformers, docker) load only when that command runs.
Errors the user caused (`UserError`, bad config) print as one line and exit 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). A command module keeps heavy imports inside its functions: every module
# here is imported to build the parser, so `rlk2 --help` must stay fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rlk2.train", "run an RL fine-tune (no CONFIG = configs/demo.yaml)"),
    "score": ("rlk2.cli_rewards", "score JSONL rows offline with a reward: one JSON result line per input line"),
    "rewards": ("rlk2.cli_rewards", "list the available rewards and the dataset columns each one needs"),
    "sandbox": ("sandboxes.cli", "sandboxes: build the image, check the backends (doctor), run JSONL jobs (exec), serve over HTTP"),
    "serve": ("rlk2.serve", "serve a local checkpoint as an OpenAI-compatible chat-completions endpoint (loopback)"),
    "eval": ("rlk2.evaluate", "evaluate checkpoints side by side: pass@k, maj@n, rewards, 95 %% intervals, report and plots"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"rlk2: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlk2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"))
        module = importlib.import_module(module_name)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(sp)
        sp.set_defaults(_module=module_name, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rewards.engine import RewardError  # a reward named wrong, a column missing: the user's mistake too
    from rlk2.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    runner = getattr(module, f"run_{args._name}", None) or module.run
    try:
        return int(runner(args) or 0)
    except (UserError, RewardError) as exc:
        print(f"rlk2 {args._name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlk2 {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
