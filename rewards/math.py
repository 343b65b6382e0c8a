r"""The `math` reward: is the completion's final answer equal to the gold answer? Built on Math-Verify.

Per sample:
1. The gold answer (column `answer`, LaTeX or plain) is parsed first. A gold that does not parse makes the sample
   unscorable: `None` with error "unparsable gold" (a dataset problem, not the model's).
2. The prediction's answer is the content of its **last** `\boxed{...}` (or `\fbox{...}`), braces matched. With no
   box, Math-Verify's own fallbacks apply, rightmost match first: "final answer is ...", the last LaTeX
   environment (`$...$`, `\[...\]`), then the last plain number or expression.
3. Math-Verify's `verify(gold, prediction)` decides equality (numeric to 6 decimals, symbolic via sympy, sets,
   intervals, matrices, equations `x = 3` vs `3`). The verdict is cached by (gold, extracted answer), per process.

Scores: 1.0 equal, 0.0 not equal or no answer found; a prediction whose parse or comparison times out is 0.0
with error "timeout" (the model wrote something pathological, so it is the model's fault). Timeouts hold at two
levels: Math-Verify's own `signal.alarm` (seconds, interrupts pure-Python sympy work) inside the worker, and the
engine's process kill for what an alarm cannot interrupt (a C-level bignum power such as `10^{10^{10}}`).

Known limits (measured on tests/data/math_labelled.jsonl, see bench/math_accuracy.py):
- Equality is Math-Verify's: units and text are stripped, so `5 \text{ cm}` equals `5`; an unboxed completion
  is judged on whatever number comes last, which can be an intermediate value.
- Multiple-choice letters are compared as strings only when both sides parse as strings.
- The alarm has one-second resolution; sub-second deadlines come only from the engine.
- When the *gold* itself hangs in C (never seen in practice), the engine's kill charges the sample as a timeout
  of the prediction (0.0), because the kill cannot tell which side hung.
- The cache lives in each worker process; hit rates are per worker.

>>> math([r"... so the answer is $\boxed{\frac{1}{2}}$.", "I do not know.", r"\boxed{0.5}", r"\boxed{2}"],
...      prompts=[""] * 4, answer=["1/2", "1/2", r"\frac12", "1/2"])["rewards"]
[1.0, 0.0, 1.0, 0.0]
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from rewards.engine import reward_traits

_CACHE_SIZE = 16384
_BARE_ANSWER_CHARS = 300  # a completion this short with no math delimiters may be a bare LaTeX answer


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` / `\fbox{...}` in `text` (braces matched), or None.

    Written by hand because Math-Verify only returns an answer after parsing it, and the raw string is what the
    cache is keyed by and what the format reward checks.

    >>> last_boxed(r"first \boxed{1} then \boxed{\frac{a}{b}} end")
    '\\frac{a}{b}'
    >>> last_boxed(r"\boxed 7") is None, last_boxed(r"\boxed{unclosed") is None
    (True, True)
    """
    best: tuple[int, str] | None = None
    for marker in ("\\boxed{", "\\fbox{"):
        start = text.rfind(marker)
        while start != -1:
            depth, i = 1, start + len(marker)
            while i < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth == 0:
                if best is None or start > best[0]:
                    best = (start, text[start + len(marker): i - 1])
                break
            start = text.rfind(marker, 0, start)
    return best[1] if best else None


def _in_main_thread() -> bool:
    # Math-Verify's alarm-based timeouts only work in the main thread; elsewhere rely on the engine's kill.
    return threading.current_thread() is threading.main_thread()


def _alarm(timeout_s: int) -> int | None:
    return timeout_s if _in_main_thread() else None


def _configs() -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # boxed answers first (priority 0), then Math-Verify's anchors and last-match rules; the same for both sides
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


_LATEX_MARKS = ("\\", "{", "}", "^", "_", "=")


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_gold(gold: str, timeout_s: int) -> tuple:
    """Parsed gold: sympy objects (plus Math-Verify's string form), a lone string, or () when unusable."""
    from math_verify import parse

    delimited = any(m in gold for m in ("$", "\\boxed", "\\(", "\\["))
    # Bare LaTeX ("\frac{9}{7}", "x^2=1") is only found inside a math environment; bare plain text ("1,22",
    # "[1, 2, 3]") is read best by the expression extractor, exactly as a prediction would be.
    first = gold if delimited or not any(m in gold for m in _LATEX_MARKS) else f"${gold}$"
    parsed = parse(first, _configs(), parsing_timeout=_alarm(timeout_s), raise_on_error=True)
    if not delimited and not any(not isinstance(x, str) for x in parsed):
        other = f"${gold}$" if first == gold else gold
        retry = parse(other, _configs(), parsing_timeout=_alarm(timeout_s), raise_on_error=True)
        if any(not isinstance(x, str) for x in retry):
            parsed = retry
    if not parsed or (all(isinstance(x, str) for x in parsed) and not _balanced(gold)):
        return ()  # nothing extracted, or only a broken string: the dataset row is at fault
    return tuple(parsed)


