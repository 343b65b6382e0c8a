"""Supervised warm start with TRL's SFTTrainer, cached by everything that shapes it.

The demo policy starts from random weights, so RL needs a start that already emits the answer format and is
sometimes right. A short SFT on the built-in tasks' gold completions gives exactly that: a policy whose pass@k is
well above its pass@1, which is where RL helps (it turns pass@k into pass@1). The result is a normal Hugging Face
checkpoint in `cache_dir/<hash>`; a second run with the same settings reuses it.

`prepare_policy` is where the loop gets its starting model: `policy.path` loaded as it is, or the demo MoE built
and warm-started (or taken from the cache). Nothing half-made is left in the cache when that fails or is stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from rlk2.config import TinyMoEShape, WarmStartConfig
from rlk2.data import Row
from rlk2.distributed import run_alone
from rlk2.errors import UserError
from rlk2.policy.demo import build_demo_policy
from rlk2.policy.load import load_policy
from rlk2.rollout.text import encode_messages


def cache_key(**parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_sft(
    base_path: str | Path,
    out_dir: str | Path,
    rows: list[Row],
    *,
    prompt_texts: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> Path:
    """Fine-tune `base_path` on (prompt, completion) pairs with TRL SFTTrainer (loss on completions only).

    `prompt_texts` are the prompts as the policy will see them (chat template already applied), aligned with rows.
    Writes the checkpoint atomically: a temporary directory renamed into place.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    data = Dataset.from_list([{"prompt": prompt_texts[i], "completion": rows[i]["completion"]} for i in order])
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    args = SFTConfig(
        output_dir=str(tmp / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        completion_only_loss=True,
        max_length=128,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,  # TRL turns it on by default; for a small model it only costs time
    )
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the loop prints its own one-line summary instead of log dicts
        result = trainer.train()
        print(f"warm start: SFT done, {steps} steps, final train loss {result.training_loss:.3f}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:  # stopped or failed: no temporary directory is left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ================================================================================================ the start
def prepare_policy(
    *,
    path: str | None,
    dtype: str,
    attn_implementation: str,
    chat_template: bool,
    shape: TinyMoEShape,
    warm: WarmStartConfig,
    sources: list[str],
    task_rows: dict[str, list[Row]],
    extra_rows: list[Row],
    extra_key: object,
    seed: int,
    accelerator,
) -> tuple:
    """The starting policy: `path` loaded as it is, else the demo MoE built on the tasks' text and warm-started on
    their gold completions (plus `extra_rows`, e.g. the critic's reply format; `extra_key` is their part of the
    cache key, `sources` the tasks' data sources), cached under `warm.cache_dir`. Returns (model, tokenizer, where it
    was loaded from)."""
    if path:
        # One process per machine converts a GGUF file into the cache first; the others then find it there. (All of
        # them converting at once raced: transformers writes model files on the main process only, so another
        # rank's half-written copy could be the one renamed into place.)
        with accelerator.local_main_process_first():
            model, tok = load_policy(path, dtype=dtype, attn_implementation=attn_implementation)
        return model, tok, path
    key = cache_key(
        **({"critic": extra_key} if extra_rows else {}),  # earlier caches keep their key
        shape=shape,
        tasks=sorted(sources),
        ws=[warm.steps, warm.batch_size, warm.lr, warm.examples],
        enabled=warm.enabled,
        seed=seed,
        version=1,
    )
    out = Path(warm.cache_dir) / key
    if (out / "config.json").exists():
        accelerator.print(f"warm start: reusing {out}")
    elif accelerator.is_main_process:
        rows = _interleave([[r for r in rs if "completion" in r] for rs in task_rows.values()])[: warm.examples]
        if warm.enabled and not rows:
            raise UserError(
                "warm_start: no task row has a gold `completion` to fine-tune the demo model on; give "
                "policy.path (a pretrained checkpoint) or set warm_start.enabled=false"
            )
        base = Path(warm.cache_dir) / f"{key}-base.tmp{os.getpid()}"
        try:
            build_demo_policy(base, _demo_corpus(task_rows, extra_rows), seed=seed, shape=shape)
            if warm.enabled:
                accelerator.print(f"warm start: SFT {warm.steps} steps on built-in tasks (cached in {out})")
                _, tok = load_policy(base)
                rows, texts = _examples(rows + extra_rows, tok, chat_template=chat_template)
                run_alone(
                    accelerator.num_processes,
                    run_sft,
                    base,
                    out,
                    rows,
                    prompt_texts=texts,
                    steps=warm.steps,
                    batch_size=warm.batch_size,
                    lr=warm.lr,
                    seed=seed,
                )
            else:
                os.replace(base, out)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    # on every rank, whichever branch it took (ranks may see the cache at different times)
    accelerator.wait_for_everyone()
    model, tok = load_policy(out, dtype=dtype, attn_implementation=attn_implementation)
    return model, tok, str(out)


def _examples(rows: list[Row], tok, *, chat_template: bool) -> tuple[list[Row], list[str]]:
    """(SFT rows, their prompts as the policy sees them). A multi-turn gold completion (`_conversations`) gives one
    example per assistant turn, its prompt the conversation before it as the episode loop renders it; a turn marked
    `"train": false` is context only, and one with `"given": "<opening>"` is trained after that opening only."""
    out, texts = [], []
    for r in rows:
        for turns in _conversations(r["completion"]):
            messages = [{"role": "user", "content": r["prompt"]}]
            for m in turns:
                if m["role"] == "assistant" and m.get("train", True):
                    given = m.get("given", "")  # the turn's opening, as context: trained from there on
                    out.append({"prompt": r["prompt"], "completion": m["content"][len(given) :]})
                    texts.append(tok.decode(encode_messages(tok, messages, chat_template=chat_template)) + given)
                messages.append({"role": m["role"], "content": m["content"]})
    return out, texts


def _conversations(completion) -> list[list[dict]]:
    """A gold completion as conversations after the prompt: a string is one assistant reply, a list of messages one
    conversation, a list of such lists several (e.g. a direct answer and, as context, a tool-using episode)."""
    if isinstance(completion, str):
        return [[{"role": "assistant", "content": completion}]]
    if completion and isinstance(completion[0], dict):
        return [completion]
    return [turns if isinstance(turns, list) else _conversations(turns)[0] for turns in completion]


def _interleave(lists: list[list]) -> list:
    """Round-robin over the lists, so every task is in the warm start however long the others are."""
    out = []
    for i in range(max(map(len, lists), default=0)):
        out += [rows[i] for rows in lists if i < len(rows)]
    return out


def _demo_corpus(task_rows: dict[str, list[Row]], extra_rows: list[Row]) -> list[str]:
    """Tokenizer training text: chat-rendered prompts and completions, separately (no merge across the seam)."""
    out = []
    for rows in [*task_rows.values(), extra_rows]:
        for r in rows:
            out.append(f"Q: {r['prompt']}\nA: ")
            for turns in _conversations(r["completion"]) if "completion" in r else []:  # each message on its own
                out += [m["content"] if m["role"] == "assistant" else f"R: {m['content']}\nA: " for m in turns]
    return out
