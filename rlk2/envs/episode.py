"""The episode loop: assistant turns from the policy, tool calls run between them, one `Rollout` row per episode.

Token in, token out. An episode is a prompt (the chat-rendered first messages) and one growing token list after
it: each assistant turn appends the tokens the policy sampled (with their log-probs, entropies and, for an MoE,
routed experts), each round of tool answers appends the tokens of those `tool` messages as the chat template
renders them after an assistant turn. Nothing is ever re-tokenised, so the training forward sees exactly the
tokens that were sampled; the tool tokens are attended to but are not the policy's (`Rollout.loss_mask` 0, no
log-prob).

Turns are generated for all unfinished episodes of a batch at once (`generate_rollouts` over their whole token
contexts), and a round's tool calls run concurrently (`ToolRunner`). An episode ends when a turn makes no call,
at `max_turns` (counted as truncated when its last turn still called tools), when a turn is cut at the token
budget, or when the context is full.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from rlk2.envs.environment import EnvSpec
from rlk2.envs.tools import ToolCall, ToolRunner
from rlk2.rollout.batch import Rollout, left_pad
from rlk2.rollout.generate import context_limit, generate_rollouts
from rlk2.rollout.text import encode_messages

_SENTINEL = "\u2063rlk2\u2063"  # stands for an assistant turn's content when measuring what the template adds


@dataclass(eq=False)  # compared by identity: two episodes of one group may hold equal fields
class Episode:
    row: dict
    env: object | None
    messages: list[dict] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    """Every token after the prompt: assistant turns (EOS included) and tool answers."""
    policy: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    routes: torch.Tensor | None = None
    """[L, len(prompt_ids) + len(tokens), k] experts per fed token, -1 where none was recorded (MoE only)."""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    done: bool = False
    truncated: bool = False
    error: str | None = None
    """Why the episode cannot be scored (reset or reward raised): its reward is None, never 0.0."""
    reward: float | None = None
    reward_error: str | None = None
    index: int = 0
    """Position in the batch it started in (scripted turns are looked up by it)."""
    seed: int | None = None
    """Sampling seed: turn t draws from a stream keyed by (seed, t), wherever and whenever it is played."""
    stale: list[int] = field(default_factory=list)
    """Partial rollouts: 1 on policy tokens sampled in an earlier step (by an earlier policy), per token."""
    step_tokens: int = 0
    """Policy tokens generated in the current step (partial rollouts pause an episode past the step's budget)."""
    resumed: bool = False
    """Partial rollouts: it was paused at the end of an earlier step and continued."""

    def resume(self) -> None:
        """Begin a new step: every token so far was sampled by an earlier policy."""
        self.stale = [int(p) for p in self.policy]
        self.step_tokens, self.resumed = 0, True

    @property
    def final_text(self) -> str:
        """The last assistant message (what the task's rewards score)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


@dataclass
class EpisodeStats:
    episodes: int = 0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: int = 0
    env_errors: int = 0


def episode_stats(episodes: list[Episode]) -> EpisodeStats:
    return EpisodeStats(
        len(episodes),
        sum(e.turns for e in episodes),
        sum(e.tool_calls for e in episodes),
        sum(e.tool_errors for e in episodes),
        sum(e.truncated for e in episodes),
        sum(e.error is not None for e in episodes),
    )


# ================================================================================================ rendering
def tool_preamble(schemas: list[dict]) -> str:
    """A system message describing the tools in the Hermes convention, for chat templates that ignore `tools=`."""
    listed = "\n".join(json.dumps(s) for s in schemas)
    return (
        "You may call tools. The tools, as JSON schemas:\n<tools>\n"
        f"{listed}\n</tools>\n"
        'To call one, write <tool_call>{"name": <tool name>, "arguments": <arguments object>}</tool_call>; '
        "its answer comes back in the next message. Reply without a call when you are done."
    )


def encode_start(
    tokenizer, messages: list[dict], schemas: list[dict], *, describe: str, chat_template: bool
) -> list[int]:
    """The prompt tokens of an episode. `describe`: how the tools reach the model: `template` (the chat
    template's `tools=`), `system` (a system message, `tool_preamble`), `none` (the policy knows them already, e.g.
    from a warm start) or `auto` (the template when it renders them, else a system message)."""
    if describe == "none" or not schemas:
        return encode_messages(tokenizer, messages, chat_template=chat_template)
    templated = chat_template and getattr(tokenizer, "chat_template", None)
    if describe in ("template", "auto") and templated:
        plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with_tools = tokenizer.apply_chat_template(messages, tools=schemas, add_generation_prompt=True, tokenize=False)
        if with_tools != plain or describe == "template":
            return tokenizer(with_tools, add_special_tokens=False)["input_ids"]
    if messages and messages[0]["role"] == "system":
        messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + tool_preamble(schemas)}, *messages[1:]]
    else:
        messages = [{"role": "system", "content": tool_preamble(schemas)}, *messages]
    return encode_messages(tokenizer, messages, chat_template=chat_template)


def continuation_ids(tokenizer, new_messages: list[dict], *, chat_template: bool) -> list[int]:
    """The tokens that follow an assistant turn's EOS when `new_messages` (tool answers, a user message) come next,
    ready for the next assistant turn: what the chat template puts between them, tokenised on its own."""
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return tokenizer("".join("\n" + m["content"] for m in new_messages), add_special_tokens=False)["input_ids"]
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    before = _rendered_base(tokenizer)
    after = tokenizer.apply_chat_template(base + new_messages, add_generation_prompt=True, tokenize=False)
    if not after.startswith(before) or _SENTINEL not in before:
        raise ValueError("the chat template renders earlier messages differently when more follow")
    tail = before[before.index(_SENTINEL) + len(_SENTINEL) :]
    eos = tokenizer.eos_token or ""
    if eos and eos in tail:  # the sampled turn already ends with EOS: keep only what the template adds after it
        tail = tail[tail.index(eos) + len(eos) :]
    return tokenizer(tail + after[len(before) :], add_special_tokens=False)["input_ids"]


_BASES: dict[tuple[int, str], str] = {}


def _rendered_base(tokenizer) -> str:
    """The template's rendering of one user message and one sentinel assistant turn (a constant per template)."""
    key = (id(tokenizer), tokenizer.chat_template)
    if key not in _BASES:
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        _BASES[key] = tokenizer.apply_chat_template(base, tokenize=False)
    return _BASES[key]


# ================================================================================================ the loop
def start_episodes(
    spec: EnvSpec,
    rows: list[dict],
    tokenizer,
    *,
    describe: str,
    chat_template: bool,
    seeds: list[int] | None = None,
    seed: int | None = None,
) -> list[Episode]:
    """One fresh environment per row, reset with the row's columns; a reset that raises makes that episode
    unscorable (its prompt is then the row's `prompt`, or one EOS token, and it takes no turn). `seeds` (one per
    row) or `seed` seed the episodes' sampling (`Episode.seed`)."""
    if seeds is None:
        base = torch.Generator().manual_seed(seed) if seed is not None else None
        seeds = torch.randint(0, 2**62, (len(rows),), generator=base).tolist()
    out, encoded = [], {}  # a group's K episodes usually open with the same messages: render them once
    for i, row in enumerate(rows):
        ep = Episode(row, None, index=i, seed=seeds[i])
        try:
            ep.env = spec.cls()
            first = ep.env.reset(**row)
            ep.messages = [{"role": "user", "content": first}] if isinstance(first, str) else list(first)
            if not ep.messages or not all(isinstance(m, dict) and "content" in m for m in ep.messages):
                raise TypeError("reset must return a string or a list of {'role', 'content'} messages")
            key = json.dumps(ep.messages, sort_keys=True, default=str)
            if key not in encoded:
                encoded[key] = encode_start(
                    tokenizer, ep.messages, spec.schemas, describe=describe, chat_template=chat_template
                )
            ep.prompt_ids = list(encoded[key])
        except Exception as exc:
            ep.error = f"reset raised {type(exc).__name__}: {exc}"
            ep.done = True
            text = str(row.get("prompt", ""))
            ep.prompt_ids = (tokenizer(text, add_special_tokens=False)["input_ids"] if text else []) or [
                tokenizer.eos_token_id
            ]
        out.append(ep)
    return out


class SampledTurns:
    """Assistant turns sampled from a policy (`generate_rollouts`), `max_new_tokens` each; turn t of an episode
    draws from a stream keyed by (`Episode.seed`, t), so its tokens do not depend on what else is in the batch, nor
    on the step it is played in."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        record_logprobs: bool = True,
        record_routing: bool = False,
    ) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.limit = context_limit(model)
        self.sampling = {"temperature": temperature, "top_p": top_p, "greedy": greedy}
        self.record = {"record_logprobs": record_logprobs, "record_routing": record_routing}

    def __call__(self, episodes: list[Episode]) -> Rollout:
        return generate_rollouts(
            self.model,
            self.tokenizer,
            [e.prompt_ids + e.tokens for e in episodes],
            max_new_tokens=self.max_new_tokens,
            seeds=None if self.sampling["greedy"] else [_turn_seed(e.seed, e.turns) for e in episodes],
            **self.sampling,
            **self.record,
        )


class ScriptedTurns:
    """Assistant turns read from a script (`rlk2 episode`, tests): turn t of the episode started at batch position
    i is `scripts[i][t]`, tokenised and ended with EOS; an episode whose script has run out says nothing more (an
    empty turn, which ends it)."""

    limit = None

    def __init__(self, tokenizer, scripts: list[list[str]]) -> None:
        self.tokenizer, self.scripts = tokenizer, scripts
        self.max_new_tokens = 0

    def __call__(self, episodes: list[Episode]) -> Rollout:
        script = [self.scripts[e.index] for e in episodes]
        texts = [s[e.turns] if e.turns < len(s) else "" for e, s in zip(episodes, script)]
        end = [self.tokenizer.eos_token_id]
        turns = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + end for t in texts]
        prompt_ids, prompt_mask = left_pad([e.prompt_ids + e.tokens for e in episodes], self.tokenizer.pad_token_id)
        T = max(len(t) for t in turns)
        ids = torch.tensor([t + [self.tokenizer.pad_token_id] * (T - len(t)) for t in turns])
        mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in turns])
        B = len(turns)
        return Rollout(prompt_ids, prompt_mask, ids, mask, torch.zeros(B, T), torch.zeros(B, dtype=torch.bool), texts)


def run_episodes(
    turns,
    tokenizer,
    spec: EnvSpec,
    rows: list[dict],
    *,
    max_turns: int,
    runner: ToolRunner,
    chat_template: bool = True,
    describe_tools: str = "auto",
    seeds: list[int] | None = None,
    seed: int | None = None,
) -> tuple[Rollout, list[Episode]]:
    """Play one episode per row to its end (repeat rows K times for groups) with assistant turns from `turns`
    (`SampledTurns` or `ScriptedTurns`) and score it with the environment's reward; returns the Rollout (one row
    per episode, prompt = the first messages, completion = everything after, `loss_mask` on the policy's tokens)
    and the episodes. `seeds` / `seed`: see `start_episodes`."""
    episodes = start_episodes(
        spec, rows, tokenizer, describe=describe_tools, chat_template=chat_template, seeds=seeds, seed=seed
    )
    play(turns, tokenizer, spec, episodes, max_turns=max_turns, runner=runner, chat_template=chat_template)
    end_episodes(spec, episodes, runner)
    return as_rollout(episodes, tokenizer.pad_token_id), episodes


def play(
    turns,
    tokenizer,
    spec: EnvSpec,
    episodes: list[Episode],
    *,
    max_turns: int,
    runner: ToolRunner,
    chat_template: bool = True,
    step_budget: int | None = None,
) -> list[Episode]:
    """Advance the unfinished `episodes` turn by turn until each ends, or (partial rollouts, `step_budget`) has
    generated that many policy tokens in this step and is paused after its turn's tool answers; returns the paused
    ones (not done: they continue in a later call)."""
    paused: list[Episode] = []
    while True:
        active = [e for e in episodes if not e.done and e not in paused]
        for e in active:  # no room left for a whole turn, or no turn left: the episode ends here
            used = len(e.prompt_ids) + len(e.tokens)
            if e.turns >= max_turns or (turns.limit and used + turns.max_new_tokens > turns.limit):
                e.done = e.truncated = True
        active = [e for e in active if not e.done]
        if not active:
            return paused
        ro = turns(active)
        calls: dict[int, list[ToolCall]] = {}
        for r, e in enumerate(active):
            _append_turn(e, ro, r)
            if bool(ro.truncated[r]):  # cut at the budget: no complete turn to act on
                e.done = e.truncated = True
                continue
            found = spec.parse(ro.texts[r])
            if not found:
                e.done = True
            elif e.turns >= max_turns:  # it still wants tools, but the turns are spent
                e.done = e.truncated = True
            else:
                calls[r] = found
        _answer_calls(spec, [active[r] for r in calls], list(calls.values()), runner, tokenizer, chat_template)
        if step_budget is not None:
            paused += [active[r] for r in calls if active[r].step_tokens >= step_budget]


def unscorable(episodes: list[Episode]) -> list[bool]:
    """Episodes whose environment failed (reset or reward raised): their reward is None, whatever else scored."""
    return [e.error is not None or e.reward_error is not None for e in episodes]


def _turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of one turn of one episode (turn 0 keeps the episode's seed)."""
    if turn == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/turn/{turn}".encode(), digest_size=8).digest(), "little")


def _append_turn(ep: Episode, ro: Rollout, r: int) -> None:
    """Add row r of a turn's rollout (its new tokens and what was recorded with them) to the episode."""
    n = int(ro.completion_mask[r].sum())
    context = len(ep.prompt_ids) + len(ep.tokens)
    ep.tokens += ro.completion_ids[r, :n].tolist()
    ep.policy += [1] * n
    ep.stale += [0] * n
    ep.step_tokens += n
    ep.logp += ro.old_logp[r, :n].tolist()
    ep.entropy += ([0.0] * n) if ro.entropy is None else ro.entropy[r, :n].tolist()
    ep.messages.append({"role": "assistant", "content": ro.texts[r]})
    ep.turns += 1
    if ro.routed_experts is not None:
        P = ro.prompt_ids.shape[1]
        prefill = ro.routed_experts[:, r, P - context : P]  # [L, context, k]: this turn's prefill of the context
        if ep.routes is not None:  # keep what earlier turns recorded when they sampled; fill what they could not
            old = ep.routes
            prefill = torch.cat(
                [torch.where(old >= 0, old, prefill[:, : old.shape[1]]), prefill[:, old.shape[1] :]], dim=1
            )
        ep.routes = torch.cat([prefill, ro.routed_experts[:, r, P : P + n]], dim=1)


def _answer_calls(
    spec: EnvSpec, episodes: list[Episode], calls: list[list[ToolCall]], runner: ToolRunner, tokenizer, chat: bool
) -> None:
    """Run every call of this round at once (`calls[i]` are episode i's), then append each episode's answers."""
    pending: list[list] = []
    for ep, found in zip(episodes, calls):
        pending.append([])
        for call in found:
            ep.tool_calls += 1
            problem = call.error or _check_call(spec, ep.env, call)
            if problem:
                pending[-1].append((call, None, problem))
            else:
                pending[-1].append((call, runner.submit(spec.tool(ep.env, call.name), call.arguments), None))
    for ep, answers in zip(episodes, pending):
        new = []
        for call, future, problem in answers:
            if future is not None:
                text, failed = runner.answer(future, call.name)
            else:
                text, failed = f"error: {problem}", True
            ep.tool_errors += failed
            new.append({"role": "tool", "name": call.name, "content": text})
        ep.messages += new
        added = continuation_ids(tokenizer, new, chat_template=chat)
        ep.tokens += added
        for column in (ep.policy, ep.stale):
            column += [0] * len(added)
        ep.logp += [0.0] * len(added)
        ep.entropy += [0.0] * len(added)


_JSON_TYPES: dict[str, tuple] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _check_call(spec: EnvSpec, env: object, call: ToolCall) -> str | None:
    """Why `call` does not fit its tool's schema (unknown tool, missing or unknown argument, wrong type), or None."""
    fn = spec.tool(env, call.name)
    if fn is None:
        return f"unknown tool '{call.name}' (tools: {', '.join(spec.tool_names)})"
    schema = next(s["function"]["parameters"] for s in spec.schemas if s["function"]["name"] == call.name)
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in call.arguments:
            return f"{call.name}: missing argument '{name}'"
    for name, value in call.arguments.items():
        if name not in props:
            return f"{call.name}: unknown argument '{name}' (takes: {', '.join(props) or 'none'})"
        kinds = props[name].get("type")
        kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
        allowed = tuple(t for k in kinds for t in _JSON_TYPES.get(k, (object,)))
        wrong_bool = isinstance(value, bool) and "boolean" not in kinds
        if allowed and (not isinstance(value, allowed) or wrong_bool):
            return f"{call.name}: argument '{name}' must be {' or '.join(kinds)}, not {type(value).__name__}"
    return None


def end_episodes(spec: EnvSpec, episodes: list[Episode], runner: ToolRunner) -> None:
    """The environment's own `reward(messages, **row)` (when it has one) and `close()`, each with the deadline."""
    for ep in episodes:
        if ep.env is None:
            continue
        if spec.has_reward and ep.error is None:
            future = runner.submit(lambda e=ep: e.env.reward(e.messages, **e.row), {})
            try:
                value = future.result(timeout=runner.timeout_s)
                ep.reward = None if value is None else float(value)
                if ep.reward is not None and not math.isfinite(ep.reward):
                    ep.reward, ep.reward_error = None, f"reward returned {value!r}"
            except Exception as exc:
                ep.reward_error = f"reward raised {type(exc).__name__}: {exc}"
        if callable(getattr(ep.env, "close", None)):
            try:
                ep.env.close()
            except Exception:
                pass


def as_rollout(episodes: list[Episode], pad_id: int) -> Rollout:
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_id)
    B, P = prompt_ids.shape
    T = max((len(e.tokens) for e in episodes), default=0)

    def right(values: list[list], fill, dtype) -> torch.Tensor:
        return torch.tensor([list(v) + [fill] * (T - len(v)) for v in values], dtype=dtype).view(B, T)

    completion_ids = right([e.tokens for e in episodes], pad_id, torch.long)
    completion_mask = right([[1] * len(e.tokens) for e in episodes], 0, torch.long)
    loss_mask = right([e.policy for e in episodes], 0, torch.long)
    routes = None
    recorded = [e.routes for e in episodes if e.routes is not None]
    if recorded:
        L, k = recorded[0].shape[0], recorded[0].shape[2]
        routes = torch.full((L, B, P + T, k), -1, dtype=recorded[0].dtype)
        for b, e in enumerate(episodes):
            if e.routes is not None:
                p = len(e.prompt_ids)
                routes[:, b, P - p : P] = e.routes[:, :p]
                routes[:, b, P : P + len(e.tokens)] = e.routes[:, p:]
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        right([e.logp for e in episodes], 0.0, torch.float32),
        torch.tensor([e.truncated for e in episodes], dtype=torch.bool),
        [e.final_text for e in episodes],
        routed_experts=routes,
        entropy=right([e.entropy for e in episodes], 0.0, torch.float32),
        loss_mask=loss_mask,
    )


def stale_mask(episodes: list[Episode], width: int) -> torch.Tensor:
    """[B, width] 1 on policy tokens an earlier step's policy sampled (partial rollouts), as `as_rollout` lays out
    the completions."""
    return torch.tensor([e.stale + [0] * (width - len(e.stale)) for e in episodes], dtype=torch.bool).view(
        len(episodes), width
    )


class PausedGroups:
    """Partial rollouts (K2): groups of episodes of which some were paused at the end of a step, per task, waiting to
    be continued in the next one. Saved in checkpoints like the prompt samplers (`state_dict`), so a resumed run
    continues them exactly (the environments must pickle)."""

    def __init__(self) -> None:
        self.groups: dict[str, list[tuple[int, list[Episode]]]] = {}
        """task -> (the group's row, as its index in the task's training rows; its K episodes)."""

    def take(self, task: str) -> list[tuple[int, list[Episode]]]:
        return self.groups.pop(task, [])

    def put(self, task: str, groups: list[tuple[int, list[Episode]]]) -> None:
        if groups:
            self.groups.setdefault(task, []).extend(groups)

    def state_dict(self) -> dict:
        return {"groups": self.groups}

    def load_state_dict(self, state: dict) -> None:
        self.groups = state["groups"]
