"""Loading a policy: any local causal-LM checkpoint (Hugging Face directory or PEFT adapter), one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from rlk2.errors import UserError
from rlk2.policy.sources import resolve_checkpoint


def load_policy(
    path: str | Path, *, dtype: str = "float32", attn_implementation: str | None = "eager", what: str = "policy.path"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a local causal-LM checkpoint (or a PEFT adapter directory) with one-line errors for bad paths; `what`
    names the source in them (the config key, or "checkpoint" for a run's own). `path` may also be a GGUF file, a
    directory holding one, or a known name such as `smollm2-135m-instruct` (`rlk2.policy.sources`)."""
    path = resolve_checkpoint(path, what=what)
    if not path.is_dir():
        raise UserError(f"{what}: {path} is not a directory")
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, dtype=dtype, attn_implementation=attn_implementation, what=what)
    if not (path / "config.json").exists():
        raise UserError(f"{what}: {path} has no config.json; not a Hugging Face checkpoint")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - surface the library's reason in one line
        raise UserError(f"{what}: cannot read {path}/config.json: {_one_line(exc)}") from exc
    archs = config.architectures or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (archs and not causal_arch):
        what = archs[0] if archs else config.model_type
        raise UserError(f"{what}: {path} holds a '{what}' checkpoint, not a causal language model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{what}: cannot load {path}: {_one_line(exc)}") from exc
    _prepare_tokenizer(tokenizer, path=path, what=what)
    return model, tokenizer


def _load_adapter(path: Path, *, dtype: str, attn_implementation: str | None, what: str):
    base_path = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path or not Path(base_path).is_dir():
        raise UserError(f"{what}: adapter {path} names base model {base_path!r}, which is not a local directory")
    base, tokenizer = load_policy(base_path, dtype=dtype, attn_implementation=attn_implementation, what=what)
    if (path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
        _prepare_tokenizer(tokenizer, path=path, what=what)
    try:
        return PeftModel.from_pretrained(base, path, is_trainable=True), tokenizer
    except Exception as exc:  # noqa: BLE001 - a damaged adapter: the library's reason in one line
        raise UserError(f"{what}: cannot load the adapter in {path}: {_one_line(exc)}") from exc


def _prepare_tokenizer(tokenizer, *, path: Path, what: str) -> None:
    # Rollouts batch prompts of different lengths: left padding keeps every prompt's last token at the end.
    tokenizer.padding_side = "left"
    if tokenizer.eos_token is None:
        # Without an end-of-sequence token no reply can finish: every rollout would run to the budget.
        raise UserError(f"{what}: the tokenizer in {path} has no EOS token (eos_token), so no reply could end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
