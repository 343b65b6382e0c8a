"""Supervised warm start with TRL's SFTTrainer, cached by everything that shapes it.

The demo policy starts from random weights, so RL needs a start that already emits the answer format and is
sometimes right. A short SFT on the built-in tasks' gold completions gives exactly that: a policy whose pass@k is
well above its pass@1, which is where RL helps (it turns pass@k into pass@1). The result is a normal Hugging Face
checkpoint in `cache_dir/<hash>`; a second run with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from rlk2.data import Row


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
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    data = Dataset.from_list(
        [{"prompt": prompt_texts[i], "completion": rows[i]["completion"]} for i in order]
    )
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
    return out_dir
