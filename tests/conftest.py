import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """A randomly initialised tiny DeepSeek-V3 MoE and its offline tokenizer, saved as an HF checkpoint."""
    from rlk2.data import builtin_split
    from rlk2.policy import TinyMoEShape, build_demo_policy

    rows = builtin_split("arith", "train")[:2000]
    corpus = [f"Q: {r['prompt']}\nA: " for r in rows] + [r["completion"] for r in rows]
    shape = TinyMoEShape(hidden_size=32, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16)
    return build_demo_policy(tmp_path_factory.mktemp("policy"), corpus, seed=0, shape=shape)
