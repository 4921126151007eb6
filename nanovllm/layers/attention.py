"""Paged attention over a KV pool, written against the array API.

The pool of one layer holds K (and one holds V) as rows `[num_slots, kv_heads, head_dim]`,
a slot being `block * block_size + offset`. Every query reads its sequence's whole context
(cached prefix plus the new tokens) back from the pool through the slot indices the runner
derived from the block tables; the masks say which keys a query may see (causal, within the
context, and within a sliding window if any). The step's rows are cut into parts: sequences
of similar query and context lengths, padded to a common [S, Q] x L. Grouped heads share one
gathered K/V: queries are shaped [seq, kv_head, group * Q, d].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .activation import softmax


@dataclass(slots=True)
class AttentionPart:
    """Rows [first_row, first_row + num_rows) of the step: num_seqs sequences padded to a
    common query length and context length."""
    context_slots: Any  # [S, L] pool slots of each sequence's context (padded with null slots)
    mask: Any  # [S, 1, 1, Q, L] bool: may query q attend to key l
    num_seqs: int
    query_len: int  # Q: 1 for decode
    context_len: int  # L
    first_row: int = 0
    num_rows: int = 0
    query_index: Any = None  # [S*Q] rows of the part forming the padded queries (None: as is)
    output_index: Any = None  # [num_rows] padded outputs to keep (None: all, as is)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: Any  # [T] where each new token's K/V is written
    parts: list  # AttentionParts covering the step's rows in order
    state: Any = None  # recurrent-state slots of hybrid models (layers/mamba2.StateMetadata)


def write_kv(backend, k_pool, v_pool, k, v, slot_mapping):
    return (backend.scatter_rows(k_pool, slot_mapping, k),
            backend.scatter_rows(v_pool, slot_mapping, v))


def _attend_part(xp, q, k_pool, v_pool, part: AttentionPart, scale: float):
    """q: [S*Q, heads, d] (already padded) -> [S*Q, heads*d]."""
    S, Q, L = part.num_seqs, part.query_len, part.context_len
    heads, d = q.shape[1], q.shape[2]
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    slots = xp.reshape(part.context_slots, (-1,))
    k = xp.reshape(xp.take(k_pool, slots, axis=0), (S, L, kv_heads, d))
    v = xp.reshape(xp.take(v_pool, slots, axis=0), (S, L, kv_heads, d))
    q = xp.reshape(q, (S, Q, kv_heads, group, d))
    q = xp.reshape(xp.permute_dims(q, (0, 2, 3, 1, 4)), (S, kv_heads, group * Q, d))
    k = xp.permute_dims(k, (0, 2, 3, 1))  # [S, kvh, d, L]
    v = xp.permute_dims(v, (0, 2, 1, 3))  # [S, kvh, L, d]
    scores = xp.reshape((q @ k) * scale, (S, kv_heads, group, Q, L))
    probs = softmax(xp, xp.where(part.mask, scores, -xp.inf))
    out = xp.reshape(probs, (S, kv_heads, group * Q, L)) @ v
    out = xp.permute_dims(xp.reshape(out, (S, kv_heads, group, Q, d)), (0, 3, 1, 2, 4))
    return xp.reshape(out, (S * Q, heads * d))


def paged_attention(xp, q, k_pool, v_pool, meta: AttentionMetadata, scale: float):
    """q: [T, heads, d] for the step's tokens, whose K/V are already in the pools."""
    outs = []
    for part in meta.parts:
        qp = q[part.first_row:part.first_row + part.num_rows, ...]
        if part.query_index is not None:
            qp = xp.take(qp, part.query_index, axis=0)
        out = _attend_part(xp, qp, k_pool, v_pool, part, scale)
        if part.output_index is not None:
            out = xp.take(out, part.output_index, axis=0)
        outs.append(out)
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)
