"""Paged attention over a KV pool, written against the array API.

The pool of one layer holds K (and one holds V) as rows `[num_slots, kv_heads, head_dim]`,
a slot being `block * block_size + offset`. Every query reads its sequence's whole context
(cached prefix plus the new tokens) back from the pool through the slot indices the runner
derived from the block tables; the masks say which keys a query may see (causal, within the
context, and within a sliding window if any). Grouped heads share one gathered K/V: queries
are shaped [seq, kv_head, group * Q, d].

The step's rows are cut into parts (runner/attention_layout.py builds them). A part is S
items of Q queries over L keys each. Without a combine table an item is a whole sequence
(its queries see all their keys) and is normalized at once. With one, an item is a tile of
queries over one tile of keys: each item yields partial results (running max, sum of
exponentials, unnormalized output) per query, and each output row merges the partials of
its items, as flash-decoding does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .activation import softmax


@dataclass(slots=True)
class AttentionPart:
    """Rows [first_row, first_row + num_rows) of the step: num_seqs items of query_len queries
    over context_len keys each."""
    # sizes, not arrays: a jitting backend compiles once per value of these
    static_fields: ClassVar[tuple[str, ...]] = ("num_seqs", "query_len", "context_len",
                                                "first_row", "num_rows")
    context_slots: Any  # [S, L] pool slots of each item's keys (padded with null slots)
    mask: Any  # [S, 1, 1, Q, L] bool: may query q attend to key l
    num_seqs: int  # S
    query_len: int  # Q: 1 for decode
    context_len: int  # L
    first_row: int = 0
    num_rows: int = 0
    query_index: Any = None  # [S*Q] the part's rows forming the items' queries (None: as is)
    combine_index: Any = None  # [num_rows, B] each row's partial rows, index S*Q: none


@dataclass(slots=True)
class AttentionMetadata:
    static_fields: ClassVar[tuple[str, ...]] = ()
    slot_mapping: Any  # [T] where each new token's K/V is written
    parts: list  # AttentionParts covering the step's rows in order
    state: Any = None  # recurrent-state slots of hybrid models (layers/mamba2.StateMetadata)


def write_kv(backend, k_pool, v_pool, k, v, slot_mapping):
    return (backend.scatter_rows(k_pool, slot_mapping, k),
            backend.scatter_rows(v_pool, slot_mapping, v))


def _attend_part(xp, q, k_pool, v_pool, part: AttentionPart, scale: float):
    """q: [S*Q, heads, d] (the items' queries) -> [S*Q or num_rows, heads*d]."""
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
    scores = xp.where(part.mask, scores, -xp.inf)

    def rows(x):  # [S, kvh, group, Q, ...] -> [S*Q, heads, ...]
        x = xp.permute_dims(x, (0, 3, 1, 2) + tuple(range(4, x.ndim)))
        return xp.reshape(x, (S * Q, heads) + tuple(x.shape[4:]))

    if part.combine_index is None:
        probs = xp.reshape(softmax(xp, scores), (S, kv_heads, group * Q, L))
        out = xp.reshape(probs @ v, (S, kv_heads, group, Q, d))
        return xp.reshape(rows(out), (S * Q, heads * d))
    m = xp.max(scores, axis=-1, keepdims=True)  # -inf where a query sees no key of the item
    p = xp.exp(scores - xp.where(m == -xp.inf, 0.0, m))
    total = rows(xp.sum(p, axis=-1))  # [S*Q, heads]
    out = rows(xp.reshape(xp.reshape(p, (S, kv_heads, group * Q, L)) @ v,
                          (S, kv_heads, group, Q, d)))  # [S*Q, heads, d], unnormalized
    m = rows(m[..., 0])
    # row S*Q: an empty partial, for combine entries past a row's items
    m = xp.concat([m, xp.full_like(m[:1, ...], -xp.inf)], axis=0)
    total = xp.concat([total, xp.zeros_like(total[:1, ...])], axis=0)
    out = xp.concat([out, xp.zeros_like(out[:1, ...])], axis=0)
    R, B = part.combine_index.shape
    index = xp.reshape(part.combine_index, (-1,))
    m = xp.reshape(xp.take(m, index, axis=0), (R, B, heads))
    top = xp.max(m, axis=1, keepdims=True)
    weight = xp.exp(m - xp.where(top == -xp.inf, 0.0, top))  # [R, B, heads]
    totals = weight * xp.reshape(xp.take(total, index, axis=0), (R, B, heads))
    outs = weight[..., None] * xp.reshape(xp.take(out, index, axis=0), (R, B, heads, d))
    # merged one key tile at a time, in key order: the same sums whatever the batch
    total, out = totals[:, 0, ...], outs[:, 0, ...]
    for j in range(1, B):
        total, out = total + totals[:, j, ...], out + outs[:, j, ...]
    out = out / xp.where(total > 0, total, 1.0)[..., None]  # rows with no keys: zeros
    return xp.reshape(out, (R, heads * d))


def paged_attention(xp, q, k_pool, v_pool, meta: AttentionMetadata, scale: float):
    """q: [T, heads, d] for the step's tokens, whose K/V are already in the pools."""
    outs = []
    for part in meta.parts:
        qp = q[part.first_row:part.first_row + part.num_rows, ...]
        if part.query_index is not None:
            qp = xp.take(qp, part.query_index, axis=0)
        outs.append(_attend_part(xp, qp, k_pool, v_pool, part, scale))
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)
