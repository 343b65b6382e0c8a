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


@dataclass
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
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template(base + new_messages, add_generation_prompt=True, tokenize=False)
    if not after.startswith(before) or _SENTINEL not in before:
        raise ValueError("the chat template renders earlier messages differently when more follow")
    tail = before[before.index(_SENTINEL) + len(_SENTINEL) :]
    eos = tokenizer.eos_token or ""
    if eos and eos in tail:  # the sampled turn already ends with EOS: keep only what the template adds after it
        tail = tail[tail.index(eos) + len(eos) :]
    return tokenizer(tail + after[len(before) :], add_special_tokens=False)["input_ids"]


# ================================================================================================ the loop
def start_episodes(spec: EnvSpec, rows: list[dict], tokenizer, *, describe: str, chat_template: bool) -> list[Episode]:
    """One fresh environment per row, reset with the row's columns; a reset that raises makes that episode
    unscorable (its prompt is then the row's `prompt`, or one EOS token, and it takes no turn)."""
    out = []
    for row in rows:
        ep = Episode(row, None)
        try:
            ep.env = spec.cls()
            first = ep.env.reset(**row)
            ep.messages = [{"role": "user", "content": first}] if isinstance(first, str) else list(first)
            if not ep.messages or not all(isinstance(m, dict) and "content" in m for m in ep.messages):
                raise TypeError("reset must return a string or a list of {'role', 'content'} messages")
            ep.prompt_ids = encode_start(
                tokenizer, ep.messages, spec.schemas, describe=describe, chat_template=chat_template
            )
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
    """Assistant turns sampled from a policy (`generate_rollouts`), `max_new_tokens` each.

    `seeds` (one per episode) or `seed` seed the sampling as in `generate_rollouts`; turn t of episode i draws from a
    stream keyed by (seeds[i], t), so an episode's tokens do not depend on what else is in the batch.
    """

    def __init__(
        self,
        model,
        tokenizer,
        episodes: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        seeds: list[int] | None = None,
        seed: int | None = None,
        record_logprobs: bool = True,
        record_routing: bool = False,
    ) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.limit = context_limit(model)
        self.sampling = {"temperature": temperature, "top_p": top_p, "greedy": greedy}
        self.record = {"record_logprobs": record_logprobs, "record_routing": record_routing}
        if seeds is None:
            base = torch.Generator().manual_seed(seed) if seed is not None else None
            seeds = torch.randint(0, 2**62, (episodes,), generator=base).tolist()
        self.seeds = seeds

    def __call__(self, contexts: list[list[int]], which: list[int], turn: int) -> Rollout:
        return generate_rollouts(
            self.model,
            self.tokenizer,
            contexts,
            max_new_tokens=self.max_new_tokens,
            seeds=None if self.sampling["greedy"] else [_turn_seed(self.seeds[i], turn) for i in which],
            **self.sampling,
            **self.record,
        )


class ScriptedTurns:
    """Assistant turns read from a script (`rlk2 episode`, tests): episode i's turn t is `scripts[i][t]`, tokenised
    and ended with EOS; an episode whose script has run out says nothing more (an empty turn, which ends it)."""

    limit = None

    def __init__(self, tokenizer, scripts: list[list[str]]) -> None:
        self.tokenizer, self.scripts = tokenizer, scripts
        self.max_new_tokens = 0

    def __call__(self, contexts: list[list[int]], which: list[int], turn: int) -> Rollout:
        texts = [self.scripts[i][turn] if turn < len(self.scripts[i]) else "" for i in which]
        end = [self.tokenizer.eos_token_id]
        turns = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + end for t in texts]
        prompt_ids, prompt_mask = left_pad(contexts, self.tokenizer.pad_token_id)
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
) -> tuple[Rollout, list[Episode]]:
    """Play one episode per row (repeat rows K times for groups) with assistant turns from `turns` (`SampledTurns`
    or `ScriptedTurns`); returns the Rollout (one row per episode, prompt = the first messages, completion =
    everything after, `loss_mask` on the policy's tokens) and the episodes."""
    episodes = start_episodes(spec, rows, tokenizer, describe=describe_tools, chat_template=chat_template)
    for turn in range(max_turns):
        active = [i for i, e in enumerate(episodes) if not e.done]
        for i in active:  # no room left for a whole turn: the episode ends here
            used = len(episodes[i].prompt_ids) + len(episodes[i].tokens)
            if turns.limit and used + turns.max_new_tokens > turns.limit:
                episodes[i].done = episodes[i].truncated = True
        active = [i for i in active if not episodes[i].done]
        if not active:
            break
        ro = turns([episodes[i].prompt_ids + episodes[i].tokens for i in active], active, turn)
        calls: dict[int, list[ToolCall]] = {}
        for r, i in enumerate(active):
            ep = episodes[i]
            _append_turn(ep, ro, r)
            if bool(ro.truncated[r]):  # cut at the budget: no complete turn to act on
                ep.done = ep.truncated = True
                continue
            found = spec.parse(ro.texts[r])
            if not found:
                ep.done = True
            elif turn == max_turns - 1:  # it still wants tools, but the turns are spent
                ep.done = ep.truncated = True
            else:
                calls[i] = found
        _answer_calls(spec, episodes, calls, runner, tokenizer, chat_template)
    _score_with_env(spec, episodes, runner)
    return _as_rollout(episodes, tokenizer.pad_token_id), episodes


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
    spec: EnvSpec, episodes: list[Episode], calls: dict[int, list[ToolCall]], runner: ToolRunner, tokenizer, chat
) -> None:
    """Run every call of this round at once, then append each episode's tool answers."""
    pending: dict[int, list] = {}
    for i, found in calls.items():
        ep = episodes[i]
        pending[i] = []
        for call in found:
            ep.tool_calls += 1
            problem = call.error or _check_call(spec, ep.env, call)
            if problem:
                pending[i].append((call, None, problem))
            else:
                pending[i].append((call, runner.submit(spec.tool(ep.env, call.name), call.arguments), None))
    for i, answers in pending.items():
        ep = episodes[i]
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
        ep.policy += [0] * len(added)
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


def _score_with_env(spec: EnvSpec, episodes: list[Episode], runner: ToolRunner) -> None:
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


def _as_rollout(episodes: list[Episode], pad_id: int) -> Rollout:
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