_WORD = re.compile(r"[A-Za-z]{3,}")
_COMMAND = re.compile(r"\\(?:begin|end)\{[^}]*\}|\\[A-Za-z]+")


def _bare_math(text: str) -> bool:
    """A short completion with no math delimiters and no words outside LaTeX commands ("\\frac{x+2}{7}",
    "x = 10", "\\sec^2(y)"): the whole completion is the answer, written without `$...$`."""
    return (len(text) <= _BARE_ANSWER_CHARS and not any(m in text for m in ("$", "\\(", "\\["))
            and any(m in text for m in _LATEX_MARKS) and not _WORD.search(_COMMAND.sub(" ", text)))


def _parse_prediction(text: str, timeout_s: int) -> list:
    from math_verify import parse

    if _bare_math(text):
        # Math-Verify only reads LaTeX inside an environment; unwrapped it would take a fragment ("\\frac{2}{7}")
        wrapped = parse(f"${text.strip()}$", _configs(), parsing_timeout=_alarm(timeout_s), raise_on_error=True)
        if any(not isinstance(x, str) for x in wrapped):
            return wrapped
    return parse(text, _configs(), parsing_timeout=_alarm(timeout_s), raise_on_error=True)


def _exactly_different(gold: tuple, pred: list) -> bool:
    """True when both sides are exact rational numbers that differ. Math-Verify compares numbers after rounding
    to 6 decimals, which calls 1/2004! equal to 1/2006! (a reported false positive); exact values settle it."""
    g = next((x for x in gold if not isinstance(x, str)), None)
    p = next((x for x in pred if not isinstance(x, str)), None)
    if g is None or p is None:
        return False
    try:
        g, p = g.doit(), p.doit()
        return bool(g.is_Rational and p.is_Rational and g != p)
    except Exception:
        return False


def _equal(gold: tuple, pred: list, timeout_s: int) -> bool:
    """Math-Verify's verify, letting only its timeout through (with raise_on_error=True it would also re-raise
    sympy's own exceptions, which mean "not equal")."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if not pred:
        return False
    try:
        same = bool(verify(list(gold), pred, timeout_seconds=_alarm(timeout_s), raise_on_error=True))
    except TimeoutException:
        raise
    except Exception:
        same = bool(verify(list(gold), pred, timeout_seconds=_alarm(timeout_s), raise_on_error=False))
    return same and not _exactly_different(gold, pred)


_VERDICTS: OrderedDict[tuple[str, str], bool | str] = OrderedDict()  # (gold, extracted answer) -> equal


_TIMED_OUT = "timeout"


def _cached(key: tuple[str, str], compute: Callable[[], bool]) -> bool:
    """The cached verdict for key, computing it on a miss. A timeout is cached too (and re-raised on every hit):
    a policy repeats its answers across a group, and paying the deadline again for the same string buys nothing."""
    from math_verify.errors import TimeoutException

    if key in _VERDICTS:
        _VERDICTS.move_to_end(key)
        value = _VERDICTS[key]
    else:
        try:
            value = compute()
        except TimeoutException:
            value = _TIMED_OUT
        _VERDICTS[key] = value
        if len(_VERDICTS) > _CACHE_SIZE:
            _VERDICTS.popitem(last=False)
    if value is _TIMED_OUT:
        raise TimeoutException("timeout (cached)")
    return value


def check(gold: Any, completion: str, *, parse_timeout_s: int = 2,
          verify_timeout_s: int = 2) -> tuple[float | None, str | None]:
    """(score, error) for one sample; see the module docstring for the rules."""
    from math_verify.errors import TimeoutException

    gold_text = "" if gold is None else str(gold).strip()
    if not gold_text:
        return None, "empty gold"
    try:
        gold_parsed = _parse_gold(gold_text, parse_timeout_s)
    except TimeoutException:
        return None, "gold parse timeout"
    except Exception:
        gold_parsed = ()
    if not gold_parsed:
        return None, "unparsable gold"
    try:
        pred = _parse_prediction(completion, parse_timeout_s)
        if not pred:
            return 0.0, None
        # Math-Verify returns [parsed, matched string]: the matched string is the extracted answer
        return float(_cached((gold_text, str(pred[-1])), lambda: _equal(gold_parsed, pred, verify_timeout_s))), None
    except TimeoutException:
        return 0.0, "timeout"
    except (ValueError, TypeError, RecursionError, MemoryError, OverflowError):
        return 0.0, None  # the prediction is not valid maths: not equal


@reward_traits(elementwise=True, timeout_score=0.0)
def math(completions: list[str], *, prompts: list[str] | None = None, answer: list[Any],
         parse_timeout_s: int = 2, verify_timeout_s: int = 2) -> dict:
    """1.0 if the final answer (last \\boxed{}, else Math-Verify's fallbacks) equals `answer`, else 0.0."""
    scores: list[float | None] = []
    errors: list[str | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        score, error = check(gold, completion, parse_timeout_s=parse_timeout_s, verify_timeout_s=verify_timeout_s)
        scores.append(score)
        errors.append(error)
    return {"rewards": scores, "errors": errors}
