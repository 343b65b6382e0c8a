"""The shape of the code (DESIGN.md 1): layering that no import, not even through a string, breaks; a CLI that
parses without torch; functions short enough to read at once. (Import cycles and static layering are checked by
`lint-imports` in CI: the contracts are in pyproject.toml.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 120


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


BLOCK_RLK2 = """
import importlib.abc, sys
class NoRlk2(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rlk2" or name.startswith("rlk2."):
            raise ImportError(f"{name} is not allowed here")
sys.meta_path.insert(0, NoRlk2())
"""


def test_the_rubric_reward_works_without_rlk2():
    code = (
        BLOCK_RLK2
        + """
from rewards.rubric import Reply, rubric
import rewards, sandboxes
class Scripted:
    def complete(self, prompts, **_):
        return [Reply("A reads better\\nVerdict: A")] * len(prompts)
print(rubric(["x", "y"], prompts=["p", "p"], backend=Scripted())["rewards"])
print(sorted(rewards.REWARDS))
"""
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == "[0.5, 0.5]"


def test_the_blocker_would_catch_an_import_of_rlk2():  # the test above could not pass vacuously
    proc = _python(BLOCK_RLK2 + "import rlk2.config")
    assert proc.returncode != 0 and "not allowed" in proc.stderr


@pytest.mark.parametrize("package", ["rewards", "sandboxes"])
def test_lower_layers_name_no_rlk2_module_in_strings(package):
    """A dotted module path to rlk2 in a string (`"rlk2.critic:SelfCritic"`, `import_module("rlk2...")`) is an
    upward import that import-linter cannot see."""
    pattern = re.compile(r"""["']rlk2\.[A-Za-z_][\w.]*(:\w+)?["']""")
    found = []
    for path in (ROOT / package).rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "rlk2.rewards" not in line:  # `rlk2.rewards`: the entry-point group name
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_cli_parses_without_importing_torch():
    proc = _python("import sys; from rlk2.cli import build_parser; build_parser().parse_args(['train', '--help'])")
    assert proc.returncode == 0 and "--resume" in proc.stdout
    proc = _python(
        "import sys; from rlk2.cli import build_parser; "
        "build_parser().parse_args(['eval', 'ckpt']); print('torch' in sys.modules)"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_rlk2_is_longer_than_a_screenful():
    long = [
        f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for p in (ROOT / "rlk2").rglob("*.py")
        for name, line, n in _functions(p)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)
