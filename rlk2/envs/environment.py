"""Environments (DESIGN.md 2.6): resolving `env:` specs, checking the class, and the tools it offers.

An environment is a class; one instance plays one episode. `reset(**row)` gives the first user message (a string)
or the first messages; every other public method is a tool, described to the model by the JSON schema
transformers builds from its signature and docstring (`get_json_schema`, the form chat templates take as
`tools=`); an optional `reward(messages, **row)` scores the episode. Everything a user can get wrong about the class
is found here, at start-up, as one line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import get_json_schema

from rlk2.envs.tools import BUILTIN_TOOLS, PARSERS, ToolCall
from rlk2.errors import UserError

_NOT_TOOLS = {"reset", "reward", "close"}


@dataclass
class EnvSpec:
    """A checked environment class plus the built-in tools its task adds."""

    cls: type
    name: str
    tool_names: list[str]
    """The class's own tools (public methods), then the task's built-in tools."""
    builtin: dict[str, Callable] = field(default_factory=dict)
    schemas: list[dict] = field(default_factory=list)
    parse: Callable[[str], list[ToolCall]] = PARSERS["hermes"]

    @property
    def has_reward(self) -> bool:
        return callable(getattr(self.cls, "reward", None))

    def tool(self, env: object, name: str) -> Callable | None:
        """The callable for tool `name` on instance `env`, or None when there is no such tool."""
        if name in self.builtin:
            return self.builtin[name]
        return getattr(env, name) if name in self.tool_names else None


def load_env(spec: str, *, tools: list[str] = (), parser: str = "hermes", where: str = "env") -> EnvSpec:
    """The environment class `spec` names (`pkg.module:Class`, `path/file.py:Class`, or an entry point in group
    `rlk2.envs`), checked, with its tools' schemas and the built-in `tools` added; one-line UserError otherwise."""
    cls = _resolve(spec, where)
    if not isinstance(cls, type):
        raise UserError(f"{where}: {spec!r} is not a class (an environment is a class with a reset method)")
    if not callable(getattr(cls, "reset", None)):
        raise UserError(f"{where}: {spec!r} has no reset(**row) method, so it is not an environment")
    if parser not in PARSERS:
        raise UserError(f"{where}: tool_parser '{parser}' is unknown (have: {', '.join(PARSERS)})")
    own = [
        name
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_") and name not in _NOT_TOOLS and not isinstance(member, type)
    ]
    unknown = [t for t in tools if t not in BUILTIN_TOOLS]
    if unknown:
        raise UserError(f"{where}: tools: '{unknown[0]}' is not a built-in tool (have: {', '.join(BUILTIN_TOOLS)})")
    clash = [t for t in tools if t in own]
    if clash:
        raise UserError(f"{where}: tools: '{clash[0]}' is also a method of {cls.__name__}; drop one of the two")
    schemas = []
    for name in own:
        schemas.append(_schema(getattr(cls, name), f"{where}: tool {cls.__name__}.{name}"))
    for name in tools:
        schemas.append(_schema(BUILTIN_TOOLS[name], f"{where}: built-in tool {name}"))
    return EnvSpec(
        cls,
        spec,
        own + list(tools),
        builtin={t: BUILTIN_TOOLS[t] for t in tools},
        schemas=schemas,
        parse=PARSERS[parser],
    )


def _schema(fn: Callable, where: str) -> dict:
    try:
        return get_json_schema(fn)
    except Exception as exc:  # transformers' DocstringParsingException / TypeHintParsingException
        raise UserError(
            f"{where}: {' '.join(str(exc).split())} (a tool needs a docstring with an Args: section)"
        ) from None


def _resolve(spec: str, where: str) -> object:
    if ":" not in spec:
        eps = [ep for ep in importlib.metadata.entry_points(group="rlk2.envs") if ep.name == spec]
        if not eps:
            raise UserError(
                f"{where}: {spec!r} is neither `pkg.module:Class`, `path/file.py:Class` nor an entry point in group "
                "rlk2.envs"
            )
        try:
            return eps[0].load()
        except Exception as exc:
            raise UserError(f"{where}: entry point {spec!r} failed to load: {type(exc).__name__}: {exc}") from None
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"{where}: {path} does not exist")
            name = f"rlk2_env_{path.stem}"
            module = sys.modules.get(name)
            if module is None or Path(getattr(module, "__file__", "")).resolve() != path.resolve():
                # Loaded once per process: the class must stay the same object (pickling paused episodes in a
                # checkpoint looks it up by name), however many tasks and evaluations name the file.
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module  # dataclasses and pickling look modules up by name
                mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{where}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise UserError(f"{where}: {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
