"""Critic backends that need a model in this process, for the `rubric` reward and closed-loop refinement.

- `PolicyCritic`: a live model as critic. The training loop wraps the policy being trained (the `self` backend:
  same weights, seen as they change, since the object is the one the optimizer updates in place) and passes it to
  the rubric reward in its options; nothing global finds the model.
- `CheckpointCritic` (`backend: checkpoint`): another local Hugging Face checkpoint, loaded once per process;
  registered with `rewards.critic` when this module is imported.

Both generate through `rlk2.rollout` (the loop's own generation, seeded per call, no log-probs kept). A prompt
longer than the model's context is not generated: `Reply(None, "critic prompt too long ...")`. The HTTP backend
(`openai`) lives in `rewards.critic`.
"""

from __future__ import annotations

import threading

import torch

from rewards.critic import Reply, RubricError, register_backend
from rlk2.errors import UserError
from rlk2.policy import load_policy
from rlk2.rollout import context_limit, encode_messages, generate_replies


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chat_template: bool = True,
    batch_size: int = 64,
) -> list[Reply]:
    """One reply per prompt (a user message) from a local causal LM; over-long prompts get `Reply(None, why)`."""
    encoded = [
        encode_messages(tokenizer, [{"role": "user", "content": p}], chat_template=chat_template) for p in prompts
    ]
    limit = context_limit(model)
    out = [Reply(None, "not generated")] * len(prompts)
    todo = []
    for i, ids in enumerate(encoded):
        if limit and len(ids) + max_new_tokens > limit:
            out[i] = Reply(None, f"critic prompt too long: {len(ids)} tokens + {max_new_tokens} new > context {limit}")
        else:
            todo.append(i)
    done = generate_replies(
        model,
        tokenizer,
        [encoded[i] for i in todo],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    for i, (toks, _) in zip(todo, done):
        out[i] = Reply(tokenizer.decode(toks, skip_special_tokens=True))
    return out


class PolicyCritic:
    """A model in this process as critic, with its weights of the moment it is called. One call at a time."""

    def __init__(self, model, tokenizer, *, chat_template: bool = True, batch_size: int = 256) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.chat_template, self.batch_size = chat_template, batch_size
        self.lock = threading.Lock()

    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int) -> list[Reply]:
        with self.lock:
            return generate_texts(
                self.model,
                self.tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                chat_template=self.chat_template,
                batch_size=self.batch_size,
            )


class CheckpointCritic(PolicyCritic):
    """A separate local Hugging Face checkpoint as critic; loaded once, on the GPU when there is one."""

    def __init__(
        self,
        path: str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 64,
        chat_template: bool = True,
    ) -> None:
        try:
            model, tokenizer = load_policy(path, dtype=dtype)
        except UserError as exc:
            raise RubricError(f"critic checkpoint: {exc}") from None
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        super().__init__(model, tokenizer, chat_template=chat_template, batch_size=batch_size)


register_backend("checkpoint", CheckpointCritic)
