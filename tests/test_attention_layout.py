"""The two attention layouts (runner/attention_layout.py) compute the same attention.

Exact parts (the eager backends') and tiled parts (the jitting backends', whose items are
merged flash-decoding style) are checked against attention written out naively in numpy,
on random pools, block tables, decode and prefill chunks (with cached prefixes), sliding
windows and padding; then a tiny Llama with tiles forced small, so that every query's
context spans several key tiles, is checked against transformers. Both run on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.backend import get_backend
from nanovllm.engine.scheduler import ScheduledSeq
from nanovllm.layers.attention import SHORT_CONTEXT, AttentionMetadata, paged_attention
from nanovllm.runner import attention_layout as layout

BS, KV_HEADS, GROUP, D = 4, 2, 3, 8
HEADS = KV_HEADS * GROUP
NUM_BLOCKS = 64


def pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def same(n: int) -> int:
    return n


class Counted:
    """A backend's fused attention kernel that counts its calls (proof it was taken)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args):
        self.calls += 1
        return self.kernel(*args)


def kernels(b) -> list:
    """None (attention written out) and, where the backend has one, its fused kernel."""
    fused = b.fused_attention()
    return [None] if fused is None else [None, Counted(fused)]


def random_step(rng, num_decode: int, chunks: list[tuple[int, int]]):
    """Decode sequences of random context lengths and prefill chunks (start, length), each
    with its own random blocks of one shared pool."""
    free = list(rng.permutation(np.arange(1, NUM_BLOCKS)))

    def seq(start: int, n: int) -> ScheduledSeq:
        ctx = start + n
        table = [int(free.pop()) for _ in range(-(-ctx // BS))]
        slots = [table[p // BS] * BS + p % BS for p in range(start, ctx)]
        return ScheduledSeq(None, start, [0] * n, slots, table, ctx, True)

    decode = sorted(
        (seq(int(c) - 1, 1) for c in rng.integers(1, 30, num_decode)), key=lambda s: s.context_len
    )
    return decode, [seq(start, n) for start, n in chunks]


def head_major(b, pool: np.ndarray):
    """A token-major host pool [slots, kv_heads, d] laid out as the model allocates its pools,
    [kv_heads, slots, d], on the backend."""
    return b.asarray(np.ascontiguousarray(pool.transpose(1, 0, 2)), dtype=b.dtype)


def reference(q, k_pool, v_pool, seqs, window) -> np.ndarray:
    """Each query over its visible keys, one at a time: [rows, heads * d]. The pools here are
    token-major, [slots, kv_heads, d], independent of the layout the model uses."""
    out = []
    row = 0
    for s in seqs:
        keys = [s.block_table[p // BS] * BS + p % BS for p in range(s.context_len)]
        for i in range(len(s.token_ids)):
            pos = s.start + i
            seen = [p for p in range(pos + 1) if window is None or p > pos - window]
            k = k_pool[[keys[p] for p in seen]]  # [n, kvh, d]
            v = v_pool[[keys[p] for p in seen]]
            qh = q[row].reshape(KV_HEADS, GROUP, D)
            scores = np.einsum("hgd,nhd->hgn", qh, k) / np.sqrt(D)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            out.append(np.einsum("hgn,nhd->hgd", probs, v).reshape(-1))
            row += 1
    return np.stack(out)


STEPS = {  # decode sequences, prefill chunks (start, length)
    "decode": (5, []),
    "prefill": (0, [(0, 13), (0, 1), (0, 7)]),
    "cached_prefix": (0, [(9, 6), (4, 11)]),
    "mixed": (4, [(0, 10), (6, 5), (0, 2)]),
}


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("step", list(STEPS))
def test_exact_and_tiled_parts_match_naive_attention(backend, step, window):
    rng = np.random.default_rng(list(STEPS).index(step))
    b = get_backend(backend)
    decode, prefill = random_step(rng, *STEPS[step])
    k_host = rng.standard_normal((NUM_BLOCKS * BS, KV_HEADS, D)).astype(np.float32)
    v_host = rng.standard_normal((NUM_BLOCKS * BS, KV_HEADS, D)).astype(np.float32)
    rows = len(decode) + sum(len(s.token_ids) for s in prefill)
    q_host = rng.standard_normal((rows, HEADS, D)).astype(np.float32)
    want = reference(q_host, k_host, v_host, decode + prefill, window)
    k_pool, v_pool = head_major(b, k_host), head_major(b, v_host)
    lone_query = b.fused_attention_lone_query

    def attend(parts, prefill_row: int, padded_rows: int, fused=None) -> np.ndarray:
        q = np.zeros((padded_rows, HEADS, D), dtype=np.float32)
        q[: len(decode)] = q_host[: len(decode)]
        q[prefill_row : prefill_row + rows - len(decode)] = q_host[len(decode) :]
        out = paged_attention(
            b.xp,
            b.asarray(q, dtype=b.dtype),
            k_pool,
            v_pool,
            AttentionMetadata(None, parts, fused=fused, fused_lone_query=lone_query),
            D**-0.5,
        )
        return b.to_host(out)

    # exact: one part per decode sequence and per chunk, nothing padded; then the decodes as one
    # part (gathered through their slots), as the runner groups them. Written out against the
    # array API, and through the backend's fused attention where it has one (torch)
    singles, row = [], 0
    for s in decode + prefill:
        n = len(s.token_ids)
        singles.append(layout.to_device(layout.exact_part([s], 1, n, BS, window), b, row, n))
        row += n
    grouped = singles[len(decode) :]
    if decode:
        part = layout.exact_part(decode, len(decode), 1, BS, window)
        grouped.insert(0, layout.to_device(part, b, 0, len(decode)))
    for fused in kernels(b):
        for parts in (singles, grouped):
            got = attend(parts, len(decode), rows, fused)
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=f"fused={fused}")
        # a lone decode query goes through the kernel only where the backend says it takes one
        lone = sum(p.lone_query for p in singles + grouped)
        taken = len(singles) + len(grouped) - (0 if lone_query else lone)
        assert fused is None or fused.calls == taken

    # tiled, as a jitting backend lays it out: decode rows padded to a power of two, then the
    # prefill rows padded likewise; several tile shapes, so that queries span key tiles
    for query_tile, key_tile, bucket in [(3, 4, pow2), (1, 5, same), (4, 8, pow2)]:
        nd = bucket(len(decode)) if decode else 0
        tp = sum(len(s.token_ids) for s in prefill)
        tp = bucket(tp) if tp else 0
        parts = []
        if decode:
            tiles = layout.decode_tiles(decode)
            part = layout.tiled_part(*tiles, nd, BS, key_tile, window, bucket, bucket)
            parts.append(layout.to_device(part, b, 0, nd))
        if prefill:
            tiles = layout.prefill_tiles(prefill, query_tile)
            part = layout.tiled_part(*tiles, tp, BS, key_tile, window, bucket, bucket)
            parts.append(layout.to_device(part, b, nd, tp))
        got = attend(parts, nd, nd + tp)
        real = list(range(len(decode))) + list(range(nd, nd + rows - len(decode)))
        where = f"tiles {query_tile}x{key_tile}"
        np.testing.assert_allclose(got[real], want, atol=2e-5, rtol=1e-5, err_msg=where)
        padding = np.setdiff1d(np.arange(nd + tp), real)
        assert np.all(got[padding] == 0), f"{where}: padding rows are not zeros"


def test_tiny_llama_through_small_tiles_matches_transformers(tiny_llama, backend, check_logprobs):
    """Tiles of 3 queries x 4 keys (blocks of 4, 16 tokens a step, prefix-cache hits): every
    query merges several items, and prompt logprobs and greedy tokens equal transformers'."""
    case = tiny_llama("gqa", seed=0)
    llm = LLM(
        str(case.path),
        backend=backend,
        verbose=False,
        block_size=4,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
    runner = llm.engine.runner
    runner.tiled, runner.query_tile, runner.key_tile = True, 3, 4
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 160, 13).tolist()
    batch = [shared + rng.integers(3, 160, n).tolist() for n in (0, 6, 19)] + [[5]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate(batch, params, use_tqdm=False)
    for out in outs:
        ids = out.prompt_token_ids
        ref = case.log_softmax(ids)
        for p in range(1, len(ids)):
            check_logprobs(
                out.prompt_logprobs[p],
                ref[p - 1],
                3,
                ids[p],
                f"prompt of {len(ids)}, position {p}",
                1e-4,
            )
    # then prompts that start from the cached blocks of the first batch
    hits = llm.engine.scheduler.block_manager.prefix_cache_hits
    batch += [shared + rng.integers(3, 160, n).tolist() for n in (2, 11)]
    outs += llm.generate(
        batch[-2:], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert llm.engine.scheduler.block_manager.prefix_cache_hits > hits
    for out, prompt in zip(outs, batch, strict=True):
        want, _ = case.greedy(prompt, 8)
        assert out.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize(
    "blocks, runs",
    [
        ([3, 4, 5, 6, 7, 8, 9, 10], 1),  # consecutive: one slice of each pool
        ([3, 4, 5, 20, 21, 9, 10, 11], 3),  # three slices
        ([2, 9, 4, 11, 6, 13, 8, 15, 10], None),  # past MAX_RUNS: gathered through the slots
    ],
    ids=["one_run", "three_runs", "gathered"],
)
@pytest.mark.parametrize("query_len", [1, 5], ids=["decode", "chunk"])
def test_a_lone_sequence_reads_runs_of_consecutive_slots_as_slices(
    backend, blocks, runs, query_len
):
    """An exact part of one sequence reads each run of consecutive pool slots as a slice (a
    decode query through its own path); the result is the naive attention whichever way."""
    if runs is None:
        assert len(blocks) > layout.MAX_RUNS
    rng = np.random.default_rng(len(blocks) + query_len)
    b = get_backend(backend)
    ctx = len(blocks) * BS - 1
    start = ctx - query_len
    slots = [blocks[p // BS] * BS + p % BS for p in range(start, ctx)]
    s = ScheduledSeq(None, start, [0] * query_len, slots, blocks, ctx, True)
    k_host = rng.standard_normal((NUM_BLOCKS * BS, KV_HEADS, D)).astype(np.float32)
    v_host = rng.standard_normal((NUM_BLOCKS * BS, KV_HEADS, D)).astype(np.float32)
    q_host = rng.standard_normal((query_len, HEADS, D)).astype(np.float32)
    part = layout.exact_part([s], 1, query_len, BS, None)
    if runs is None:
        assert part.context_runs is None
    else:
        assert len(part.context_runs) == runs and sum(n for _, n in part.context_runs) == ctx
    want = reference(q_host, k_host, v_host, [s], None)
    for fused in kernels(b):  # written out, and through the backend's fused kernel if any
        out = paged_attention(
            b.xp,
            b.asarray(q_host, dtype=b.dtype),
            head_major(b, k_host),
            head_major(b, v_host),
            AttentionMetadata(
                None,
                [layout.to_device(part, b, 0, query_len)],
                fused=fused,
                fused_lone_query=b.fused_attention_lone_query,
            ),
            D**-0.5,
        )
        np.testing.assert_allclose(b.to_host(out), want, atol=2e-5, rtol=1e-5)
        # a lone decode query over runs of slots takes the kernel where the backend says so
        skipped = runs is not None and query_len == 1 and not b.fused_attention_lone_query
        assert fused is None or fused.calls == (0 if skipped else 1)


@pytest.mark.parametrize("ctx", [SHORT_CONTEXT - 1, SHORT_CONTEXT, SHORT_CONTEXT + 1, 1000])
@pytest.mark.parametrize("runs", [1, 2])
def test_a_lone_decode_gives_the_naive_attention_either_side_of_short_context(backend, ctx, runs):
    """A lone decode query takes its scores as queries times keys up to SHORT_CONTEXT keys and
    as keys times queries past it; either way, over one run of slots or several, it is the
    naive attention."""
    rng = np.random.default_rng(ctx + runs)
    b = get_backend(backend)
    n = -(-ctx // BS)  # blocks
    blocks = (
        list(range(1, 1 + n))
        if runs == 1
        else list(range(1, 1 + n // 2)) + list(range(2 + n, 2 + n + n - n // 2))
    )
    slots = [blocks[(ctx - 1) // BS] * BS + (ctx - 1) % BS]
    s = ScheduledSeq(None, ctx - 1, [0], slots, blocks, ctx, True)
    num_slots = (3 + 2 * n) * BS
    k_host, v_host = (
        rng.standard_normal((num_slots, KV_HEADS, D)).astype(np.float32) for _ in range(2)
    )
    q_host = rng.standard_normal((1, HEADS, D)).astype(np.float32)
    part = layout.exact_part([s], 1, 1, BS, None)
    assert len(part.context_runs) == runs and part.context_len == ctx
    out = paged_attention(
        b.xp,
        b.asarray(q_host, dtype=b.dtype),
        head_major(b, k_host),
        head_major(b, v_host),
        AttentionMetadata(None, [layout.to_device(part, b, 0, 1)]),
        D**-0.5,
    )
    np.testing.assert_allclose(b.to_host(out), reference(q_host, k_host, v_host, [s], None),
                               atol=2e-5, rtol=1e-5)  # fmt: skip
