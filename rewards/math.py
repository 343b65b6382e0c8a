r"""The `math` reward: is the completion's final answer equal to the gold answer? Built on Math-Verify.

Per sample:
1. The gold answer (column `answer`, LaTeX or plain) is parsed first, once per distinct gold. Bare LaTeX
   (`\frac{9}{7}`) is read inside `$...$`, plain text (`1,22`, `[1, 2, 3]`) by Math-Verify's expression reader. A
   gold from which nothing can be extracted (or only a broken string such as `\frac{`) makes the sample
   unscorable: `None` with error "unparsable gold" (a dataset problem, not the model's).
2. The prediction's answer is extracted by Math-Verify with boxed answers first: the **last** `\boxed{...}`
   (adjacent boxes such as `\boxed{1}, \boxed{2}` form one set), else its fallbacks, rightmost first: "final
   answer is ...", the last LaTeX environment, the last plain number or expression. A short completion that is
   only a bare LaTeX answer (`\frac{x+2}{7}`) is read as math.
3. Math-Verify's `verify` decides equality (numbers to 6 decimals, symbolic via sympy, sets, intervals,
   matrices, `x = 3` vs `3`), plus one guard of ours: two exact rationals must be exactly equal (rounding alone
   calls 1/2004! equal to 1/2006!, a reported false positive). The verdict is cached by (gold, extracted answer).
   A plain-integer gold against one boxed plain integer (`42` vs `\boxed{42}`) is decided by integer equality
   without the parsers: Math-Verify's verdict on such pairs, at a hundredth of the cost (and against a completion
   with no letter or digit at all, `\boxed{}`, the verdict is 0.0 without them too).

Scores: 1.0 equal, 0.0 not equal or no answer found; a prediction whose parse or comparison runs past the
deadline is 0.0 with error "timeout" (the model wrote something pathological, so it is the model's fault).
The deadline holds at two levels: a sub-second `setitimer` alarm around each check inside the worker
(`check_timeout_s`; Math-Verify's own alarm has whole-second resolution), and the engine's process kill for
anything an alarm cannot interrupt (a long computation inside a C call that never checks for signals).

Measured on tests/data/math_labelled.jsonl (312 pairs; `python bench/bench_math_accuracy.py`): this reward
misjudges fewer pairs than `verify(parse(gold), parse(pred))`. Known limits, each a row of that set:
- Rounded answers to a stated precision (`0.33` for 1/3) are wrong at 6 decimals; tuples mixing floats and
  fractions (`(1,4.5)` vs `(1,\frac92)`) do not match.
- Sequences with `\ldots` and ratios `1:2:3` are read as strings or fragments and can match wrongly; `1 - 1/e`
  vs `1 + 1/e` written with `\mathrm{e}` is a false positive inherited from Math-Verify.
- `\sqrt(2)` (not LaTeX) is read as `\sqrt{}` of nothing; `\sqrt{1/n}` vs `1/\sqrt{n}` is not proved equal
  (sympy does not assume n > 0); an interval gold vs an inequality prediction is not compared (Math-Verify's
  deliberate asymmetry).
- Units and text are stripped (`5 \text{ cm}` equals `5`); an unboxed completion is judged on the last number;
  a percent written outside the box (`\boxed{28}$ pct` for 28%) is not matched.
- A timeout verdict is cached like any other: a check that timed out under heavy load stays 0.0 for the same
  (gold, answer) in that worker. The cache lives in each worker process.
- A completion with brackets nested deeper than 64 levels scores 0.0 ("too deeply nested") without being
  parsed: such nesting made the parsers' recursion, and so the verdict, depend on machine load.
- When the *gold* hangs inside one C call (never seen in practice), the engine's kill charges the sample as a
  prediction timeout (0.0), because the kill cannot tell which side hung.

>>> math([r"... so the answer is $\boxed{\frac{1}{2}}$.", "I do not know.", r"\boxed{0.5}", r"\boxed{2}"],
...      prompts=[""] * 4, answer=["1/2", "1/2", r"\frac12", "1/2"])["rewards"]
[1.0, 0.0, 1.0, 0.0]
"""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from rewards.traits import reward_traits

