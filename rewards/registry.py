"""The reward registry: names -> functions (`REWARDS`, dotted paths, files, entry points) and the columns each needs."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from rewards.format import budget, env_reward, format_reward, length_reward
from rewards.math import math as _math  # aliased: binding `math` here would shadow the submodule rewards.math
from rewards.traits import RewardError

ENTRY_POINT_GROUP = "rlk2.rewards"


class _LazyReward:
    """A REWARDS entry whose module is imported on first use.

    `code` lives in `rewards.code`, which pulls in the sandbox client (docker SDK); `import rewards` must stay
    cheap and must work on hosts without it, so the entry only names its target until someone resolves it.
    """

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr
        self.__name__ = attr
        self.__qualname__ = attr

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<reward {self.module}:{self.attr} (loaded on first use)>"


REWARDS: dict[str, Callable] = {
    "math": _math,
    "format": format_reward,
    "length": length_reward,
    "budget": budget,
    "env": env_reward,
    "code": _LazyReward("rewards.code", "code"),
    "rubric": _LazyReward("rewards.rubric", "rubric"),
    "ifeval": _LazyReward("rewards.ifeval", "ifeval"),
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load(name: str, what: Callable[[], Any]) -> Callable:
    try:
        fn = what()
    except RewardError:
        raise
    except Exception as exc:  # an import error inside the user's module: say which reward, keep it one line
        raise RewardError(f"reward {name!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise RewardError(f"reward {name!r} is not callable (got {type(fn).__name__})")
    return fn


def _import_file(name: str, path: str) -> Any:
    """Imports `path/to/file.py` (for `rlk2 score --reward my_rewards.py:fn` before the code is a package)."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise RewardError(f"reward {name!r}: no file {path!r}")
    module_name = f"_rlk2_reward_file_{abs(hash(full)):x}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, full)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before exec: dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


def resolve_reward(name: str) -> Callable:
    """The function for a reward name: a key of `REWARDS`, `pkg.module:function`, `path/to/file.py:function`
    (relative to the working directory), or an entry point in group `rlk2.rewards`.

    >>> resolve_reward("math").__name__
    'math'
    >>> resolve_reward("rewards.format:format_reward").__name__
    'format_reward'
    """
    if not isinstance(name, str) or not name.strip():
        raise RewardError(f"reward name must be a non-empty string, got {name!r}")
    if name in REWARDS:
        entry = REWARDS[name]
        return _load(name, entry.load if isinstance(entry, _LazyReward) else lambda: entry)
    if ":" in name:
        module_name, _, attr = name.partition(":")

        def load() -> Any:
            if module_name.endswith(".py"):
                module = _import_file(name, module_name)
            else:
                try:
                    module = importlib.import_module(module_name)
                except ModuleNotFoundError as exc:
                    if exc.name and module_name.startswith(exc.name):
                        raise RewardError(f"reward {name!r}: no module named {module_name!r}") from exc
                    raise
            try:
                obj: Any = module
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                raise RewardError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}") from None
            return obj

        return _load(name, load)
    eps = _entry_points()
    if name in eps:
        return _load(name, eps[name].load)
    known = sorted(set(REWARDS) | set(eps))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(known)}"
    raise RewardError(f"unknown reward {name!r} (not in REWARDS, not 'module:function', no entry point){hint}")


def check_signature(fn: Callable, name: str) -> None:
    """A reward is called as `fn(completions, prompts=..., <columns>=...)`: one positional argument for the
    completions is required. Raises RewardError naming the reward otherwise (a builtin we cannot inspect passes).

    >>> check_signature(lambda completions, **columns: [], "ok")
    >>> try:
    ...     check_signature(lambda: [], "bad")
    ... except RewardError as exc:
    ...     print(exc)
    reward 'bad' cannot take the completions: expected def bad(completions, *, prompts, **columns)
    """
    if isinstance(fn, _LazyReward):
        fn = fn.load()
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    extra = [p for p in positional[1:] if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if not positional or extra:
        raise RewardError(
            f"reward {name!r} cannot take the completions: expected def {name.rsplit(':', 1)[-1]}"
            "(completions, *, prompts, **columns)"
        )


def required_columns(fn: Callable) -> list[str]:
    """Dataset columns a reward needs: its keyword parameters without a default, other than `prompts`.

    Positional-or-keyword parameters after `completions` count too (TRL-style `def r(completions, answer, **kw)`).

    >>> def r(completions, *, prompts, answer, binary=True, **columns): ...
    >>> required_columns(r)
    ['answer']
    """
    if isinstance(fn, _LazyReward):
        fn = fn.load()
    params = list(inspect.signature(fn).parameters.values())
    out = []
    for i, p in enumerate(params):
        if i == 0 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue  # completions
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty and p.name != "prompts":
            out.append(p.name)
    return out


def list_rewards() -> list[tuple[str, str, list[str] | None, str]]:
    """(name, source, required columns or None if it cannot be loaded, note) for every registered reward."""
    rows: list[tuple[str, str, list[str] | None, str]] = []
    for name, entry in REWARDS.items():
        source = (
            f"{entry.module}:{entry.attr}" if isinstance(entry, _LazyReward) else f"{entry.__module__}:{entry.__name__}"
        )
        rows.append((name, f"built-in ({source})", *describe_reward(name)))
    for name, ep in sorted(_entry_points().items()):
        if name not in REWARDS:
            rows.append((name, f"entry point ({ep.value})", *describe_reward(name)))
    return rows


def describe_reward(name: str) -> tuple[list[str] | None, str]:
    """(required columns, first docstring line) of a reward, or (None, why it cannot be loaded)."""
    try:
        fn = resolve_reward(name)
    except RewardError as exc:
        return None, str(exc)
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return required_columns(fn), doc[0] if doc else ""
