"""Token sampling on the device, by inverse CDF on host-drawn uniforms (no RNG in the standard).

Order as in vLLM: logit bias, penalties on the raw logits, temperature, then min-p, top-k and top-p
filters. Greedy rows (temperature 0) take the argmax of the penalised logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .activation import softmax


@dataclass(slots=True)
class SamplingTensors:
    static_fields: ClassVar[tuple[str, ...]] = ("all_greedy", "needs_sort", "needs_min_p")
    temperature: Any  # [N] float, 0 for greedy rows
    top_k: Any  # [N] int, vocab size when off
    top_p: Any  # [N] float, 1 when off
    min_p: Any  # [N] float, 0 when off
    uniform: Any  # [N] float in [0, 1)
    all_greedy: bool
    needs_sort: bool  # some row has top-k or top-p
    needs_min_p: bool
    penalties: Any = None  # (counts [N, V], seen [N, V] bool, presence, frequency, repetition)
    banned: Any = None  # [N, V] bool: tokens that may not be sampled yet (min_tokens)
    bias: Any = None  # [N, V] float added to the raw logits (logit_bias)
    # structured outputs: (packed [N, W] int32, word [V], bit [V]); token t is allowed in row
    # i when bit bit[t] of packed[i, word[t]] is set (W = ceil(V / 32) words per row)
    allowed: Any = None


def apply_penalties(xp, logits, counts, seen, presence, frequency, repetition):
    """logits, counts [N, V], seen [N, V] bool; presence, frequency, repetition [N]."""
    rep = repetition[:, None]  # [N, 1]
    logits = xp.where(seen, xp.where(logits > 0, logits / rep, logits * rep), logits)  # [N, V]
    logits = logits - frequency[:, None] * counts  # [N, V]
    return logits - presence[:, None] * xp.astype(counts > 0, logits.dtype)  # [N, V]


def sample(xp, logits, tensors: SamplingTensors):
    """logits [N, V] -> sampled token ids [N], for N rows over a vocabulary of V tokens."""
    if tensors.allowed is not None:  # a grammar's mask comes first, as in vLLM
        packed, word, bit = tensors.allowed
        bits = (xp.take(packed, word, axis=1) >> bit) & 1  # [N, V] int32, 1: allowed
        logits = xp.where(bits != 0, logits, -xp.inf)  # [N, V]
    if tensors.bias is not None:
        logits = logits + tensors.bias  # [N, V]
    if tensors.penalties is not None:
        logits = apply_penalties(xp, logits, *tensors.penalties)  # [N, V]
    if tensors.banned is not None:
        logits = xp.where(tensors.banned, -xp.inf, logits)  # [N, V]
    greedy = xp.argmax(logits, axis=-1)  # [N]
    if tensors.all_greedy:
        return greedy
    V = logits.shape[-1]
    temp = xp.where(tensors.temperature > 0, tensors.temperature, 1.0)  # [N]
    z = logits / temp[:, None]  # [N, V]
    order = None
    if tensors.needs_sort:
        order = xp.argsort(z, axis=-1, descending=True, stable=True)  # [N, V] token ids
        z = xp.take_along_axis(z, order, axis=-1)  # [N, V], descending
    probs = softmax(xp, z)  # [N, V]
    if tensors.needs_min_p:
        top = xp.max(probs, axis=-1, keepdims=True)  # [N, 1]
        probs = xp.where(probs >= tensors.min_p[:, None] * top, probs, 0.0)  # [N, V]
    if tensors.needs_sort:
        rank = xp.cumulative_sum(xp.ones_like(probs), axis=-1)  # 1-based, on probs' device
        keep = rank <= xp.astype(tensors.top_k, probs.dtype)[:, None]  # [N, V]
        before = xp.cumulative_sum(probs, axis=-1) - probs  # [N, V] mass ranked above
        keep = keep & (before < tensors.top_p[:, None] * xp.sum(probs, axis=-1, keepdims=True))
        probs = xp.where(keep, probs, 0.0)  # [N, V]
    cdf = xp.cumulative_sum(probs, axis=-1)  # [N, V]
    target = tensors.uniform[:, None] * cdf[:, -1:]  # [N, 1]
    choice = xp.clip(xp.sum(xp.astype(cdf <= target, greedy.dtype), axis=-1), 0, V - 1)  # [N]
    if order is not None:  # sorted position -> token id
        choice = xp.take_along_axis(order, xp.astype(choice, order.dtype)[:, None], axis=-1)[:, 0]
    return xp.where(tensors.temperature > 0, xp.astype(choice, greedy.dtype), greedy)  # [N]
