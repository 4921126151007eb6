"""Where each query of a step reads its keys: the attention parts, built on the host with numpy.

Two layouts (see layers/attention.py for the arithmetic):

- `exact_part`: sequences padded to one [S, Q] x K rectangle, every query normalized over its
  whole context (or window) at once. The eager backends use one per prefill chunk and one per
  run of decode sequences of similar context length, so nearly nothing is padding.
- `tiled_part`: a jitting backend needs few distinct shapes, and one rectangle over a whole
  step pads every query to the longest context (3-4x the work on a mixed batch). Instead the
  queries are cut into tiles of `Qt` rows of one sequence and each tile's context into key tiles
  of `Kt` keys; every (query tile, key tile) pair is one item, padded only to Qt x Kt, and the
  number of items is what gets rounded up. Each query's partial results from its items (one per
  key tile) are merged by the combine table, as in flash-decoding. The batch-invariant mode
  uses these on every backend, with decodes padded to full query tiles: key tiles start at
  absolute positions, so a query's sums never depend on what else is in the step.

The parts are built with numpy on the host; `to_device` hands their arrays to the backend.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..layers.attention import AttentionPart

MAX_RUNS = 8  # an exact part's keys are read as slices of the pool up to this many runs


def to_device(part: AttentionPart, backend, first_row: int, num_rows: int) -> AttentionPart:
    """A copy of the host-built part with its arrays on the backend, placed at rows
    [first_row, first_row + num_rows) of the step. A whole item's mask goes as an additive
    bias in the compute dtype; a tile's as the boolean mask."""
    b = backend
    device = replace(
        part, first_row=first_row, num_rows=num_rows, context_slots=b.index(part.context_slots)
    )
    if part.query_index is None:
        bias = np.where(part.mask, np.float32(0.0), np.float32(-np.inf))
        device.mask, device.bias = None, b.step_input(bias, dtype=b.dtype)
    else:
        device.mask = b.step_input(part.mask)
        device.query_index = b.index(part.query_index)
        device.combine_index = b.index(part.combine_index)
    return device


def block_tables(seqs, num_blocks: int) -> np.ndarray:
    """[len(seqs), num_blocks] block ids, padded with the null block 0."""
    table = np.zeros((len(seqs), num_blocks), dtype=np.int64)
    for i, s in enumerate(seqs):
        blocks = s.block_table[:num_blocks]
        table[i, : len(blocks)] = blocks
    return table


