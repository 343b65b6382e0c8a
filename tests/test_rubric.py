"""The rubric reward: rubric files validated on load, the template, verdict parsing, pairing, aggregation worked by
hand, position bias, unparsable verdicts as None. The critic here is a scripted stand-in (a class with `complete`)
so that every verdict is chosen by the test; real backends are tested in test_critic.py and test_serve.py."""

from __future__ import annotations

import math
import random
import re

import pytest

from rewards.rubric import (
    DEFAULT_TEMPLATE,
    Reply,
    RubricError,
    bradley_terry,
    choose_pairs,
    fill_template,
    load_rubric_file,
    load_rubrics,
    load_template,
    parse_verdict,
    render_rubrics,
    rubric,
    summarize,
    win_rate,
)


# ----------------------------------------------------------------------------------------------- rubric files
def test_shipped_rubrics_are_k2s():
    core = load_rubrics("core")
    assert [r.name for r in core] == ["clarity_relevance", "conversational_fluency", "objective_grounded"]
    assert not any(r.mandatory for r in core)
    prescriptive = load_rubrics("prescriptive")
    assert [r.name for r in prescriptive] == ["no_initial_praise", "no_self_justification"]
    assert all(r.mandatory and r.weight > 0 for r in prescriptive)
    both = load_rubrics(["core", "prescriptive"])
    assert len(both) == 5 and all(r.description and r.title for r in both)


GOOD = '[[rubric]]\nname = "x"\ntitle = "X"\ndescription = "d"\n'


@pytest.mark.parametrize(
    "body, needle",
    [
        (GOOD + "weight = -1\n", "rubric #1 ('x').weight: must be a number > 0"),
        (GOOD + 'weight = "high"\n', ".weight: must be a number > 0"),
        (GOOD + "weight = true\n", ".weight: must be a number > 0"),
        (GOOD + 'mandatory = "yes"\n', ".mandatory: must be true or false"),
        (GOOD + "wieght = 2\n", ".wieght: unknown field"),
        ('[[rubric]]\nname = "x"\ntitle = "X"\n', ".description: required"),
        ('[[rubric]]\nname = "has space"\ntitle = "X"\ndescription = "d"\n', ".name: use letters"),
        (GOOD + '[[rubric]]\nname = "y"\ndescription = "d"\n', "rubric #2 ('y').title: required"),
        ('title = "loose"\n' + GOOD, "unknown top-level key 'title'"),
        ('[rubrics]\nname = "x"\n', "expected a list of [[rubric]] tables"),
        ("rubric = []\n", "'rubric' must be a non-empty list"),
        ("[[rubric]\nname = 1\n", "not valid TOML"),
    ],
)
def test_bad_rubric_file_is_one_line_naming_file_and_field(tmp_path, body, needle):
    path = tmp_path / "mine.toml"
    path.write_text(body)
    with pytest.raises(RubricError) as info:
        load_rubric_file(path)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_yaml_rubrics_and_their_errors(tmp_path):
    good = tmp_path / "tone.yaml"
    good.write_text("rubric:\n  - name: polite\n    title: Polite\n    description: Says please.\n    weight: 2\n")
    (r,) = load_rubrics([str(good)])
    assert (r.name, r.weight, r.mandatory) == ("polite", 2.0, False)
    bad = tmp_path / "bad.yml"
    bad.write_text("rubric:\n  - name: polite\n    title: Polite\n    description: x\n    mandatory: 3\n")
    with pytest.raises(RubricError, match=r"bad\.yml: rubric #1 \('polite'\)\.mandatory"):
        load_rubrics([str(bad)])


@pytest.mark.parametrize("name", ["rows.jsonl", "rubric"])
def test_rubric_file_of_another_kind_is_refused_by_its_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"prompt": "max(1,2,3)=?"}\n')  # parses as YAML; the suffix says it is not a rubric file
    with pytest.raises(RubricError, match=r"a rubric file is \.toml, \.yaml or \.yml, not "):
        load_rubric_file(path)


def test_duplicate_names_across_files_name_both_files(tmp_path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD)
    with pytest.raises(RubricError, match=r"b\.toml: rubric 'x' is already defined in .*a\.toml"):
        load_rubrics([str(tmp_path / "a.toml"), str(tmp_path / "b.toml")])


