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


def apply_penalties(xp, logits, counts, seen, presence, frequency, repetition):
    rep = repetition[:, None]
    logits = xp.where(seen, xp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * xp.astype(counts > 0, logits.dtype)


def sample(xp, logits, t: SamplingTensors):
    """logits [N, V] -> sampled token ids [N]."""
    if t.bias is not None:
        logits = logits + t.bias
    if t.penalties is not None:
        logits = apply_penalties(xp, logits, *t.penalties)
    if t.banned is not None:
        logits = xp.where(t.banned, -xp.inf, logits)
    greedy = xp.argmax(logits, axis=-1)
    if t.all_greedy:
        return greedy
    V = logits.shape[-1]
    temp = xp.where(t.temperature > 0, t.temperature, 1.0)
    z = logits / temp[:, None]
    order = None
    if t.needs_sort:
        order = xp.argsort(z, axis=-1, descending=True, stable=True)
        z = xp.take_along_axis(z, order, axis=-1)
    probs = softmax(xp, z)
    if t.needs_min_p:
        top = xp.max(probs, axis=-1, keepdims=True)
        probs = xp.where(probs >= t.min_p[:, None] * top, probs, 0.0)
    if t.needs_sort:
        rank = xp.cumulative_sum(xp.ones_like(probs), axis=-1)  # 1-based, on probs' device
        keep = rank <= xp.astype(t.top_k, probs.dtype)[:, None]
        before = xp.cumulative_sum(probs, axis=-1) - probs
        keep = keep & (before < t.top_p[:, None] * xp.sum(probs, axis=-1, keepdims=True))
        probs = xp.where(keep, probs, 0.0)
    cdf = xp.cumulative_sum(probs, axis=-1)
    target = t.uniform[:, None] * cdf[:, -1:]
    choice = xp.clip(xp.sum(xp.astype(cdf <= target, greedy.dtype), axis=-1), 0, V - 1)
    if order is not None:
        choice = xp.take_along_axis(order, xp.astype(choice, order.dtype)[:, None], axis=-1)[:, 0]
    return xp.where(t.temperature > 0, xp.astype(choice, greedy.dtype), greedy)
