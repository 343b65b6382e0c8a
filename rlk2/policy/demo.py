"""The demo policy: a tiny DeepSeek-V3 MoE and its offline tokenizer, built from scratch.

The demo model is a real `transformers.DeepseekV3ForCausalLM` (MLA attention, one shared expert, first layer
dense, sigmoid top-k router over routed experts), only small. Its tokenizer is trained offline with the
`tokenizers` library on the synthetic task text, with digits split one per token (as Llama/DeepSeek do) so
arithmetic is not hidden inside multi-digit merges. Both are saved as a normal Hugging Face checkpoint.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

from rlk2.config import TinyMoEShape

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
DEMO_SHAPE = TinyMoEShape()  # the default shape (frozen, so one shared instance is safe as a default argument)

# A minimal chat template so the demo goes through the same `apply_chat_template` path as real chat models; a tool's
# answer (multi-turn episodes, rlk2.envs) is "R: <answer>" and hands the turn back to the assistant.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA: "
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}" + EOS + "{% elif m['role'] == 'tool' %}"
    "R: {{ m['content'] }}\nA: {% endif %}"
    "{% endfor %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 160) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer offline; digits stay single tokens. Deterministic for a given corpus."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Fuse()  # pieces are plain characters: decoding is concatenation
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=alphabet,
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
    fast.chat_template = DEMO_CHAT_TEMPLATE
    return fast


def tiny_deepseek_v3_config(vocab_size: int, shape: TinyMoEShape = DEMO_SHAPE, **special_ids: int) -> DeepseekV3Config:
    """A DeepSeek-V3 config at toy scale (MLA, shared expert, first layer dense, sigmoid top-k router)."""
    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        moe_intermediate_size=shape.moe_intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        n_shared_experts=shape.n_shared_experts,
        n_routed_experts=shape.n_routed_experts,
        num_experts_per_tok=shape.num_experts_per_tok,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=shape.first_k_dense_replace,
        q_lora_rank=shape.q_lora_rank,
        kv_lora_rank=shape.kv_lora_rank,
        qk_nope_head_dim=shape.qk_nope_head_dim,
        qk_rope_head_dim=shape.qk_rope_head_dim,
        v_head_dim=shape.v_head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,
        tie_word_embeddings=False,
        rope_interleave=True,
        **special_ids,
    )


def build_demo_policy(
    out_dir: str | Path, corpus: Iterable[str], *, seed: int, shape: TinyMoEShape = DEMO_SHAPE
) -> Path:
    """Build the tiny MoE and its tokenizer from scratch and save them as a Hugging Face checkpoint."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus)
    config = tiny_deepseek_v3_config(
        len(tokenizer),
        shape,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
