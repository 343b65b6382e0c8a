"""Text to token ids: the one prompt encoder (chat template or plain text) and the tokens that end a reply."""

from __future__ import annotations


def encode_messages(tokenizer, messages: list[dict], *, chat_template: bool = True) -> list[int]:
    """Token ids of a conversation, ready for the assistant's turn: the tokenizer's chat template when asked for and
    present, else the messages' contents joined by newlines as plain text (with the tokenizer's special tokens)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]


def encode_prompts(tokenizer, prompts: list[str], *, chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt as one user turn (`encode_messages`)."""
    return [encode_messages(tokenizer, [{"role": "user", "content": p}], chat_template=chat_template) for p in prompts]


def eos_ids(model, tokenizer) -> list[int]:
    """The token ids that end a reply: the model's generation config's EOS ids plus the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos
