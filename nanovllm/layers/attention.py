"""Paged attention over a KV pool, written against the array API.

The pool of one layer holds K (and one holds V) head-major, `[kv_heads, num_slots, head_dim]`,
a slot being `block * block_size + offset`: one KV head's keys for a run of slots lie back
to back, so a decode query reads them as one contiguous slice per head. Every query reads
its sequence's whole context (cached prefix plus the new tokens) back from the pool through
the slot indices the runner derived from the block tables; the masks say which keys a query
may see (causal, within the context, and within the layer's sliding window if it has one).
Grouped heads share one gathered K/V: queries are shaped [seq, kv_head, group * Q, d].

The step's rows are cut into parts (runner/attention_layout.py builds them). A part is S
items of Q queries over K keys each. Without a combine table an item is a whole sequence
(its queries see all their keys) and is normalized at once. With one, an item is a tile of
queries over one tile of keys: each item yields partial results (running max, sum of
exponentials, unnormalized output) per query, and each output row merges the partials of
its items, as flash-decoding does.

A whole item is normalized after its values are summed: the exponentials' sums divide the
[Q, D] output rather than the [Q, K] weights, one pass fewer over the scores. Its mask comes
as an additive bias (0 or -inf), made once per step and shared by every layer: one addition
where a select by a broadcast boolean mask takes several times as long (numpy, [9, 128, 512]
scores: 0.10 ms against 0.35-0.67).

A backend with a fused attention kernel (torch's scaled_dot_product_attention on the CPU;
numpy's, which works on the scores in place) takes whole items through it instead
(`_attend_fused`): the step's metadata carries the kernel, and the items' keys and values are
gathered or sliced as above. Layers that softcap their scores (Gemma 2) stay written out, and
so does a lone decode query where the backend says its kernel does not take one (numpy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(slots=True)
class AttentionPart:
    """Rows [first_row, first_row + num_rows) of the step: num_seqs items of query_len queries
    over context_len keys each."""

    # sizes, not arrays: a jitting backend compiles once per value of these
    static_fields: ClassVar[tuple[str, ...]] = (
        "num_seqs",
        "query_len",
        "context_len",
        "first_row",
        "num_rows",
        "context_runs",
    )
    context_slots: Any  # [S, K] pool slots of each item's keys (padded with null slots)
    mask: Any  # [S, 1, 1, Q, K] bool: may query q attend to key k (tiles; None for a whole item)
    num_seqs: int  # S
    query_len: int  # Q: 1 for decode
    context_len: int  # K
    first_row: int = 0
    num_rows: int = 0
    query_index: Any = None  # [S*Q] the part's rows forming the items' queries (None: as is)
    combine_index: Any = None  # [num_rows, B] each row's partial rows, index S*Q: none
    # eager backends, one item (S = 1): its keys as runs (first slot, length) of consecutive
    # pool slots, read as slices instead of through context_slots (None: gathered)
    context_runs: tuple[tuple[int, int], ...] | None = None
    # whole items (no combine table): the mask as 0 where a query may attend, -inf where not,
    # [S, 1, 1, Q, K] in the compute dtype
    bias: Any = None

    @property
    def lone_query(self) -> bool:
        """One decode query whose keys are runs of slots (read by _attend_one_query)."""
        return self.context_runs is not None and self.query_len == 1


@dataclass(slots=True)
class AttentionMetadata:
    static_fields: ClassVar[tuple[str, ...]] = ("fused",)
    slot_mapping: Any  # [T] where each new token's K/V is written
    parts: list  # AttentionParts covering the step's rows in order, for full-attention layers
    # per sliding window of the model's layers, the parts of a layer with that window: each
    # reads only the keys inside its queries' windows
    window_parts: dict[int, list] = field(default_factory=dict)
    state: Any = None  # recurrent-state slots of hybrid models (layers/mamba2.StateMetadata)
    # the backend's fused attention for whole items (Backend.fused_attention), None: written out
    fused: Any = None
    # whether it also takes a lone decode query whose keys are runs of slots (else that goes
    # through _attend_one_query; Backend.fused_attention_lone_query)
    fused_lone_query: bool = True


def write_kv(backend, k_pool, v_pool, k, v, slot_mapping):
    """k, v [T, KV, D] of the step's tokens -> the pools [KV, num_slots, D], token t at slot
    slot_mapping[t]."""
    xp = backend.xp
    return (
        backend.scatter_rows(k_pool, slot_mapping, xp.permute_dims(k, (1, 0, 2)), axis=1),
        backend.scatter_rows(v_pool, slot_mapping, xp.permute_dims(v, (1, 0, 2)), axis=1),
    )


def _gather(xp, pool, part: AttentionPart):
    """The part's items' keys (or values) read from a pool [KV, num_slots, D] through their
    slots -> [KV, S, K, D]."""
    KV, D = pool.shape[0], pool.shape[2]
    slots = xp.reshape(part.context_slots, (-1,))  # [S*K]
    return xp.reshape(xp.take(pool, slots, axis=1), (KV, part.num_seqs, part.context_len, D))


def _runs(xp, pool, runs):
    """Keys (or values) that lie in runs of consecutive slots of a pool [KV, num_slots, D] ->
    [KV, K, D]: a view of the pool for one run (at a 4,096-token context, copying them cost a
    torch decode step 0.48 of its speed at 128 tokens, where the view costs 0.68)."""
    if len(runs) == 1:
        ((a, n),) = runs
        return pool[:, a : a + n, :]
    return xp.concat([pool[:, a : a + n, :] for a, n in runs], axis=1)


def _weighted(p, values):
    """p [..., K] @ the values [..., K, D], given as runs of keys (each [..., n, D]) -> [..., D]."""
    if len(values) == 1:
        return p @ values[0]
    out, first = None, 0
    for v in values:
        n = v.shape[-2]
        term = p[..., first : first + n] @ v
        out, first = (term if out is None else out + term), first + n
    return out


# a lone decode query's scores come from queries times keys up to this many keys, from keys
# times queries past it (see _attend_one_query)
SHORT_CONTEXT = 384


def _attend_one_query(xp, q, k_pool, v_pool, part: AttentionPart, scale: float, softcap=None):
    """One decode query q [1, H, D] over keys that are runs of consecutive pool slots ->
    [1, H*D]. The query sees every one of its keys (exact_part starts them at its window), so
    there is no mask.

    A run's keys are a slice of each KV head's rows, [KV, n, D]. Up to SHORT_CONTEXT keys the
    scores come from queries times keys ([KV, G, D] @ [KV, D, n]), laid out [KV, G, K] as the
    softmax wants them. Past it, from keys times queries ([KV, n, D] @ [KV, D, G]): the long
    side of the product is then the keys, which OpenBLAS splits across its threads and streams
    once, where queries times keys runs its small-matrix kernels; the scores are then copied
    into the [KV, G, K] layout (a ufunc keeps its input's layout, and a softmax along strided
    rows is slow). numpy, SmolLM2's 3 x 3 heads: 17 against 25 us at 102 keys, 37 against 38 at
    384, 90 against 62 at 512 and 346 against 191 at 2,048.
    """
    H, D = q.shape[1], q.shape[2]
    KV = k_pool.shape[0]
    G = H // KV
    runs = part.context_runs
    assert runs is not None
    q = xp.reshape(q * scale, (KV, G, D))  # [KV, G, D]
    if part.context_len <= SHORT_CONTEXT:
        scores = [q @ xp.permute_dims(k_pool[:, a : a + n, :], (0, 2, 1)) for a, n in runs]
        scores = scores[0] if len(scores) == 1 else xp.concat(scores, axis=-1)  # [KV, G, K]
    else:
        q = xp.permute_dims(q, (0, 2, 1))  # [KV, D, G]
        scores = [k_pool[:, a : a + n, :] @ q for a, n in runs]  # [KV, n, G] each
        scores = scores[0] if len(scores) == 1 else xp.concat(scores, axis=1)
        K = scores.shape[1]
        scores = xp.reshape(xp.permute_dims(scores, (0, 2, 1)), (KV, G, K), copy=True)
    if softcap is not None:
        scores = xp.tanh(scores / softcap) * softcap
    weights = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))  # [KV, G, K]
    out = _weighted(weights, [v_pool[:, a : a + n, :] for a, n in runs])  # [KV, G, D]
    out = out / xp.sum(weights, axis=-1, keepdims=True)  # normalized: [KV, G, D]
    return xp.reshape(out, (1, H * D))


def _attend_part(xp, q, k_pool, v_pool, part: AttentionPart, scale: float, softcap=None):
    """q [S*Q, H, D] (the items' queries) -> [num_rows, H*D].

    S items of Q queries over K keys each (the part's num_seqs, query_len, context_len); H query
    heads, KV key/value heads, G = H // KV query heads per K/V head, D head_dim. With a combine
    table, R = num_rows output rows, each merging B partial results.
    """
    S, Q, K = part.num_seqs, part.query_len, part.context_len
    if part.lone_query:
        return _attend_one_query(xp, q, k_pool, v_pool, part, scale, softcap)
    H, D = q.shape[1], q.shape[2]
    KV = k_pool.shape[0]
    G = H // KV
    if part.context_runs is None:  # gathered through the slots
        keys = [xp.permute_dims(_gather(xp, k_pool, part), (1, 0, 3, 2))]  # [S, KV, D, K]
        values = [xp.permute_dims(_gather(xp, v_pool, part), (1, 0, 2, 3))]  # [S, KV, K, D]
    else:  # one item whose keys are runs of consecutive slots: slices of the pools, not copies
        runs = part.context_runs
        keys = [xp.permute_dims(k_pool[:, a : a + n, :], (0, 2, 1))[None, ...] for a, n in runs]
        values = [v_pool[:, a : a + n, :][None, ...] for a, n in runs]
    q = xp.reshape(q, (S, Q, KV, G, D))  # [S, Q, KV, G, D]
    q = xp.reshape(xp.permute_dims(q, (0, 2, 3, 1, 4)), (S, KV, G * Q, D)) * scale
    scores = [q @ k for k in keys]  # [S, KV, G*Q, K] (each run's keys)
    scores = scores[0] if len(scores) == 1 else xp.concat(scores, axis=-1)
    scores = xp.reshape(scores, (S, KV, G, Q, K))  # [S, KV, G, Q, K]
    if softcap is not None:  # Gemma 2: scores squashed into (-softcap, softcap)
        scores = xp.tanh(scores / softcap) * softcap

    def rows(x):  # [S, KV, G, Q, ...] -> [S*Q, H, ...]
        x = xp.permute_dims(x, (0, 3, 1, 2) + tuple(range(4, x.ndim)))
        return xp.reshape(x, (S * Q, H) + tuple(x.shape[4:]))

    if part.combine_index is None:  # each item is a whole sequence: normalize at once
        scores = scores + part.bias  # bias [S, 1, 1, Q, K]: -inf where a key is not seen
        # every query sees a key (a padding query its item's first), so the max is finite
        weights = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))  # [S, KV, G, Q, K]
        total = xp.sum(weights, axis=-1, keepdims=True)  # [S, KV, G, Q, 1]
        weights = xp.reshape(weights, (S, KV, G * Q, K))
        out = xp.reshape(_weighted(weights, values), (S, KV, G, Q, D)) / total
        return xp.reshape(rows(out), (S * Q, H * D))  # [S*Q, H*D], S*Q = num_rows
    # each item is a tile: partial results per query, merged per output row below
    scores = xp.where(part.mask, scores, -xp.inf)  # mask [S, 1, 1, Q, K]
    m = xp.max(scores, axis=-1, keepdims=True)  # [S, KV, G, Q, 1]: -inf where no key is seen
    p = xp.exp(scores - xp.where(m == -xp.inf, 0.0, m))  # [S, KV, G, Q, K]
    total = rows(xp.sum(p, axis=-1))  # [S*Q, H]
    out = rows(
        xp.reshape(_weighted(xp.reshape(p, (S, KV, G * Q, K)), values), (S, KV, G, Q, D))
    )  # [S*Q, H, D], unnormalized
    m = rows(m[..., 0])  # [S*Q, H]
    # row S*Q: an empty partial, for combine entries past a row's items
    m = xp.concat([m, xp.full_like(m[:1, ...], -xp.inf)], axis=0)  # [S*Q + 1, H]
    total = xp.concat([total, xp.zeros_like(total[:1, ...])], axis=0)  # [S*Q + 1, H]
    out = xp.concat([out, xp.zeros_like(out[:1, ...])], axis=0)  # [S*Q + 1, H, D]
    R, B = part.combine_index.shape
    index = xp.reshape(part.combine_index, (-1,))  # [R*B]
    m = xp.reshape(xp.take(m, index, axis=0), (R, B, H))  # [R, B, H]
    top = xp.max(m, axis=1, keepdims=True)  # [R, 1, H]
    weight = xp.exp(m - xp.where(top == -xp.inf, 0.0, top))  # [R, B, H]
    totals = weight * xp.reshape(xp.take(total, index, axis=0), (R, B, H))  # [R, B, H]
    outs = weight[..., None] * xp.reshape(xp.take(out, index, axis=0), (R, B, H, D))  # [R, B, H, D]
    # merged one key tile at a time, in key order: the same sums whatever the batch
    total, out = totals[:, 0, ...], outs[:, 0, ...]  # [R, H], [R, H, D]
    for j in range(1, B):
        total, out = total + totals[:, j, ...], out + outs[:, j, ...]
    out = out / xp.where(total > 0, total, 1.0)[..., None]  # rows with no keys: zeros
    return xp.reshape(out, (R, H * D))  # [R, H*D]


def _attend_fused(xp, fused, q, k_pool, v_pool, part: AttentionPart, scale: float):
    """Whole items through the backend's fused attention: q [S*Q, H, D] -> [S*Q, H*D]."""
    S, Q, K = part.num_seqs, part.query_len, part.context_len
    H, D = q.shape[1], q.shape[2]
    if part.context_runs is None:  # gathered through the slots
        k = xp.permute_dims(_gather(xp, k_pool, part), (1, 0, 2, 3))  # [S, KV, K, D]
        v = xp.permute_dims(_gather(xp, v_pool, part), (1, 0, 2, 3))  # [S, KV, K, D]
    else:  # one item: its runs of consecutive slots as slices, joined only when several
        k, v = (_runs(xp, pool, part.context_runs)[None, ...] for pool in (k_pool, v_pool))
    q = xp.permute_dims(xp.reshape(q, (S, Q, H, D)), (0, 2, 1, 3))  # [S, H, Q, D]
    out = fused(q, k, v, xp.reshape(part.bias, (S, 1, Q, K)), scale)  # [S, H, Q, D]
    return xp.reshape(xp.permute_dims(out, (0, 2, 1, 3)), (S * Q, H * D))


def paged_attention(
    xp,
    q,
    k_pool,
    v_pool,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
):
    """q [T, H, D] for the step's T tokens, whose K/V are already in the pools
    [KV, num_slots, D] -> [T, H*D]. A layer with a sliding `window` reads the parts built for
    it; `softcap` squashes the scaled scores with tanh before the softmax."""
    outs = []
    for part in meta.parts if window is None else meta.window_parts[window]:
        part_q = q[part.first_row : part.first_row + part.num_rows, ...]  # [num_rows, H, D]
        if part.query_index is not None:  # tiles: the rows that form each item's queries
            part_q = xp.take(part_q, part.query_index, axis=0)  # [S*Q, H, D]
        fused = meta.fused is not None and part.bias is not None and softcap is None
        if fused and (meta.fused_lone_query or not part.lone_query):
            out = _attend_fused(xp, meta.fused, part_q, k_pool, v_pool, part, scale)
        else:
            out = _attend_part(xp, part_q, k_pool, v_pool, part, scale, softcap)  # [num_rows, H*D]
        outs.append(out)
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)  # [T, H*D]