def test_unknown_rubric_set_lists_the_shipped_ones():
    with pytest.raises(RubricError, match="no shipped rubric set 'cor'.*core, prescriptive"):
        load_rubrics(["cor"])


def test_render_puts_mandatory_rubrics_first_with_weights():
    text = render_rubrics(load_rubrics(["core", "prescriptive"]))
    lines = text.splitlines()
    assert lines[0].startswith("- No initial praise [1, MANDATORY]")
    assert lines[2].startswith("- Clarity and relevance [1]:")


# ----------------------------------------------------------------------------------------------- template
def test_shipped_template_has_every_slot_and_asks_reason_before_verdict():
    text = load_template()
    for slot in ("{prompt}", "{response_a}", "{response_b}", "{rubrics}"):
        assert slot in text
    assert text.index("reasoning") < text.index("Verdict: A")


@pytest.mark.parametrize(
    "body, needle",
    [
        ("{prompt} {response_a} {response_b} {score}", "unknown placeholder {score}"),
        ("{prompt} {response_a}", "placeholder {response_b} is required"),
    ],
)
def test_bad_template_is_one_line(tmp_path, body, needle):
    path = tmp_path / "t.txt"
    path.write_text(body)
    with pytest.raises(RubricError, match=re.escape(needle)):
        load_template(path)


def test_fill_never_expands_inserted_text():
    out = fill_template(
        "Q {prompt} A={response_a} B={response_b}",
        {"prompt": "{response_b}", "response_a": r"\boxed{4}", "response_b": "{x}"},
    )
    assert out == r"Q {response_b} A=\boxed{4} B={x}"


# ----------------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A is shorter.\nVerdict: A", "A"),
        ("Verdict: B", "B"),
        ("Equal.\nverdict: tie", "tie"),
        ("**Verdict:** B", "B"),
        ("Verdict: A\nOn reflection...\nVerdict: B", "B"),  # the last verdict counts
        ("VERDICT = A", "A"),
        ("Verdict: a tie", None),  # lower-case 'a' is an article, not a verdict
        ("Verdict: Both", None),
        ("I prefer A.", None),
        ("", None),
        (None, None),
        ("\x00\x01 Verdict:", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text).verdict == verdict


def test_reason_is_the_text_before_the_verdict():
    v = parse_verdict("  B opens with\n praise.  \nVerdict: A\n")
    assert v == ("A", "B opens with praise.")


# ----------------------------------------------------------------------------------------------- pairs
def test_all_pairs_and_random_pairs_cover_every_response():
    assert len(choose_pairs(8, "all", random.Random(0))) == 28
    for seed in range(20):
        pairs = choose_pairs(8, 8, random.Random(seed))
        assert len(pairs) == 8 == len(set(pairs)) and all(i < j for i, j in pairs)
        assert {x for p in pairs for x in p} == set(range(8))  # every response is compared at least once
    assert choose_pairs(8, 10, random.Random(3)) == choose_pairs(8, 10, random.Random(3))
    assert choose_pairs(3, 99, random.Random(0)) == [(0, 1), (0, 2), (1, 2)]


# ----------------------------------------------------------------------------------------------- aggregation
def test_win_rate_worked_by_hand():
    # s_01 = 1 (0 beat 1), s_02 = 0.5 (orders disagreed), s_12 = 0 (2 beat 1); response 3 was never compared.
    # r_0 = (1 + 0.5) / 2 = 0.75; r_1 = (0 + 0) / 2 = 0; r_2 = (0.5 + 1) / 2 = 0.75; r_3 = None
    assert win_rate(4, {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 0.0}) == [0.75, 0.0, 0.75, None]


def test_bradley_terry_solves_its_likelihood_equations():
    outcomes = {(0, 1): 1.0, (0, 2): 1.0, (1, 2): 0.5, (2, 3): 1.0, (1, 3): 0.0}
    r = bradley_terry(5, outcomes, prior=0.5)
    assert r[4] is None
    p = [x / (1 - x) for x in r[:4]]  # r = p / (p + 1)  =>  p = r / (1 - r)
    # At the maximum (with the prior: half a win and half a loss against an anchor of strength 1), each
    # response's wins equal its expected wins: W_i = sum_j n_ij p_i / (p_i + p_j) + 1 * p_i / (p_i + 1).
    for i in range(4):
        wins = 0.5 + sum(s if a == i else 1 - s for (a, b), s in outcomes.items() if i in (a, b))
        expected = p[i] / (p[i] + 1) + sum(p[i] / (p[a] + p[b]) for (a, b) in outcomes if i in (a, b))
        assert wins == pytest.approx(expected, rel=1e-6)
    assert r[0] > r[1] and r[0] > r[2] > r[3]