_CACHE_SIZE = 16384
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# what may sit between two boxes of one answer: punctuation, math delimiters, spacing, "and"/"or", "x_2 =",
# a short \text{...} ("\text{ for part (a) and }")
_CONNECTOR = re.compile(
    r"(?:\s|[,;.$]|\\[()\[\]]|\\q?quad|\\text\{[^{}]{0,40}\}|\band\b|\bor\b"
    r"|[A-Za-z](?:_\{?\w+\}?)?\s*=){0,12}"
)
_PERCENT = re.compile(r"\s*\$?\s*(?:\\%|%|percent\b|pct\b)")
_LATER_ANSWER = re.compile(r"final answer", re.IGNORECASE)
_MAX_DIGITS = 20_000  # longest integer literal read in the main thread (Python's default stops at 4,300)
_BARE_ANSWER_CHARS = 300  # a completion this short with no math delimiters may be a bare LaTeX answer


def _boxes(text: str) -> list[tuple[int, int]]:
    """(start, end) of every complete `\\boxed{...}` / `\\fbox{...}` in text, braces matched, in order."""
    spans = []
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            spans.append((m.start(), i))
    return spans


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` / `\fbox{...}` in `text` (braces matched), or None.

    >>> last_boxed(r"first \boxed{1} then \boxed{\frac{a}{b}} end")
    '\\frac{a}{b}'
    >>> last_boxed(r"\boxed 7") is None, last_boxed(r"\boxed{unclosed") is None
    (True, True)
    """
    spans = _boxes(text)
    if not spans:
        return None
    start, end = spans[-1]
    return text[text.index("{", start) + 1 : end - 1]


def answer_span(text: str) -> str | None:
    r"""The final answer region: the last box, together with the boxes right before it that are joined only by
    connectors (`, `, `and`, `\quad`, `y_2 =`): `\boxed{2}, \boxed{3}` is the set {2, 3}, while an earlier box
    that the text moved on from is left out. None when the text has no box, or states a "final answer" after
    its last box (then Math-Verify's own anchors decide).

    Written by hand because Math-Verify, given the whole completion, merges every box of an anchored passage
    ("first try \boxed{5} ... Final answer: \boxed{3}" reads as {3, 5}), and the region is also the cache key.

    >>> answer_span(r"try \boxed{5}, no. Final answer: \boxed{3}")
    '\\boxed{3}'
    >>> answer_span(r"$\boxed{2} \quad \text{and} \quad \boxed{3}$")
    '\\boxed{2} \\quad \\text{and} \\quad \\boxed{3}'
    """
    spans = _boxes(text)
    if not spans or _LATER_ANSWER.search(text, spans[-1][1]):
        return None  # no box, or the text states its final answer after the last box: Math-Verify's anchors
    first = len(spans) - 1
    while first > 0 and _CONNECTOR.fullmatch(text[spans[first - 1][1] : spans[first][0]]):
        first -= 1
    unit = _PERCENT.match(text, spans[-1][1])  # "\boxed{28}$ pct" keeps its percent sign
    return text[spans[first][0] : unit.end() if unit else spans[-1][1]]


def _in_main_thread() -> bool:
    # Signal-based deadlines only work in the main thread; elsewhere the engine's process kill is the deadline.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raises Math-Verify's TimeoutException after `seconds` (sub-second, unlike Math-Verify's `signal.alarm`).

    Written here because the library's own timeout takes whole seconds only, and a pathological answer should
    cost a fraction of a second, not two. Math-Verify's parse/verify re-raise this exception as a timeout.
    """
    from math_verify.errors import TimeoutException

    if seconds <= 0 or not _in_main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutException("check deadline")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _no_library_alarm() -> None:
    # We pass timeout=None to Math-Verify (our deadline replaces its alarm); it then warns once per process that
    # the caller must provide a timeout. We do, so mark the warning as shown.
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True


def _configs() -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # boxed answers first (priority 0), then Math-Verify's anchors and last-match rules; the same for both sides
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _is_math(parsed: list) -> bool:
    return any(not isinstance(x, str) for x in parsed)


def _covered(parsed: list) -> int:
    return len("".join(str(parsed[-1]).split()))  # characters of the matched string, spacing aside ("1 000")


def _read_bare(text: str) -> list:
    """Reads a text with no math delimiters both as plain text and inside `$...$`, keeping the reading whose
    extracted string covers more of it: "(1, 2]" is an interval, not the 2 the plain reader finds, while
    "1,22" stays the decimal 1.22. Gold and bare predictions go through this same rule, so they agree."""
    from math_verify import parse

    best: list = []
    for candidate in (text, f"${text.strip()}$"):
        parsed = parse(candidate, _configs(), parsing_timeout=None, raise_on_error=True)
        if _is_math(parsed) and (not best or _covered(parsed) > _covered(best)):
            best = parsed
    return best


_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_gold(gold: str) -> tuple:
    """Parsed gold: sympy objects (plus Math-Verify's string form), a lone string, or () when unusable."""
    from math_verify import parse

    parsed = parse(gold, _configs(), parsing_timeout=None, raise_on_error=True)
    if not any(m in gold for m in _DELIMITERS):
        parsed = _read_bare(gold) or parsed
    if not parsed or (not _is_math(parsed) and not _balanced(gold)):
        return ()  # nothing extracted, or only a broken string: the dataset row is at fault
    return tuple(parsed)


_WORD = re.compile(r"[A-Za-z]{3,}")
_COMMAND = re.compile(r"\\(?:begin|end)\{[^}]*\}|\\[A-Za-z]+")


def _bare_answer(text: str) -> bool:
    """A short completion with no math delimiters and no words outside LaTeX commands ("\\frac{x+2}{7}",
    "x = 10", "[1, 2, 3]"): the whole completion is the answer, written without `$...$`."""
    return (
        len(text) <= _BARE_ANSWER_CHARS
        and not any(m in text for m in _DELIMITERS)
        and not _WORD.search(_COMMAND.sub(" ", text))
    )


def _parse_prediction(text: str) -> list:
    from math_verify import parse

    if _bare_answer(text):
        # Math-Verify reads LaTeX only inside an environment; unwrapped it would take a fragment ("\\frac{2}{7}")
        bare = _read_bare(text)
        if bare:
            return bare
    return parse(text, _configs(), parsing_timeout=None, raise_on_error=True)


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


def _equal(gold: tuple, pred: list) -> bool:
    """Math-Verify's verify, letting only its timeout through (with raise_on_error=True it would also re-raise
    sympy's own exceptions, which mean "not equal")."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if not pred:
        return False
    try:
        same = bool(verify(list(gold), pred, timeout_seconds=None, raise_on_error=True))
    except TimeoutException:
        raise
    except Exception:
        same = bool(verify(list(gold), pred, timeout_seconds=None, raise_on_error=False))
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


_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,999})")
_BOXED_INTEGER = re.compile(r"\\boxed\{\s*(-?(?:0|[1-9][0-9]{0,999}))\s*\}")


def _same_integer(gold: str, span: str) -> bool | None:
    """The verdict when the gold is a plain integer and the answer span is one boxed plain integer (no leading
    zeros, no sign but minus, no separators), else None. Such pairs are most answers of counting and arithmetic
    tasks, and Math-Verify's verdict on them is integer equality (with the exact-rational guard of `_equal`);
    deciding them here skips its LaTeX and sympy parsing, ~0.3 ms a pair (tests check the two agree)."""
    if not _INTEGER.fullmatch(gold):
        return None
    boxed = _BOXED_INTEGER.fullmatch(span)
    return None if boxed is None else int(boxed.group(1)) == int(gold)


def integer_shortcut(completion: str, row: dict) -> float | None:
    """The engine's in-process shortcut (`RewardTraits.shortcut`) for a plain-integer gold: the verdict against a
    completion whose only box is a plain integer and comes last (then only spacing, `$` or `.`); 0.0 for one
    with no letter or digit at all outside the box commands (`\\boxed{}`, `\\boxed{.}`: nothing there can
    denote a number, yet Math-Verify takes 3-300 ms to find that out); else None.

    Exactly what `check` decides for such a pair (the box is then the answer span; tests compare the two), in
    time linear in the text: the box count comes first, so `_boxes` scans once, and no regex can backtrack."""
    gold = row.get("answer")
    gold_text = "" if gold is None else str(gold).strip()
    if not _INTEGER.fullmatch(gold_text):
        return None
    if not any(ch.isalnum() for ch in completion.replace("\\boxed", "").replace("\\fbox", "")):
        return None if _nesting_depth(completion) > _MAX_NESTING else 0.0  # too deep: check reports it as an error
    if completion.count("\\boxed") + completion.count("\\fbox") != 1:
        return None
    spans = _boxes(completion)
    if len(spans) != 1 or completion[spans[0][1] :].strip(" \t\n$.") or _nesting_depth(completion) > _MAX_NESTING:
        return None
    same = _same_integer(gold_text, completion[spans[0][0] : spans[0][1]])
    return None if same is None else float(same)


def check(gold: Any, completion: str, *, check_timeout_s: float = 2.0) -> tuple[float | None, str | None]:
    """(score, error) for one sample; see the module docstring for the rules."""
    _no_library_alarm()
    if not _in_main_thread():  # the digit limit is process-wide: only lift it where no other thread is scoring
        return _check(gold, completion, check_timeout_s)
    # Python refuses int<->str conversions past 4,300 digits (a guard against quadratic conversions), which
    # would make a 5,000-digit gold "unparsable". The deadline already bounds the cost, so allow more here.
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(max(previous, _MAX_DIGITS) if previous else 0)
    try:
        return _check(gold, completion, check_timeout_s)
    finally:
        sys.set_int_max_str_digits(previous)


_MAX_NESTING = 64  # brackets nested deeper than this are not an answer anyone writes; parsers recurse on them


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return deepest


def _check(gold: Any, completion: str, timeout_s: float) -> tuple[float | None, str | None]:
    from math_verify.errors import TimeoutException

    gold_text = "" if gold is None else str(gold).strip()
    if not gold_text:
        return None, "empty gold"
    if _INTEGER.fullmatch(gold_text) and _nesting_depth(completion) <= _MAX_NESTING:
        # a plain-integer gold parses; decide a boxed plain integer before paying for either side's parse
        try:
            with _deadline(timeout_s):
                span = answer_span(completion)
        except TimeoutException:
            return 0.0, "timeout"
        if span is not None and (same := _same_integer(gold_text, span)) is not None:
            return float(same), None
    try:
        with _deadline(timeout_s):
            gold_parsed = _parse_gold(gold_text)
    except TimeoutException:
        return None, "gold parse timeout"
    except Exception:
        gold_parsed = ()
    if not gold_parsed:
        return None, "unparsable gold"
    if _nesting_depth(completion) > _MAX_NESTING:
        # Decided before parsing: deep nesting makes the parsers' recursion (and their deadline) unpredictable.
        return 0.0, "too deeply nested"
    try:
        with _deadline(timeout_s):
            span = answer_span(completion)
            if span is not None:  # boxed: the cache is checked before any parsing
                return float(_cached((gold_text, span), lambda: _equal(gold_parsed, _parse_prediction(span)))), None
            pred = _parse_prediction(completion)
            if not pred:
                return 0.0, None
            # Math-Verify returns [parsed, matched string]: the matched string is the extracted answer
            return float(_cached((gold_text, str(pred[-1])), lambda: _equal(gold_parsed, pred))), None
    except TimeoutException:
        return 0.0, "timeout"
    except (ValueError, TypeError, RecursionError, MemoryError, OverflowError):
        return 0.0, None  # the prediction is not valid maths: not equal


def warm_up() -> None:
    """Imports Math-Verify and builds its parsers (engine workers call this at start: the first batch is fast)."""
    check("1/2", r"$\boxed{\frac{2}{4}}$")  # not plain integers: those skip the parsers


_LITERAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:/[0-9]+)?")


def is_literal(completion: str) -> bool:
    """Whether the final answer is written out as a number: the last \\boxed{} (or, without one, the whole reply,
    minus `$`, spaces and a final period) is an integer, a decimal or a/b, not an expression such as `417*382`."""
    span = last_boxed(completion)
    text = (completion if span is None else span).strip().strip("$").strip().rstrip(".").strip()
    return bool(_LITERAL.fullmatch(text))


@reward_traits(elementwise=True, timeout_score=0.0, shortcut=integer_shortcut)
def math(
    completions: list[str],
    *,
    prompts: list[str] | None = None,
    answer: list[Any],
    check_timeout_s: float = 2.0,
    literal: bool = False,
) -> dict:
    """1.0 if the final answer (last \\boxed{}, else Math-Verify's fallbacks) equals `answer`, else 0.0.

    `literal=True` also asks for the answer written out as a number (`is_literal`): Math-Verify evaluates what it
    parses, so `\\boxed{417*382}` equals 159294, and on a task that asks for the product a policy learns to copy the
    question back (SmolLM2 did, in 8 steps). The engine's integer shortcut only decides boxed plain integers,
    which are literal."""
    scores: list[float | None] = []
    errors: list[str | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        if literal and not is_literal(completion):
            scores.append(0.0)
            errors.append(None)
            continue
        score, error = check(gold, completion, check_timeout_s=check_timeout_s)
        scores.append(score)
        errors.append(error)
    return {"rewards": scores, "errors": errors}
