"""Rubrics and the critic prompt template, as data: loading and validation for the `rubric` reward.

The TOML files in this directory are the shipped rubric sets (`core`, `prescriptive`: Kimi K2's). A rubric file,
TOML or YAML, is a list of `rubric` tables::

    [[rubric]]
    name = "no_initial_praise"       # unique identifier: letters, digits, _ - .
    title = "No initial praise"      # shown to the critic
    description = "The reply does not open by complimenting the user or the question."
    weight = 1.0                     # > 0, relative importance (default 1)
    mandatory = true                 # optional: breaking it loses the comparison (default false)

Every mistake is a `RubricError` whose one line names the file, the rubric and the field. The template is a
text file with the placeholders `{prompt}`, `{response_a}`, `{response_b}` (required), `{rubrics}` and
`{rubric_names}`; the default is `rewards/critic_prompt.txt`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.traits import RewardError

RUBRIC_DIR = Path(__file__).resolve().parent
DEFAULT_TEMPLATE = RUBRIC_DIR.parent / "critic_prompt.txt"
DEFAULT_RUBRICS = ("core", "prescriptive")
PLACEHOLDERS = ("prompt", "response_a", "response_b", "rubrics", "rubric_names")
_REQUIRED = ("prompt", "response_a", "response_b")


class RubricError(RewardError):
    """A rubric file, template or option is invalid. One line naming the file and field."""


# ------------------------------------------------------------------------------------------------ rubrics
@dataclass(frozen=True)
class Rubric:
    name: str
    title: str
    description: str
    weight: float = 1.0
    mandatory: bool = False
    source: str = ""


_FIELDS = {"name": str, "title": str, "description": str, "weight": float, "mandatory": bool}


def _read_table(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # the parser's message has the line number
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RubricError(f"{path}: not valid {path.suffix[1:].upper()}: {first}") from None


def load_rubric_file(path: str | Path) -> list[Rubric]:
    """Rubrics of one TOML / YAML file (`rubric` = a list of tables); every mistake is one line with the field."""
    path = Path(path)
    if not path.is_file():
        raise RubricError(f"{path}: rubric file not found")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise RubricError(f"{path}: a rubric file is .toml, .yaml or .yml, not {path.suffix or 'no suffix'}")
    data = _read_table(path)
    if not isinstance(data, dict) or "rubric" not in data:
        raise RubricError(f"{path}: expected a list of [[rubric]] tables (key 'rubric')")
    extra = sorted(set(data) - {"rubric"})
    if extra:
        raise RubricError(f"{path}: unknown top-level key {extra[0]!r} (only 'rubric')")
    entries = data["rubric"]
    if not isinstance(entries, list) or not entries:
        raise RubricError(f"{path}: 'rubric' must be a non-empty list of tables")
    out = []
    for i, entry in enumerate(entries, start=1):
        where = f"{path}: rubric #{i}"
        if not isinstance(entry, dict):
            raise RubricError(f"{where}: expected a table, got {type(entry).__name__}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        for key in entry:
            if key not in _FIELDS:
                raise RubricError(f"{where}.{key}: unknown field (fields: {', '.join(_FIELDS)})")
        for key in ("name", "title", "description"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise RubricError(f"{where}.{key}: required, a non-empty string")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry["name"]):
            raise RubricError(f"{where}.name: use letters, digits, '_', '-' or '.' only")
        weight = entry.get("weight", 1.0)
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not (weight > 0 and math.isfinite(weight)):
            raise RubricError(f"{where}.weight: must be a number > 0, got {weight!r}")
        mandatory = entry.get("mandatory", False)
        if not isinstance(mandatory, bool):
            raise RubricError(f"{where}.mandatory: must be true or false, got {mandatory!r}")
        out.append(
            Rubric(
                entry["name"],
                entry["title"].strip(),
                " ".join(entry["description"].split()),
                float(weight),
                mandatory,
                str(path),
            )
        )
    return out


def rubric_path(spec: str | Path) -> Path:
    """A shipped set by name (`core` -> rubrics/core.toml) or a path to a .toml / .yaml / .yml file."""
    spec = str(spec)
    if spec.endswith((".toml", ".yaml", ".yml")) or "/" in spec:
        return Path(spec)
    path = RUBRIC_DIR / f"{spec}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RUBRIC_DIR.glob("*.toml")))
        raise RubricError(f"rubrics: no shipped rubric set {spec!r} (shipped: {known}; or give a .toml/.yaml path)")
    return path


def load_rubrics(specs: Sequence[str | Path] | str = DEFAULT_RUBRICS) -> list[Rubric]:
    """All rubrics of the named sets / files, in order; a name defined twice is an error naming both files."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    if not specs:
        raise RubricError("rubrics: at least one rubric set or file is required")
    out: list[Rubric] = []
    seen: dict[str, str] = {}
    for spec in specs:
        for r in load_rubric_file(rubric_path(spec)):
            if r.name in seen:
                raise RubricError(f"{r.source}: rubric {r.name!r} is already defined in {seen[r.name]}")
            seen[r.name] = r.source
            out.append(r)
    return out


def render_rubrics(rubrics: Sequence[Rubric]) -> str:
    """The rubric list as the template's `{rubrics}`: mandatory ones first, one bullet each."""
    ordered = sorted(rubrics, key=lambda r: not r.mandatory)  # stable: file order within each kind
    lines = []
    for r in ordered:
        tag = ", MANDATORY" if r.mandatory else ""
        lines.append(f"- {r.title} [{r.weight:g}{tag}]: {r.description}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ template
_SLOT = re.compile(r"\{(\w+)\}")


def load_template(path: str | Path | None = None) -> str:
    """The critic prompt template; unknown or missing placeholders are one-line errors naming the file."""
    path = Path(path) if path else DEFAULT_TEMPLATE
    if not path.is_file():
        raise RubricError(f"template: {path} not found")
    text = path.read_text(encoding="utf-8")
    used = set(_SLOT.findall(text))
    unknown = sorted(used - set(PLACEHOLDERS))
    if unknown:
        raise RubricError(f"{path}: unknown placeholder {{{unknown[0]}}} (known: {', '.join(PLACEHOLDERS)})")
    missing = [p for p in _REQUIRED if p not in used]
    if missing:
        raise RubricError(f"{path}: placeholder {{{missing[0]}}} is required")
    return text


def fill_template(template: str, values: dict[str, str]) -> str:
    # One pass by hand instead of str.format: responses contain braces (`\boxed{4}`), and an inserted value must
    # never be expanded again.
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), template).strip()
