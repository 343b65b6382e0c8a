"""Built-in task families for pretrained instruct models: thousands of generated problems, checked by verifiers.

- `word_problems`: arithmetic word problems from a dozen templates (shopping and change, speed and distance, ages,
  sharing, areas and perimeters, savings, stock left, two-item bills, unit conversion, reading, ...), each with a
  whole-number answer, asked to be given in \\boxed{} and scored by the `math` reward (`answer`).
- `constraints`: short writing requests with one or two verifiable constraints in the style of IFEval (Zhou et al.
  2023; Tülu 3's RLVR used the same kind): all lowercase, a word limit, required keywords, an ending phrase, a
  number of bullet points, a JSON-wrapped answer, no commas, a title in <<double angular brackets>>, a postscript.
  The constraints are a column (`constraints`: IFEval instruction ids with their arguments) scored by the `ifeval`
  reward; the instruction text comes from the same implementation that checks it.

Generation is seeded and independent of the run seed (the splits are fixed, as for the toy tasks); no row has a
gold completion: these tasks train a policy that already writes (give `policy.path`), they do not warm-start one.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rewards.ifeval import describe  # the instruction text comes from the checkers' own implementation

Row = dict

_SEED = 20261202
NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Isla",
    "Jack",
    "Kira",
    "Leo",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Ravi",
    "Sara",
    "Tom",
    "Uma",
    "Vic",
    "Wen",
    "Yusuf",
    "Zoe",
]
ITEMS = [
    ("apple", "apples"),
    ("pen", "pens"),
    ("notebook", "notebooks"),
    ("sticker", "stickers"),
    ("cupcake", "cupcakes"),
    ("ticket", "tickets"),
    ("marble", "marbles"),
    ("card", "cards"),
    ("banana", "bananas"),
    ("pencil", "pencils"),
]
_ANSWER = " Give the final answer as a whole number in \\boxed{}."


def _shopping(r: random.Random) -> tuple[str, int]:
    name, (_, items), n, price = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(1, 9)
    bill = r.choice([b for b in (10, 20, 50, 100) if b > n * price])
    return (
        f"{name} buys {n} {items} at ${price} each and pays with a ${bill} bill. How many dollars of change "
        f"does {name} get?",
        bill - n * price,
    )


def _speed(r: random.Random) -> tuple[str, int]:
    vehicle, speed, hours = r.choice(["car", "train", "bus", "cyclist", "boat"]), r.randint(2, 12) * 5, r.randint(2, 6)
    return (
        f"A {vehicle} travels at {speed} kilometres per hour for {hours} hours. How many kilometres does it travel?",
        speed * hours,
    )


def _ages(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(NAMES, 2)
    gap, years, later = r.randint(2, 15), r.randint(2, 10), r.randint(12, 40)
    return (
        f"{a} is {gap} years older than {b}. In {years} years, {b} will be {later} years old. How old is {a} now?",
        later - years + gap,
    )


def _sharing(r: random.Random) -> tuple[str, int]:
    name, (_, items), friends, each = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 8), r.randint(2, 12)
    return (
        f"{name} has {friends * each} {items} and shares them equally among {friends} friends. How many "
        f"{items} does each friend get?",
        each,
    )


def _area(r: random.Random) -> tuple[str, int]:
    place, w, length = r.choice(["garden", "room", "field", "playground", "patio"]), r.randint(3, 15), r.randint(3, 20)
    return (
        f"A rectangular {place} is {w} metres wide and {length} metres long. What is its area in square metres?",
        w * length,
    )


def _perimeter(r: random.Random) -> tuple[str, int]:
    place, w, length = r.choice(["garden", "pool", "field", "yard", "table"]), r.randint(2, 20), r.randint(2, 30)
    return (
        f"A rectangular {place} is {w} metres wide and {length} metres long. How many metres of fence go all the "
        "way around it?",
        2 * (w + length),
    )


def _savings(r: random.Random) -> tuple[str, int]:
    name, start, weekly, weeks = r.choice(NAMES), r.randint(0, 50), r.randint(2, 15), r.randint(2, 10)
    return (
        f"{name} has ${start} and saves ${weekly} every week. How many dollars does {name} have after {weeks} weeks?",
        start + weekly * weeks,
    )


def _stock(r: random.Random) -> tuple[str, int]:
    what = r.choice(["cookies", "loaves of bread", "muffins", "pies", "rolls"])
    made, morning, afternoon = r.randint(40, 120), r.randint(5, 30), r.randint(5, 30)
    return (
        f"A baker made {made} {what}, sold {morning} in the morning and {afternoon} in the afternoon. How "
        f"many {what} are left?",
        made - morning - afternoon,
    )


def _bill(r: random.Random) -> tuple[str, int]:
    name, ((_, first), (_, second)) = r.choice(NAMES), r.sample(ITEMS, 2)
    a, p, b, q = r.randint(2, 6), r.randint(1, 9), r.randint(2, 6), r.randint(1, 9)
    return (
        f"{name} buys {a} {first} at ${p} each and {b} {second} at ${q} each. How many dollars does {name} "
        "spend in total?",
        a * p + b * q,
    )


def _convert(r: random.Random) -> tuple[str, int]:
    thing, metres = r.choice(["rope", "ribbon", "pipe", "cable", "plank"]), r.randint(2, 30)
    return f"A {thing} is {metres} metres long. How many centimetres long is it?", metres * 100


def _reading(r: random.Random) -> tuple[str, int]:
    name, per_day, days = r.choice(NAMES), r.randint(5, 30), r.randint(3, 12)
    return (
        f"{name} reads {per_day} pages a day. How many days does it take {name} to read a book of "
        f"{per_day * days} pages?",
        days,
    )


def _groups(r: random.Random) -> tuple[str, int]:
    kids, per_team = r.randint(3, 9), r.randint(3, 9)
    return f"A coach splits {kids * per_team} children into teams of {per_team}. How many teams are there?", kids


WORD_PROBLEM_TEMPLATES: list[Callable[[random.Random], tuple[str, int]]] = [
    _shopping,
    _speed,
    _ages,
    _sharing,
    _area,
    _perimeter,
    _savings,
    _stock,
    _bill,
    _convert,
    _reading,
    _groups,
]


def word_problem_rows(n: int = 6000) -> list[Row]:
    """Up to `n` distinct problems from the templates in turn (a template whose problems run out drops out);
    seeded, so always the same."""
    rng, seen, rows = random.Random(_SEED), set(), []
    for attempt in range(50 * n):
        if len(rows) >= n:
            break
        template = WORD_PROBLEM_TEMPLATES[attempt % len(WORD_PROBLEM_TEMPLATES)]
        question, answer = template(rng)
        if question in seen or answer < 0:
            continue
        seen.add(question)
        rows.append({"prompt": question + _ANSWER, "answer": str(answer), "kind": template.__name__.lstrip("_")})
    return rows


# ------------------------------------------------------------------------------------------------ constraints
TOPICS = [
    "learning to cook",
    "a rainy weekend",
    "keeping a plant alive",
    "saving money",
    "a trip to the sea",
    "starting to run",
    "a favourite book",
    "moving to a new city",
    "learning a language",
    "a birthday party",
    "owning a dog",
    "riding a bike to work",
    "a visit to a museum",
    "sleeping well",
    "a school garden",
    "making friends",
    "a snowy morning",
    "fixing a flat tyre",
    "a picnic in the park",
    "the night sky",
    "a first job",
    "drinking enough water",
    "a board game evening",
    "cleaning a messy room",
    "the ocean",
    "a train journey",
    "baking bread",
    "a quiet library",
    "a football match",
    "growing tomatoes",
]
REQUESTS = [
    "Write a short note to a friend about {topic}.",
    "Describe {topic} in a few sentences.",
    "Give some advice about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Write a short paragraph about {topic}.",
    "Tell me why {topic} can be fun.",
]
ENDINGS = [
    "Is there anything else I can help with?",
    "Have a great day!",
    "That is all for now.",
    "See you soon.",
    "Thanks for reading.",
]
KEYWORDS = ["happy", "simple", "morning", "friend", "plan", "water", "light", "small", "green", "time"]

# Constraint kinds: (IFEval instruction id, arguments drawn for it). Pairs that cannot both hold are never drawn
# together (`_CLASH`).
_KINDS: dict[str, Callable[[random.Random], dict]] = {
    "change_case:english_lowercase": lambda r: {},
    "length_constraints:number_words": lambda r: {"relation": "less than", "num_words": r.choice([20, 30, 40, 60])},
    "keywords:existence": lambda r: {"keywords": r.sample(KEYWORDS, r.choice([1, 2]))},
    "startend:end_checker": lambda r: {"end_phrase": r.choice(ENDINGS)},
    "detectable_format:number_bullet_lists": lambda r: {"num_bullets": r.choice([2, 3, 4])},
    "detectable_format:json_format": lambda r: {},
    "punctuation:no_comma": lambda r: {},
    "detectable_format:title": lambda r: {},
    "detectable_content:postscript": lambda r: {"postscript_marker": "P.S."},
}
_CLASH = {
    frozenset(p)
    for p in [
        ("detectable_format:json_format", "detectable_format:number_bullet_lists"),
        ("detectable_format:json_format", "startend:end_checker"),
        ("detectable_format:json_format", "detectable_format:title"),
        ("detectable_format:json_format", "detectable_content:postscript"),
        ("startend:end_checker", "detectable_content:postscript"),
        ("change_case:english_lowercase", "detectable_content:postscript"),  # "P.S." has capitals
        ("change_case:english_lowercase", "startend:end_checker"),  # the phrases have capitals
    ]
}


def constraint_rows(n: int = 4000) -> list[Row]:
    """`n` distinct requests, each with one or two compatible constraints (the `constraints` column: a list of
    {"id", "kwargs"}); the constraint text is appended to the request."""
    rng, seen, rows = random.Random(_SEED + 1), set(), []
    kinds = sorted(_KINDS)
    for _ in range(50 * n):
        if len(rows) >= n:
            break
        request = rng.choice(REQUESTS).format(topic=rng.choice(TOPICS))
        chosen = [rng.choice(kinds)]
        if rng.random() < 0.5:
            other = rng.choice(kinds)
            if other != chosen[0] and frozenset((other, chosen[0])) not in _CLASH:
                chosen.append(other)
        constraints = [{"id": k, "kwargs": _KINDS[k](rng)} for k in chosen]
        prompt = " ".join([request, *(describe(c["id"], c["kwargs"]) for c in constraints)])
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "constraints": constraints})
    return rows