def test_bradley_terry_symmetric_cases():
    # all ties -> every strength equals the anchor's -> 0.5; two responses, one win -> r_0 + r_1 = 1 by symmetry
    assert bradley_terry(3, {(0, 1): 0.5, (1, 2): 0.5, (0, 2): 0.5}) == pytest.approx([0.5] * 3)
    r0, r1 = bradley_terry(2, {(0, 1): 1.0})
    assert r0 > 0.5 > r1 and r0 + r1 == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- the reward
class Scripted:
    """A critic whose verdict is a function of the two replies it is shown (and the rubric named)."""

    def __init__(self, decide):
        self.decide, self.prompts = decide, []

    def complete(self, prompts, *, max_new_tokens, temperature, seed):
        self.prompts += prompts
        out = []
        for p in prompts:
            a = re.search(r"Reply A:\n<<<\n(.*?)\n>>>", p, re.S).group(1)
            b = re.search(r"Reply B:\n<<<\n(.*?)\n>>>", p, re.S).group(1)
            out.append(self.decide(a, b, p))
        return out


def by_score(a, b, _):
    """Prefers the reply with the larger number in it; reason first, verdict last."""
    va, vb = int(a.split()[-1]), int(b.split()[-1])
    return Reply(f"compared {va} with {vb}\nVerdict: {'A' if va > vb else 'B' if vb > va else 'tie'}")


def test_consistent_critic_ranks_by_win_rate():
    critic = Scripted(by_score)
    out = rubric(["r 3", "r 1", "r 2"], prompts=["p"] * 3, backend=critic)
    # 3 pairs x 2 orders = 6 calls. wins: "r 3" beats both (1.0), "r 2" beats "r 1" (0.5), "r 1" none (0.0)
    assert len(critic.prompts) == 6
    assert out["rewards"] == [1.0, 0.0, 0.5]
    assert out["extras"]["unparsable"] == [0, 0, 0]
    first = out["extras"]["judgments"][0]
    assert len(first) == 4 and {j["vs"] for j in first} == {1, 2}
    assert first[0]["reason"].startswith("compared") and first[0]["verdict"] in ("A", "B")
    assert summarize(out["extras"]["judgments"])["position_consistency"] == 1.0


def test_prompt_shows_rubrics_prompt_and_both_replies():
    critic = Scripted(by_score)
    rubric(["r 1", "r 2"], prompts=["what is up"] * 2, backend=critic)
    assert "No initial praise [1, MANDATORY]" in critic.prompts[0] and "what is up" in critic.prompts[0]
    assert {critic.prompts[0].count("r 1"), critic.prompts[0].count("r 2")} == {1}


def test_position_bias_cancels_with_both_orders():
    # A critic that always says "A" has pure position bias: each pair is won once per order -> s_ij = 0.5 for all.
    always_a = Scripted(lambda a, b, _: Reply("first is fine\nVerdict: A"))
    out = rubric(["x 1", "x 2", "x 3"], prompts=["p"] * 3, backend=always_a)
    assert out["rewards"] == [0.5, 0.5, 0.5]
    assert summarize(out["extras"]["judgments"])["position_consistency"] == 0.0
    # Judged once, the same critic would reward whichever reply it happened to see first.
    once = rubric(["x 1", "x 2"], prompts=["p"] * 2, backend=always_a, order="random", seed=1)
    (j,) = once["extras"]["judgments"][0]
    assert once["rewards"] == ([1.0, 0.0] if j["shown_first"] else [0.0, 1.0])


def test_garbage_verdicts_are_none_and_counted():
    garbage = Scripted(lambda a, b, _: Reply("lorem ipsum A B"))
    out = rubric(["x 1", "x 2", "x 3"], prompts=["p"] * 3, backend=garbage)
    assert out["rewards"] == [None, None, None]
    assert out["errors"] == ["no parsable critic verdict"] * 3
    assert out["extras"]["unparsable"] == [4, 4, 4]  # each sample took part in 2 pairs x 2 orders
    assert summarize(out["extras"]["judgments"])["unparsable"] == 6.0  # 6 distinct calls


