"""The math reward: every answer family grades its gold as 1.0, malformed output as 0.0 (or None for a broken
gold), pathological answers are cut at the deadline, and accuracy on the labelled set beats raw Math-Verify."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from rewards import RewardEngine, RewardSpec
from rewards.math import _VERDICTS, check, last_boxed, math

DATA = pathlib.Path(__file__).parent / "data" / "math_labelled.jsonl"

# (gold, a correct completion in another form, a wrong completion), one per answer family
FAMILIES = [
    ("42", r"so we get $\boxed{42}$", r"$\boxed{41}$"),
    ("-7", r"The answer is \boxed{-7}.", r"\boxed{7}"),
    (r"\frac{3}{4}", r"$\boxed{0.75}$", r"$\boxed{0.76}$"),
    ("0.125", r"$\boxed{\frac{1}{8}}$", r"$\boxed{\frac{1}{9}}$"),
    (r"2\sqrt{3}", r"$\boxed{\sqrt{12}}$", r"$\boxed{\sqrt{13}}$"),
    (r"\frac{\pi}{3}", r"$\boxed{\frac{2\pi}{6}}$", r"$\boxed{\frac{\pi}{6}}$"),
    (r"x^2+2x+1", r"$\boxed{(x+1)^2}$", r"$\boxed{(x-1)^2}$"),
    (r"(1, 2]", r"$\boxed{(1,2]}$", r"$\boxed{[1,2]}$"),
    (r"\{1, 2, 3\}", r"$\boxed{\{3, 2, 1\}}$", r"$\boxed{\{1, 2\}}$"),
    (r"(3, -1)", r"the point is $\boxed{(3,-1)}$", r"$\boxed{(-1,3)}$"),
    (
        r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
        r"$\boxed{\begin{pmatrix}1&2\\3&4\end{pmatrix}}$",
        r"$\boxed{\begin{pmatrix}1&2\\3&5\end{pmatrix}}$",
    ),
    ("x = 5", r"$\boxed{5}$", r"$\boxed{x = 6}$"),
    (r"25\%", r"$\boxed{25\%}$", r"$\boxed{30\%}$"),
    ("1,000", "The final answer is $1000$. I hope it is correct.", "The final answer is $100$."),
    ("7" * 5000, r"\boxed{" + "7" * 5000 + "}", r"\boxed{" + "7" * 4999 + "8}"),
]


@pytest.mark.parametrize("gold,right,wrong", FAMILIES, ids=[f[0][:12] for f in FAMILIES])
def test_each_family_grades_gold_and_rejects_wrong(gold, right, wrong):
    assert check(gold, right) == (1.0, None)
    assert check(gold, r"\boxed{" + gold + "}") == (1.0, None)  # the gold itself, boxed
    assert check(gold, wrong) == (0.0, None)


@pytest.mark.parametrize("completion", ["", "I cannot solve this.", r"\boxed{", r"\boxed{}", "$$", r"\frac{1}{"])
def test_malformed_completions_score_zero(completion):
    assert check("4", completion) == (0.0, None)


@pytest.mark.parametrize("gold", ["", "   ", None, r"\frac{"])
def test_broken_gold_is_unscorable_not_zero(gold):
    score, error = check(gold, r"\boxed{4}")
    assert score is None and error in ("empty gold", "unparsable gold")


def test_last_box_wins_and_boxes_in_a_row_form_a_set():
    assert check("3", r"first try \boxed{5}, but that is wrong. Final answer: \boxed{3}") == (1.0, None)
    assert check("5", r"first try \boxed{5}, but that is wrong. Final answer: \boxed{3}") == (0.0, None)
    assert check(r"\{2, 3\}", r"$\boxed{2}, \boxed{3}$") == (1.0, None)


def test_exact_rationals_must_be_exactly_equal():
    # Math-Verify alone rounds both to 0 at 6 decimals and calls them equal (reported false positive)
    assert check(r"\frac{1}{2^{99}}", r"$\boxed{\frac{1}{2^{98}}}$") == (0.0, None)
    assert check(r"\frac{1}{2^{99}}", r"$\boxed{2^{-99}}$") == (1.0, None)


def test_verdicts_are_cached_by_gold_and_extracted_answer():
    _VERDICTS.clear()
    check("1/2", r"long reasoning ... $\boxed{\frac{1}{2}}$")
    check("1/2", r"other reasoning, same answer: $\boxed{\frac{1}{2}}$")
    assert len(_VERDICTS) == 1 and next(iter(_VERDICTS))[0] == "1/2"
    check("12", r"$\boxed{12}$")  # plain integers are decided without Math-Verify, and not cached
    assert len(_VERDICTS) == 1


def test_last_boxed_helper():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{unclosed") is None and last_boxed("none") is None


PATHOLOGICAL = [
    ("5", "So the answer is 2**30**5"),
    ("5", r"\boxed{2^{30^{5}}}"),
    ("5", r"\boxed{10^{10^{10}}}"),
    ("5", r"\boxed{10^{10^{10}} + 1}"),
    ("5", r"\boxed{" + "9" * 5000 + "}"),
    ("1/2", r"\boxed{" + r"\frac{" * 300 + "1" + "}{2}" * 300 + "}"),
    ("2", r"\boxed{" + r"\sqrt{" * 300 + "2" + "}" * 300 + "}"),
    ("2", r"\boxed{" + "(" * 2000 + "2" + ")" * 2000 + "}"),
]


def test_pathological_answers_are_cut_at_the_deadline():
    deadline = 3.0
    with RewardEngine(num_workers=2) as engine:
        start = time.monotonic()
        out = engine.score(
            [RewardSpec("math", timeout_s=deadline)],
            [p for _, p in PATHOLOGICAL],
            [""] * len(PATHOLOGICAL),
            {"answer": [g for g, _ in PATHOLOGICAL]},
        )
        elapsed = time.monotonic() - start
        # a normal answer right after is still graded (no stuck worker left behind)
        again = engine.score([RewardSpec("math")], [r"\boxed{5}"], [""], {"answer": ["5"]})
    scores, errors = out.rewards["math"], out.sample_errors["math"]
    assert all(s == 0.0 for s in scores), (scores, errors)  # wrong or timed out: the model's fault, never None
    assert set(errors) <= {None, "timeout", "too deeply nested"}
    # 8 checks on 2 workers, each bounded by the 1.5 s in-worker deadline (or the 3 s kill), plus start-up slack
    assert elapsed < len(PATHOLOGICAL) / 2 * (deadline + 1.0) + 10.0
    assert again.rewards["math"] == [1.0]


def test_math_reward_shape_and_doc_example():
    out = math([r"\boxed{2}", "no"], prompts=["", ""], answer=["2", "2"])
    assert out == {"rewards": [1.0, 0.0], "errors": [None, None]}


def test_accuracy_on_labelled_set_beats_raw_math_verify():
    """Prints accuracy / false positives / false negatives of the reward and of raw verify; the reward must be at
    least as accurate and have no more false positives than raw Math-Verify on the same pairs."""
    from math_verify import parse, verify

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 300 and all(r.get("source") for r in rows)
    labels = [bool(r["equal"]) for r in rows]
    ours = [check(r["gold"], r["prediction"])[0] == 1.0 for r in rows]
    raw = []
    for r in rows:
        try:
            raw.append(bool(verify(parse(r["gold"]), parse(r["prediction"]))))
        except BaseException:  # noqa: BLE001 - Math-Verify's TimeoutException is a BaseException
            raw.append(False)

    def stats(said):
        fp = sum(1 for y, s in zip(labels, said) if s and not y)
        fn = sum(1 for y, s in zip(labels, said) if y and not s)
        return (len(rows) - fp - fn) / len(rows), fp, fn

    acc, fp, fn = stats(ours)
    raw_acc, raw_fp, raw_fn = stats(raw)
    print(
        f"\nmath reward: accuracy {acc:.3f}, FP {fp}, FN {fn} | raw verify: accuracy {raw_acc:.3f}, "
        f"FP {raw_fp}, FN {raw_fn} | n={len(rows)}"
    )
    assert acc >= raw_acc and fp <= raw_fp


from fractions import Fraction  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.integers(-(10**12), 10**12), st.integers(1, 10**6))
def test_any_integer_or_fraction_matches_itself_and_not_its_neighbour(n, d):
    value = Fraction(n, d)
    gold = rf"\frac{{{value.numerator}}}{{{value.denominator}}}" if value.denominator != 1 else str(n // d)
    # the same value written the other way round (a/b in plain text), and the next value up
    same = f"{value.numerator}/{value.denominator}" if value.denominator != 1 else str(value.numerator)
    assert check(gold, rf"Thus $\boxed{{{same}}}$.") == (1.0, None)
    other = value + Fraction(1, value.denominator)
    assert check(gold, rf"Thus $\boxed{{{other.numerator}/{other.denominator}}}$.") == (0.0, None)


_INTS = st.one_of(st.integers(-99, 99), st.integers(-(10**30), 10**30))


@settings(max_examples=60, deadline=None)
@given(
    gold=_INTS,
    pred=_INTS,
    equal=st.booleans(),
    pad=st.sampled_from(["", " ", "  "]),
    wrap=st.sampled_from(
        ["\\boxed{{{}}}", "$\\boxed{{{}}}$", "The answer is \\boxed{{{}}}.", "\\boxed{{{}}}, \\boxed{{7}}"]
    ),
)
def test_integer_shortcut_agrees_with_math_verify(gold, pred, equal, pad, wrap):
    """The plain-integer shortcut (`_same_integer`) gives Math-Verify's verdict on every pair it decides."""
    import rewards.math as m

    if equal:
        pred = gold
    box = wrap.format(f"{pad}{pred}{pad}")
    fast = check(str(gold), box)
    if wrap != "\\boxed{{{}}}, \\boxed{{7}}":  # one box: the shortcut decides it (a set of two it leaves)
        assert m._same_integer(str(gold), m.answer_span(box)) is (pred == gold)
        assert fast == (1.0 if pred == gold else 0.0, None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(m, "_same_integer", lambda gold, span: None)
        _VERDICTS.clear()
        assert check(str(gold), box) == fast


def test_integer_shortcut_leaves_other_forms_to_math_verify():
    from rewards.math import _same_integer

    assert _same_integer("92", r"\boxed{92}") is True and _same_integer("-5", r"\boxed{ -5 }") is True
    assert _same_integer("92", r"\boxed{93}") is False
    for gold, span in [
        ("92", r"\boxed{092}"),
        ("92", r"\boxed{92.0}"),
        ("9.2", r"\boxed{9.2}"),
        ("1,000", r"\boxed{1000}"),
        ("92", r"\boxed{92}$ pct"),
        ("92", r"\boxed{+92}"),
        ("92", r"\boxed{9}, \boxed{2}"),
        ("x", r"\boxed{1}"),
    ]:
        assert _same_integer(gold, span) is None, (gold, span)


_TEXT = st.lists(
    st.sampled_from(list("0123456789 -$.%(){}\n") + ["\\boxed{", "\\fbox{", "pct", "final answer"]), max_size=40
).map("".join)


@settings(max_examples=200, deadline=None)
@given(
    gold=st.one_of(st.integers(-999, 999).map(str), st.sampled_from(["007", "1.5", "x", " 12 "])),
    text=_TEXT,
    pred=st.integers(-999, 999),
)
def test_engine_shortcut_decides_only_what_check_decides_the_same_way(gold, text, pred):
    """`integer_shortcut` (run in the trainer's process) never disagrees with `check` (run in a worker)."""
    from rewards.math import integer_shortcut

    for completion in (text, f"{text} \\boxed{{{pred}}}", f"\\boxed{{{pred}}}{text}"):
        verdict = integer_shortcut(completion, {"answer": gold})
        if verdict is not None:
            assert (verdict, None) == check(gold, completion), completion


_NO_ALNUM = st.lists(
    st.sampled_from(
        list(" -$.%(){}[]^_,;:!?*/+=<>|'\"\n~#&@")
        + ["\\boxed{", "\\fbox{", "\\", "\\,", "\\!", "∞", "√", "−", "…", "·", "×", "°", "′"]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(gold=st.sampled_from(["0", "1", "-1", "42", "-7", "1000000"]), text=_NO_ALNUM)
def test_shortcut_scores_answers_without_letters_or_digits_as_check_does(gold, text):
    """A completion with no letter or digit outside the box commands is 0.0 in process, exactly `check`'s verdict."""
    from rewards.math import integer_shortcut

    verdict = integer_shortcut(text, {"answer": gold})
    assert verdict in (0.0, None)
    if verdict is not None:
        assert check(gold, text) == (0.0, None), text


def test_engine_shortcut_is_linear_on_hostile_text():
    from rewards.math import integer_shortcut

    # thousands of unclosed boxes (a quadratic brace scan), long blank runs (a backtracking regex), deep nesting
    for text in ["\\boxed{" * 5000, "\\boxed{1}" + " " * 50_000 + "%", "(" * 100 + "\\boxed{1}" + ")" * 100]:
        assert integer_shortcut(text, {"answer": "1"}) is None


def test_the_engine_uses_the_shortcut_and_sends_only_the_rest_to_workers():
    texts = [r"\boxed{4}", r"\boxed{5}", r"$\boxed{\frac{8}{2}}$", r"\boxed{4} then \boxed{4}"]
    with RewardEngine(num_workers=1) as engine:
        batch = engine.score([RewardSpec("math")], texts, ["p"] * 4, {"answer": ["4"] * 4})
    assert batch.rewards["math"] == [1.0, 0.0, 1.0, 1.0]


def test_warm_up_goes_through_the_parsers():
    # the workers' preload: a plain-integer pair would take the shortcut and leave the parsers cold, so the
    # first real answer of a run would pay for building them (measured 60-170 ms)
    from rewards.math import warm_up

    _VERDICTS.clear()
    warm_up()
    assert len(_VERDICTS) == 1


def test_literal_asks_for_the_number_written_out():
    """Math-Verify evaluates what it parses, so an unevaluated expression equals its value; `literal=True` (the
    agent tasks, which ask for a product) scores it 0.0 instead, and still accepts every way of writing the number."""
    replies = ["\\boxed{417*382}", "417*382", "\\boxed{159294}", "159294.", "so it is \\boxed{159294}", "$159294$"]
    assert math(replies, answer=["159294"] * 6)["rewards"] == [1.0] * 6
    assert math(replies, answer=["159294"] * 6, literal=True)["rewards"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert math(["\\boxed{1/2}", "\\boxed{0.5}"], answer=["1/2"] * 2, literal=True)["rewards"] == [1.0, 1.0]
