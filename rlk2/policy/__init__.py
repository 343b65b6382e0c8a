"""The policy: loading checkpoints, the demo model and its warm start.

- `load`: `load_policy`, any local causal-LM checkpoint (Hugging Face directory or PEFT adapter), one-line errors.
- `demo`: the tiny DeepSeek-V3 MoE and its offline tokenizer, built from scratch (`build_demo_policy`).
- `warmstart`: the demo's supervised warm start (TRL `SFTTrainer`), cached; `prepare_policy` gives the loop its
  starting model, whichever way it comes.
"""

from rlk2.config import TinyMoEShape
from rlk2.policy.demo import DEMO_CHAT_TEMPLATE, build_demo_policy, build_tokenizer, tiny_deepseek_v3_config
from rlk2.policy.load import load_policy

__all__ = [
    "DEMO_CHAT_TEMPLATE",
    "TinyMoEShape",
    "build_demo_policy",
    "build_tokenizer",
    "load_policy",
    "tiny_deepseek_v3_config",
]