def exact_part(
    seqs, num_seqs: int, query_len: int, block_size: int, window: int | None
) -> AttentionPart:
    """`seqs` padded to num_seqs x query_len queries over K keys each.

    Each sequence's keys start at the first one its first query can see (0 without a window;
    with one, window - 1 before that query), so a sliding layer gathers about a window of keys
    however long the context. K is the most any sequence needs. Padding queries see their
    item's first key only (so their output stays finite); padding keys are masked out.
    """
    S, bs = num_seqs, block_size
    starts = np.zeros(S, dtype=np.int64)
    lens = np.zeros(S, dtype=np.int64)
    for i, s in enumerate(seqs):
        starts[i], lens[i] = s.start, len(s.token_ids)
    k_lo = np.maximum(starts - window + 1, 0) if window is not None else np.zeros_like(starts)
    k_hi = starts + lens  # keys [k_lo, k_hi) of each sequence
    K = int((k_hi - k_lo).max())
    key_pos = k_lo[:, None] + np.arange(K)  # [S, K]
    blocks = -(-int(k_hi.max()) // bs)
    table = np.zeros((S, blocks), dtype=np.int64)
    table[: len(seqs)] = block_tables(seqs, blocks)
    block = np.take_along_axis(table, np.minimum(key_pos // bs, blocks - 1), axis=1)
    slots = np.where(key_pos < k_hi[:, None], block * bs + key_pos % bs, 0)
    q = np.arange(query_len)[None, :]
    real = q < lens[:, None]  # [S, Q]
    q_pos = np.where(real, starts[:, None] + q, -1)[:, :, None]  # [S, Q, 1]
    keys = key_pos[:, None, :]  # [S, 1, K]
    mask = keys <= q_pos
    if window is not None:
        mask &= keys > q_pos - window
    mask[:, :, 0] |= ~real
    part = AttentionPart(slots, mask[:, None, None, :, :], S, query_len, K)
    if S == 1 and (query_len > 1 or mask.all()):  # (a lone decode query sees all its keys)
        part.context_runs = slot_runs(slots[0])
    return part


def slot_runs(slots: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """One item's key slots as runs of consecutive pool slots, (first slot, length) each, when
    they make at most MAX_RUNS: the attention then reads each run as a slice of the pool (a
    view) instead of gathering the keys. The block manager gives a growing sequence the block
    after its last where it can, so a lone sequence's context is usually one run."""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    if len(breaks) >= MAX_RUNS:
        return None
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(slots)]])
    return tuple((int(slots[a]), int(b - a)) for a, b in zip(starts, ends))


def tiled_part(
    tables: np.ndarray,
    q_pos: np.ndarray,
    q_row: np.ndarray,
    num_rows: int,
    block_size: int,
    key_tile: int,
    window: int | None,
    item_bucket,
    bucket,
) -> AttentionPart:
    """Query tiles over key tiles, for a jitting backend.

    tables: [n, blocks] the block table of each query tile's sequence; q_pos: [n, Qt] the
    position of each query (-1: padding); q_row: [n, Qt] its row in the part (any for padding);
    num_rows: the part's rows (rows no query names get zeros). The number of items is rounded
    up with `item_bucket`, the combine width with `bucket`.
    """
    n, Qt = q_pos.shape
    Kt, bs = key_tile, block_size
    valid = q_pos >= 0
    k_hi = q_pos.max(axis=1) + 1  # keys [k_lo, k_hi) can be seen by some query of the tile
    k_lo = np.zeros(n, dtype=np.int64)
    if window is not None:
        k_lo = np.maximum(np.where(valid, q_pos, k_hi[:, None]).min(axis=1) - window + 1, 0)
    first = k_lo // Kt
    count = np.where(k_hi > 0, -(-k_hi // Kt) - first, 0)
    num_items = int(count.sum())
    W = item_bucket(max(num_items, 1))
    tile = np.repeat(np.arange(n), count)  # the query tile of each item
    offset = np.cumsum(count) - count
    j = np.arange(num_items) - offset[tile]  # the item's index among its tile's items
    key_pos = (first[tile] + j)[:, None] * Kt + np.arange(Kt)  # [items, Kt]
    in_context = key_pos < k_hi[tile][:, None]
    block = tables[tile[:, None], np.minimum(key_pos // bs, tables.shape[1] - 1)]
    slots = np.zeros((W, Kt), dtype=np.int64)
    slots[:num_items] = np.where(in_context, block * bs + key_pos % bs, 0)
    qp = q_pos[tile][:, :, None]
    mask = np.zeros((W, Qt, Kt), dtype=bool)
    seen = (key_pos[:, None, :] <= qp) & in_context[:, None, :] & (qp >= 0)
    if window is not None:
        seen &= key_pos[:, None, :] > qp - window
    mask[:num_items] = seen
    query_index = np.zeros((W, Qt), dtype=np.int64)
    query_index[:num_items] = np.where(valid[tile], q_row[tile], 0)
    # output row r merges the partial rows (item * Qt + its place in the tile) of its items;
    # index W * Qt is an empty partial (no keys) appended by the attention
    B = bucket(max(int(count.max(initial=0)), 1))
    combine = np.full((num_rows, B), W * Qt, dtype=np.int64)
    partial = np.arange(num_items)[:, None] * Qt + np.arange(Qt)
    keep = valid[tile]
    combine[q_row[tile][keep], np.broadcast_to(j[:, None], keep.shape)[keep]] = partial[keep]
    part = AttentionPart(slots, mask[:, None, None, :, :], W, Qt, Kt, num_rows=num_rows)
    part.query_index, part.combine_index = query_index.reshape(-1), combine
    return part


def decode_tiles(decode, query_tile: int = 1) -> tuple:
    """Decode sequences as tiles of one query (padded to query_tile) on rows 0, 1, ...:
    (tables, q_pos, q_row) for `tiled_part`. The query at position p sits at place
    p % query_tile of its tile, where an aligned prefill tile would put it."""
    blocks = max(len(s.block_table) for s in decode)
    n = len(decode)
    pos = np.array([s.context_len - 1 for s in decode], dtype=np.int64)
    q_pos = np.full((n, query_tile), -1, dtype=np.int64)
    q_pos[np.arange(n), pos % query_tile] = pos
    q_row = np.zeros((n, query_tile), dtype=np.int64)
    q_row[np.arange(n), pos % query_tile] = np.arange(n)
    return block_tables(decode, blocks), q_pos, q_row


def prefill_tiles(prefill, query_tile: int, aligned: bool = False) -> tuple:
    """Prefill chunks, laid out back to back, cut into tiles of query_tile rows: (tables,
    q_pos, q_row) for `tiled_part`. Aligned, tiles start at multiples of query_tile in the
    sequence, so a query's place in its tile never depends on where its chunk began."""
    blocks = max(len(s.block_table) for s in prefill)
    table = block_tables(prefill, blocks)
    tables, q_pos, q_row, row = [], [], [], 0
    step = np.arange(query_tile)
    for i, s in enumerate(prefill):
        n = len(s.token_ids)
        first = -(s.start % query_tile) if aligned else 0  # chunk offset of the first tile
        for t in range(first, n, query_tile):
            inside = (t + step >= 0) & (t + step < n)
            q_pos.append(np.where(inside, s.start + t + step, -1))
            q_row.append(np.where(inside, row + t + step, 0))
            tables.append(table[i])
        row += n
    return np.stack(tables), np.stack(q_pos), np.stack(q_row)
