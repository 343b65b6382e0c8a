"""The project's one JSONL reader: data files, `rlk2 score` input, `rlk2 sandbox exec` jobs.

One rule for every caller: a blank line (only whitespace) is not a row and is skipped; every other line must be a
JSON object in UTF-8, and a line that is not one is a `JsonlError` naming the source and the line number. Strings
must be valid Unicode (a lone surrogate escape such as "\\ud800" is refused here, not at the first write).
It lives in `sandboxes`, the bottom layer that `rewards` and `rlk2` may both import, and uses the standard library
only, so each package keeps working on its own.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A line that is not a JSON object, or a file that cannot be read; one line naming source:line."""


def iter_jsonl(lines: Iterable[str | bytes], source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line of `lines` (text or UTF-8 bytes)."""
    for lineno, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise JsonlError(f"{source}:{lineno}: not UTF-8 text (byte {exc.start + 1})") from None
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise JsonlError(f"{source}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise JsonlError(f"{source}:{lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise JsonlError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonlError(f"{source}:{lineno}: a string holds an invalid \\u escape (a lone surrogate)") from None
        yield lineno, row


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every row of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise JsonlError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            return list(iter_jsonl(fh, str(path)))
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated / corrupt gzip stream
        raise JsonlError(
            f"{path}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
