"""The sampling distribution and its noise: what a token is drawn from, and the draws themselves.

`sampling_logprobs` gives the log-probs of the tempered, top-p-restricted distribution (or the raw one for greedy);
tokens are drawn by an exponential race on them. The noise is either a seeded torch generator or counter-based
(splitmix64 as a pure function of (sequence seed, position, vocabulary index)), so a sequence draws the same
tokens whatever else is in its batch and on whichever process it is sampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy_of(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy [n] of each row's distribution from its log-probs [n, V]; tokens outside top-p (-inf) add 0."""
    return -(logprobs.exp() * logprobs.clamp(min=torch.finfo(logprobs.dtype).min)).sum(dim=-1)


# Counter-based noise (the splitmix64 generator, as a pure function of (key, counter)) on int64 tensors.
# torch's int64 multiply wraps modulo 2**64 and `>>` is arithmetic, so shifts are masked to be logical.
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def to_int64(x: int) -> int:
    x %= 1 << 64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function: a bijection on 64-bit words that scrambles every input bit."""
    z = (z ^ _shr(z, 30)) * to_int64(_M1)
    z = (z ^ _shr(z, 27)) * to_int64(_M2)
    return z ^ _shr(z, 31)


def sequence_exponentials(keys: torch.Tensor, t: int, vocab: int) -> torch.Tensor:
    """[n, V] Exp(1) draws for decoding position t of n sequences: element (i, v) is word number t * V + v of the
    splitmix64 stream that starts at keys[i], so a row depends on its own key only (not on the batch)."""
    counter = torch.arange(t * vocab, (t + 1) * vocab, dtype=torch.long, device=keys.device)  # [V]
    z = mix64(keys.unsqueeze(1) + counter * to_int64(_GOLDEN))  # [n, V]
    uniform = (_shr(z, 11).double() + 0.5) * 2.0**-53  # 53 random bits -> (0, 1), never 0 or 1
    return -torch.log(uniform)


def sampling_logprobs(logits: torch.Tensor, *, temperature: float, top_p: float, greedy: bool) -> torch.Tensor:
    """Log-probs [n, V] of the distribution tokens are drawn from (float32; -inf outside the top-p nucleus)."""
    scores = logits.float()
    if greedy:
        return F.log_softmax(scores, dim=-1)
    scores = scores / temperature
    if top_p < 1.0:
        # HF's TopPLogitsWarper: drop the tokens whose ascending cumulative probability is <= 1 - top_p,
        # always keeping the most likely one.
        sorted_scores, order = torch.sort(scores, dim=-1)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[:, -1] = False
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return F.log_softmax(scores, dim=-1)