def test_one_unparsable_order_leaves_the_other():
    # the critic garbles every judgment where "x 1" is shown first; x 2 beats x 1 in the other order.
    half = Scripted(lambda a, b, _: Reply("???") if a == "x 1" else by_score(a, b, _))
    out = rubric(["x 1", "x 2"], prompts=["p"] * 2, backend=half)
    assert out["rewards"] == [0.0, 1.0] and out["extras"]["unparsable"] == [1, 1]


def test_backend_failure_is_none_with_its_reason():
    down = Scripted(lambda a, b, _: Reply(None, "HTTP 503: overloaded (4 attempts)"))
    out = rubric(["x 1", "x 2"], prompts=["p"] * 2, backend=down)
    assert out["rewards"] == [None, None] and out["errors"][0] == "critic failed: HTTP 503: overloaded (4 attempts)"


def test_groups_are_prompts_and_a_lone_response_is_unscorable():
    out = rubric(["x 1", "x 5", "y 2"], prompts=["p", "p", "q"], backend=Scripted(by_score))
    assert out["rewards"] == [0.0, 1.0, None]
    assert out["errors"][2] == "no other response to the same prompt to compare with"


def test_per_rubric_mandatory_rubric_decides_first(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        '[[rubric]]\nname = "safe"\ntitle = "Safe"\ndescription = "no harm"\nmandatory = true\n'
        '[[rubric]]\nname = "style"\ntitle = "Style"\ndescription = "nice"\nweight = 5\n'
    )

    def decide(a, b, prompt):  # "bad" replies break the mandatory rubric; "fancy" replies win on style
        if "- Safe" in prompt:
            return Reply("Verdict: " + ("tie" if ("bad" in a) == ("bad" in b) else "B" if "bad" in a else "A"))
        return Reply("Verdict: " + ("A" if "fancy" in a and "fancy" not in b else "B" if "fancy" in b else "tie"))

    out = rubric(
        ["fancy bad", "plain", "fancy"],
        prompts=["p"] * 3,
        backend=Scripted(decide),
        rubrics=[str(path)],
        judge="per_rubric",
    )
    # pairs: (fancy bad, plain): mandatory says plain -> s=0 despite style; (fancy bad, fancy): mandatory -> 0;
    # (plain, fancy): mandatory ties -> style decides, fancy wins -> s=0.  r = [0/2, 1/2, 2/2]
    assert out["rewards"] == [0.0, 0.5, 1.0]


def test_bradley_terry_option_and_bad_options():
    out = rubric(["x 1", "x 2", "x 3"], prompts=["p"] * 3, backend=Scripted(by_score), aggregate="bradley_terry")
    assert out["rewards"][2] > out["rewards"][1] > out["rewards"][0] and all(0 < r < 1 for r in out["rewards"])
    for bad, needle in [
        ({"pairs": 0}, "pairs"),
        ({"order": "AB"}, "order"),
        ({"aggregate": "elo"}, "aggregate"),
        ({"backend": "vllm"}, "unknown critic backend 'vllm'"),
    ]:
        with pytest.raises(RubricError, match=needle):
            rubric(["x 1", "x 2"], prompts=["p"] * 2, **{"backend": Scripted(by_score), **bad})


def test_random_pairs_limit_calls():
    critic = Scripted(by_score)
    out = rubric([f"x {i}" for i in range(8)], prompts=["p"] * 8, backend=critic, pairs=8)
    assert len(critic.prompts) == 16 and all(r is not None and not math.isnan(r) for r in out["rewards"])


def test_registered_and_run_by_the_engine_with_extras():
    from rewards import REWARDS, resolve_reward, traits_of
    from rewards.engine import RewardEngine, RewardSpec

    assert "rubric" in REWARDS and traits_of(resolve_reward("rubric")).run_in == "caller"
    with RewardEngine(num_workers=1, preload=()) as engine:
        spec = RewardSpec("rubric", kwargs={"backend": Scripted(by_score)})
        out = engine.score([spec], ["x 1", "x 2"], ["p", "p"], {})
    assert out.rewards["rubric"] == [0.0, 1.0]
    assert out.extras["rubric/judgments"][1][0]["reason"].startswith("compared")


def test_default_template_file_is_beside_the_code():
    assert DEFAULT_TEMPLATE.name == "critic_prompt.txt" and DEFAULT_TEMPLATE.parent.name == "rewards"
