"""Engine core: Sequence, BlockManager, Scheduler, driven by a fake model with a fake KV cache.

The fake model keeps one integer per KV slot: the K/V "of" position p is a rolling hash of
the K/V at p - 1 (read back through the block table) and token p, and the sampled token is
a function of the last one. So a wrong block table, a wrongly shared block or a stale
prefix-cache hit changes the output, which is compared with a direct computation.

With state slots (a hybrid model) it also keeps one integer per state slot, the same rolling
hash carried from chunk to chunk as a Mamba layer carries its state, and checks that every
chunk starts from the state of exactly the tokens before it: its own slot, or the snapshot
a cached prefix resumes from, saved where the scheduler asked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import count

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from nanovllm.config import (
    DEFAULT_KV_CACHE_MEMORY,
    EngineConfig,
    SpeculativeConfig,
    size_kv_cache,
)
from nanovllm.engine import block_manager as block_manager_module
from nanovllm.engine.block_manager import NULL_BLOCK, BlockManager
from nanovllm.engine.scheduler import Batch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus

MOD = (1 << 61) - 1
VOCAB = 6
STOP = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_step(prev: int, token: int) -> int:
    return (prev * 1_000_003 + token + 1) % MOD


def sample_from(kv: int, index: int) -> int:
    return (kv // 7 + index * 7919) % VOCAB


def reference_next(token_ids: list[int], index: int) -> int:
    kv = 0
    for t in token_ids:
        kv = kv_step(kv, t)
    return sample_from(kv, index)


def reference_output(prompt: list[int], index: int, max_tokens: int, stop: bool) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(reference_next(tokens, index))
        if stop and tokens[-1] == STOP:
            break
    return tokens[len(prompt) :]


class FakeModel:
    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.bs = sched.config.block_size
        self.kv: list[int | None] = [None] * (sched.config.num_kv_blocks * self.bs)
        self.state: dict[int, int] = {}  # state slot -> the rolling hash it holds

    def run(self, batch: Batch) -> list[int | list[int] | None]:
        """Per chunk, its sampled token (None when it does not sample); for a chunk with
        proposals, the ones the model itself would have produced, then its next token."""
        bs, blocks, out = self.bs, self.sched.block_manager.blocks, []
        for s in batch.seqs:
            own = len(s.token_ids) - s.num_draft  # the sequence's tokens; proposals after
            assert s.token_ids[:own] == s.seq.token_ids[s.start : s.start + own]
            assert len(s.block_table) == cdiv(s.context_len, bs)
            assert s.sample == (s.start + own == s.seq.num_tokens)
            assert not s.num_draft or own == 1  # only a decode proposes
            sampled_at = []  # the token sampled after each position of the chunk
            prev = 0
            if s.start:
                p = s.start - 1
                prev = self.kv[s.block_table[p // bs] * bs + p % bs]
                assert prev is not None
            hybrid = s.seq.state_slot is not None
            if hybrid and s.start:  # the state read is that of the tokens before the chunk
                read = s.seq.state_slot if s.state_source is None else s.state_source
                assert self.state.get(read) == prev, f"stale state in slot {read}"
            if s.snapshot is not None:
                offset, snap_slot = s.snapshot
                assert hybrid and 0 < offset <= len(s.token_ids)
                boundary = (s.seq.num_prompt_tokens - 1) // bs * bs
                assert s.start + offset == boundary  # the prompt's last block boundary
            for pos, (tok, slot) in enumerate(
                zip(s.token_ids, s.slot_mapping, strict=True), start=s.start
            ):
                assert slot == s.block_table[pos // bs] * bs + pos % bs
                block = blocks[slot // bs]
                # never write the null block, a shared block, or a sealed (cached) block
                assert block.block_id != NULL_BLOCK and block.ref_count == 1
                assert block.hash is None
                prev = kv_step(prev, tok)
                self.kv[slot] = prev
                if s.snapshot is not None and pos + 1 == s.start + s.snapshot[0]:
                    self.state[s.snapshot[1]] = prev
                sampled_at.append(sample_from(prev, s.seq.index))
            if hybrid:
                self.state[s.seq.state_slot] = prev
            if not s.sample:
                out.append(None)
                continue
            kept = [sampled_at[own - 1]]
            for j, proposed in enumerate(s.token_ids[own:]):
                if kept[-1] != proposed:
                    break
                kept.append(sampled_at[own + j])
            out.append(kept if s.num_draft else kept[0])
        return out


def check_invariants(sched: Scheduler, batch: Batch | None = None) -> None:
    bm, cfg, bs = sched.block_manager, sched.config, sched.config.block_size
    scheduled = {s.seq: s for s in batch.seqs} if batch else {}
    held = Counter()
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        held.update(seq.block_table)
        covered = scheduled[seq].context_len if seq in scheduled else seq.num_computed_tokens
        assert len(seq.block_table) == cdiv(covered, bs)  # lazily, exactly what is computed
        assert seq.num_computed_tokens < seq.num_tokens or seq in scheduled
        assert (seq.state_slot is not None) == (cfg.num_state_slots > 0)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert not seq.block_table and seq.num_computed_tokens == 0 and seq.state_slot is None
    assert len(sched.running) <= cfg.max_num_seqs
    free = set(bm.free_blocks)
    assert NULL_BLOCK not in free and NULL_BLOCK not in held and bm.blocks[0].ref_count == 0
    for block in bm.blocks[1:]:
        assert block.ref_count == held[block.block_id]
        assert (block.block_id in free) == (block.ref_count == 0)
    for h, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].hash == h
    slots = [s.state_slot for s in sched.running if s.state_slot is not None]
    assert len(set(slots)) == len(slots)
    assert sorted(slots + list(sched.free_state_slots)) == list(range(cfg.num_state_slots))
    snaps = sched.snapshots
    taken = [s.snapshot[1] for s in batch.seqs if s.snapshot] if batch else []
    assert sorted([*snaps.free, *snaps.by_block.values(), *taken]) == snaps.slots  # no leak
    readers = (
        Counter(s.state_source for s in batch.seqs if s.state_source is not None)
        if batch
        else Counter()
    )
    assert snaps.pins == readers  # pinned exactly while a step reads them
    if batch is not None:
        assert len(batch.seqs) <= cfg.max_num_seqs
        assert batch.num_tokens <= cfg.max_num_batched_tokens
        assert len(scheduled) == len(batch.seqs)
        assert all(
            len(s.token_ids) >= 1 and s.seq.status is SequenceStatus.RUNNING for s in batch.seqs
        )
        for seq in sched.running:  # a running decode is never left out of a step
            assert seq in scheduled or seq.num_tokens - seq.num_computed_tokens > 1
        for seq in batch.preempted:
            assert seq.status is SequenceStatus.WAITING and seq not in scheduled


@dataclass
class Req:
    rid: str
    prompt: list[int]
    max_tokens: int
    n: int = 1
    arrival: int = 0
    abort_at: int | None = None
    use_prefix_cache: bool = True
    stop: bool = False


def simulate(cfg: EngineConfig, reqs: list[Req]) -> tuple[dict, Scheduler]:
    """Run the workload to the end; returns {(rid, index): (finish_reason, output)}."""
    sched, seq_ids = Scheduler(cfg), count()
    model = FakeModel(sched)
    by_id = {r.rid: r for r in reqs}
    seqs: list[Sequence] = []
    outputs: dict[Sequence, list[int]] = defaultdict(list)  # what the engine would return
    step, last_arrival = 0, max(r.arrival for r in reqs)
    while step <= last_arrival or sched.has_unfinished():
        assert step < 5000, "no progress"
        for r in reqs:
            if r.arrival == step:
                for i in range(r.n):
                    seq = Sequence(
                        next(seq_ids), r.rid, r.prompt, r, i, r.use_prefix_cache, r.max_tokens
                    )
                    seqs.append(seq)
                    sched.add(seq)
            if r.abort_at == step:
                for seq in sched.abort(r.rid):
                    assert seq.finish_reason == "abort" and not seq.block_table
        batch = sched.schedule()
        check_invariants(sched, batch)
        assert batch.seqs or not sched.has_unfinished()
        sampled = model.run(batch)
        sched.postprocess(batch, sampled)
        for s, got in zip(batch.seqs, sampled, strict=True):
            if got is None or s.seq.is_finished:
                continue
            seq, r = s.seq, by_id[s.seq.request_id]
            got = [got] if isinstance(got, int) else got
            assert seq.num_output_tokens <= r.max_tokens  # proposals stop short of it
            first = seq.num_tokens - len(got)
            for j, token in enumerate(got):  # as the engine: one by one, a stop ends the run
                assert token == reference_next(seq.token_ids[: first + j], seq.index)
                outputs[seq].append(token)
                if r.stop and token == STOP:
                    sched.finish(seq, "stop")
                elif len(outputs[seq]) >= r.max_tokens:
                    sched.finish(seq, "length")
                if seq.is_finished:
                    break
        check_invariants(sched)
        step += 1
    bm = sched.block_manager
    assert len(bm.free_blocks) == cfg.num_kv_blocks - 1
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert all(s.is_finished and s.finish_reason and not s.block_table for s in seqs)
    return {(s.request_id, s.index): (s.finish_reason, outputs[s]) for s in seqs}, sched


# ---- generated workloads -----------------------------------------------------------------

MAX_LEN = 40
tokens = st.lists(st.integers(0, VOCAB - 1), max_size=20)


@st.composite
def workloads(draw, hybrid: bool = False):
    """A config and requests; `hybrid`: with state slots and prefix caching, and prompts
    that often repeat or extend an earlier one whole, so cached prefixes resume from saved
    states."""
    bs = draw(st.sampled_from([1, 2, 3, 4, 8]))
    min_blocks = cdiv(MAX_LEN, bs) + 1
    num_seqs = draw(st.integers(1, 5))
    slots = draw(st.sampled_from([1, 3] if hybrid else [0, 0, 0, 1, 3]))
    cfg = dict(
        max_model_len=MAX_LEN,
        block_size=bs,
        max_num_seqs=num_seqs,
        max_num_batched_tokens=draw(st.integers(num_seqs, 3 * MAX_LEN // 2)),
        num_kv_blocks=draw(st.integers(min_blocks, min_blocks + 3)),
        num_state_slots=slots,
    )
    cfg["enable_prefix_caching"] = caching = hybrid or draw(st.booleans())
    cfg["num_state_snapshots"] = draw(st.integers(1, 3)) if slots and caching else 0
    if not slots and draw(st.booleans()):  # speculative decoding (not with recurrent state)
        n_max = draw(st.integers(1, 3))
        cfg["speculative"] = SpeculativeConfig(
            draw(st.integers(1, 5)), n_max, draw(st.integers(1, n_max))
        )
    prefixes = draw(st.lists(tokens, min_size=1, max_size=3))
    reqs = []
    for i in range(draw(st.integers(2, 8))):
        prompt = (draw(st.sampled_from(prefixes)) + draw(tokens))[: MAX_LEN - 1] or [1]
        if hybrid and reqs and draw(st.booleans()):  # an earlier prompt, again or extended
            earlier = draw(st.sampled_from(reqs)).prompt
            prompt = (earlier + draw(st.sampled_from([[], *prefixes])))[: MAX_LEN - 1]
        reqs.append(
            Req(
                str(i),
                prompt,
                max_tokens=draw(st.integers(1, min(20, MAX_LEN - len(prompt)))),
                n=draw(st.sampled_from([1, 1, 2, 3])),
                arrival=draw(st.integers(0, 8)),
                abort_at=draw(st.integers(0, 30)) if draw(st.integers(0, 3)) == 0 else None,
                use_prefix_cache=draw(st.booleans() | st.just(True)),
                stop=draw(st.booleans()),
            )
        )
    return cfg, reqs


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_tiny_pool_matches_huge_pool(workload):
    check_tiny_pool_matches_huge_pool(*workload)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(hybrid=True))
def test_random_hybrid_workloads_resume_from_saved_states(workload):
    """Hybrid models' prefix cache: every chunk starts from the state of exactly the tokens
    before it (the fake model checks), with 1-3 snapshot slots reused under pressure,
    preemption and aborts, and outputs equal a direct computation."""
    check_tiny_pool_matches_huge_pool(*workload)


def check_tiny_pool_matches_huge_pool(cfg: dict, reqs: list[Req]) -> None:
    tiny, sched = simulate(EngineConfig(**cfg), reqs)
    target(float(sched.num_preemptions))
    event(f"preemptions: {min(sched.num_preemptions, 3)}+")
    event(f"prefix-cache hits: {sched.block_manager.prefix_cache_hits > 0}")
    event(f"resumed from a saved state: {sched.snapshots.num_resumed > 0}")
    event(f"aborted: {any(reason == 'abort' for reason, _ in tiny.values())}")
    if cfg.get("speculative"):
        event(f"proposals accepted: {min(sched.num_accepted_tokens, 10) // 5 * 5}+")
    huge_blocks = 1 + sum(r.n * cdiv(len(r.prompt) + r.max_tokens, cfg["block_size"]) for r in reqs)
    cfg["num_kv_blocks"] = max(cfg["num_kv_blocks"], huge_blocks)
    huge, sched = simulate(EngineConfig(**cfg), reqs)
    assert sched.num_preemptions == 0
    by_id = {r.rid: r for r in reqs}
    for key, (reason, out) in tiny.items():
        r = by_id[key[0]]
        if reason != "abort":
            assert out == reference_output(r.prompt, key[1], r.max_tokens, r.stop)
        if reason != "abort" and huge[key][0] != "abort":
            assert huge[key] == (reason, out)


def test_forced_preemption_keeps_outputs():
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    reqs = [Req(str(i), prompt[i:] + [i] * 4, max_tokens=12, n=1 + i % 2) for i in range(5)]
    cfg = dict(max_model_len=32, block_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    tiny, sched = simulate(EngineConfig(num_kv_blocks=17, **cfg), reqs)
    assert sched.num_preemptions > 0
    huge, sched = simulate(EngineConfig(num_kv_blocks=200, **cfg), reqs)
    assert sched.num_preemptions == 0
    assert tiny == huge


# ---- scheduling rules ----------------------------------------------------------------------


def make(prompt: list[int], seq_id: int = 0, **kw) -> Sequence:
    return Sequence(seq_id, str(seq_id), prompt, **kw)


def assert_correct(seq: Sequence) -> None:
    assert seq.output_token_ids == reference_output(
        seq.prompt_token_ids, seq.index, seq.num_output_tokens, False
    )


def step(sched: Scheduler, model: FakeModel) -> Batch:
    batch = sched.schedule()
    check_invariants(sched, batch)
    sched.postprocess(batch, model.run(batch))
    check_invariants(sched)
    return batch


def test_decodes_are_not_stalled_by_a_long_prompt():
    cfg = EngineConfig(
        max_model_len=4096,
        block_size=4,
        num_kv_blocks=1100,
        max_num_seqs=4,
        max_num_batched_tokens=16,
    )
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    for i in range(3):
        sched.add(make([1, 2, i], i))
    step(sched, model)
    long = make([3] * 4000, 9)
    sched.add(long)
    for _ in range(5):
        batch = step(sched, model)
        assert [len(s.token_ids) for s in batch.seqs] == [1, 1, 1, 13]
        assert batch.seqs[-1].seq is long
    assert long.num_computed_tokens == 5 * 13


def test_self_preemption_goes_to_front_of_queue():
    cfg = EngineConfig(
        max_model_len=8,
        block_size=2,
        num_kv_blocks=5,
        max_num_seqs=4,
        max_num_batched_tokens=8,
        enable_prefix_caching=False,
    )
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    a, b, c = make([1, 2, 3], 0), make([4, 5, 6, 7], 1), make([1], 2)
    for s in (a, b):
        sched.add(s)
    step(sched, model)
    sched.add(c)
    batch = step(sched, model)  # a decodes into its last free slot; b needs a block: itself
    assert [s.seq for s in batch.seqs] == [a] and batch.preempted == [b]
    assert list(sched.waiting) == [b, c] and b.num_computed_tokens == 0
    assert b.token_ids[:4] == [4, 5, 6, 7] and b.num_tokens == 5


def test_preempted_sequence_hits_its_own_cached_blocks():
    cfg = EngineConfig(
        max_model_len=16, block_size=4, num_kv_blocks=7, max_num_seqs=2, max_num_batched_tokens=32
    )
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    a, b = make([1] * 12, 0), make([2] * 12, 1)
    sched.add(a)
    sched.add(b)
    step(sched, model)  # 6 blocks in use, none free
    b_blocks = list(b.block_table)
    batch = step(sched, model)  # a needs a 4th block: b is preempted, its tail block evicted
    assert batch.preempted == [b] and a.block_table[3] == b_blocks[2]
    sched.finish(a, "length")
    batch = step(sched, model)
    assert batch.seqs[0].seq is b and batch.seqs[0].start == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == b_blocks[:2]
    assert_correct(b)


# ---- prefix caching ------------------------------------------------------------------------


def run_prefill(sched: Scheduler, model: FakeModel, seq: Sequence) -> Batch:
    sched.add(seq)
    batch = step(sched, model)
    assert seq.num_output_tokens == 1
    return batch


@pytest.mark.parametrize("first_finished", [True, False])
def test_three_block_prefix_reuses_the_same_blocks(first_finished):
    cfg = EngineConfig(max_model_len=64, block_size=4, num_kv_blocks=32)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    a = make(list(range(1, 15)), 0)  # 3 full blocks + 2 tokens
    run_prefill(sched, model, a)
    a_blocks = list(a.block_table[:3])
    if first_finished:
        sched.finish(a, "stop")
    b = make(list(range(1, 13)) + [99, 98, 97], 1)
    batch = run_prefill(sched, model, b)
    (sb,) = [s for s in batch.seqs if s.seq is b]
    assert sb.start == 12 and sb.token_ids == [99, 98, 97] and b.num_cached_tokens == 12
    assert b.block_table[:3] == a_blocks
    bm = sched.block_manager
    assert (bm.prefix_cache_hits, bm.prefix_cache_queries) == (3, 3 + 3)
    assert_correct(b)


def test_prefix_ending_mid_block_reuses_only_full_blocks():
    cfg = EngineConfig(max_model_len=64, block_size=4, num_kv_blocks=32)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    a = make(list(range(1, 15)), 0)
    run_prefill(sched, model, a)
    b = make(list(range(1, 11)) + [50, 51], 1)  # shares 10 tokens: 2.5 blocks
    run_prefill(sched, model, b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert_correct(b)


def test_full_hit_recomputes_the_last_block():
    cfg = EngineConfig(max_model_len=64, block_size=4, num_kv_blocks=32)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    a = make(list(range(1, 13)), 0)
    run_prefill(sched, model, a)
    b = make(list(range(1, 13)), 1)
    batch = run_prefill(sched, model, b)
    (sb,) = [s for s in batch.seqs if s.seq is b]
    assert sb.start == 8 and len(sb.token_ids) == 4 and sb.sample
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.output_token_ids == a.output_token_ids[:1]


def test_constant_hash_never_reuses_different_tokens(monkeypatch):
    monkeypatch.setattr(block_manager_module, "hash_block_tokens", lambda parent, ids: b"same")
    cfg = EngineConfig(max_model_len=64, block_size=4, num_kv_blocks=32)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    a = make(list(range(1, 13)), 0)
    run_prefill(sched, model, a)
    b = make(list(range(20, 33)), 1)
    run_prefill(sched, model, b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    c = make(list(range(1, 13)) + [7], 2)  # only a's first block is in the index
    run_prefill(sched, model, c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]
    for s in (a, b, c):
        assert_correct(s)


def test_hash_ignoring_parent_never_reuses_a_block_with_another_prefix(monkeypatch):
    monkeypatch.setattr(
        block_manager_module, "hash_block_tokens", lambda parent, ids: repr(list(ids)).encode()
    )
    cfg = EngineConfig(max_model_len=64, block_size=4, num_kv_blocks=32)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    x = make([1, 2, 3, 4, 5, 6, 7, 8, 9], 0)
    z = make([11, 12, 13, 14, 15, 16, 17, 18, 9], 1)
    run_prefill(sched, model, x)
    run_prefill(sched, model, z)
    y = make([11, 12, 13, 14, 5, 6, 7, 8, 0], 2)  # block 1 equals x's, after z's block 0
    run_prefill(sched, model, y)
    assert y.num_cached_tokens == 4 and y.block_table[0] == z.block_table[0]
    assert y.block_table[1] != x.block_table[1]
    assert_correct(y)


def test_use_prefix_cache_false_computes_every_position():
    cfg = EngineConfig(max_model_len=64, block_size=4, num_kv_blocks=32)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    run_prefill(sched, model, make(list(range(1, 13)), 0))
    b = make(list(range(1, 13)), 1, use_prefix_cache=False)
    batch = run_prefill(sched, model, b)
    assert batch.seqs[-1].start == 0 and b.num_cached_tokens == 0
    c = make(list(range(1, 13)) + [5], 2)
    run_prefill(sched, model, c)  # b's blocks were registered too, a's came first
    assert c.num_cached_tokens == 12


def test_eviction_takes_unsealed_then_least_recently_freed_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = Sequence(0, "a", [1, 2, 3, 4, 5]), Sequence(1, "b", [6, 7, 8, 9])
    bm.allocate(a, 5)
    bm.allocate(b, 4)
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s)
    a_table, b_table = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    # a's partial block first, then a's tail, a's head, b's tail, b's head
    assert list(bm.free_blocks) == [a_table[2], a_table[1], a_table[0], b_table[1], b_table[0]]
    assert bm.cached_prefix(Sequence(2, "c", [6, 7, 8, 9, 1])) == b_table
    c = Sequence(3, "d", [1, 2, 3, 4, 5, 6])
    assert bm.cached_prefix(c) == a_table[:2]
    bm.allocate(c, 6, bm.cached_prefix(c))
    assert c.block_table == a_table and bm.num_free_blocks == 2
    assert bm.blocks[a_table[2]].ref_count == 1


def test_a_growing_sequence_takes_the_block_after_its_last_when_it_is_free():
    # its context stays one run of consecutive slots, which attention reads as a slice
    bm = BlockManager(num_blocks=10, block_size=2)
    a, b = Sequence(0, "a", [1, 2, 3]), Sequence(1, "b", [4, 5])
    bm.allocate(a, 3)  # blocks 1, 2
    bm.allocate(b, 2)  # block 3
    bm.append(a, 5)  # 3 is taken: the least recently freed, 4
    bm.free(b)  # 3 is free again, and first in line
    bm.append(a, 7)  # 5 (after 4) beats 3
    assert a.block_table == [1, 2, 4, 5]
    c = Sequence(2, "c", [6])
    bm.allocate(c, 1)
    assert c.block_table == [3]  # others still take the least recently freed
    # a cached block after the last is left to the prefix cache
    d = Sequence(3, "d", [7, 8, 9])
    bm.allocate(d, 3)
    assert d.block_table == [6, 7]
    d.num_computed_tokens = 2
    bm.cache_full_blocks(d)  # block 6 holds [7, 8]
    bm.free(d)
    bm.append(a, 9)  # 6 follows a's last block, 5, but is cached: 7 instead
    assert a.block_table == [1, 2, 4, 5, 7]
    assert bm.cached_prefix(Sequence(4, "f", [7, 8, 1])) == [6]


def test_without_prefix_caching_freed_blocks_are_reused_first():
    # a freed sealed block serves no later request, so the next one takes it (memory already
    # touched) before blocks no request has used; with caching on it is kept for the cache
    for caching, expected in ((False, [1, 2, 3]), (True, [3, 4, 5])):
        bm = BlockManager(num_blocks=10, block_size=2, prefix_caching=caching)
        a = Sequence(0, "a", [1, 2, 3, 4, 5])
        bm.allocate(a, 5)  # blocks 1, 2, 3
        a.num_computed_tokens = 5
        bm.cache_full_blocks(a)  # 1 and 2 sealed
        bm.free(a)
        b = Sequence(1, "b", [6, 7, 8, 9, 1])
        bm.allocate(b, 5)  # caching on: a's unsealed tail, then blocks after it
        assert b.block_table == expected, caching
        assert bm.cached_prefix(Sequence(2, "c", [1, 2, 3, 4, 5])) == ([1, 2] if caching else [])


def test_without_prefix_caching_a_growing_sequence_takes_freed_sealed_blocks_in_a_run():
    # two sequences that grew in turn hold every other block; freed, their sealed blocks
    # serve no one, so a new sequence runs on through them: one run of consecutive slots
    bm = BlockManager(num_blocks=10, block_size=2, prefix_caching=False)
    a, b = Sequence(0, "a", [1, 2, 3, 4]), Sequence(1, "b", [5, 6, 7, 8])
    bm.allocate(a, 2)
    bm.allocate(b, 2)
    bm.append(a, 4)
    bm.append(b, 4)
    assert (a.block_table, b.block_table) == ([1, 3], [2, 4])
    for s in (a, b):
        s.num_computed_tokens = 4
        bm.cache_full_blocks(s)
        bm.free(s)
    c = Sequence(2, "c", [9] * 8)
    bm.allocate(c, 8)
    assert c.block_table == [2, 3, 4, 5]


# ---- state slots, siblings, abort ----------------------------------------------------------


def test_state_slots_limit_admission_and_return_on_finish_and_abort():
    cfg = EngineConfig(
        max_model_len=32,
        block_size=4,
        num_kv_blocks=40,
        max_num_seqs=4,
        enable_prefix_caching=False,
        num_state_slots=2,
    )
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    seqs = [make([1, 2, 3], i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step(sched, model)
    assert {s.state_slot for s in seqs[:2]} == {0, 1} and seqs[2].state_slot is None
    slot = seqs[0].state_slot
    sched.finish(seqs[0], "stop")
    step(sched, model)
    assert seqs[2].state_slot == slot
    assert sched.abort("1") == [seqs[1]] and seqs[1].state_slot is None
    assert sorted(sched.free_state_slots) == [1 - slot]


@pytest.mark.parametrize("caching", [True, False])
def test_siblings_share_the_prompt_blocks(caching):
    cfg = EngineConfig(
        max_model_len=32, block_size=4, num_kv_blocks=40, enable_prefix_caching=caching
    )
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    prompt = list(range(1, 11))
    sibs = [Sequence(i, "r", prompt, index=i) for i in range(3)]
    for s in sibs:
        sched.add(s)
    batch = step(sched, model)
    assert [s.seq for s in batch.seqs] == [sibs[0]]  # the others wait for the prompt
    batch = step(sched, model)
    assert [s.start for s in batch.seqs] == [10, 8, 8]
    shared = sibs[0].block_table[:2]
    assert sibs[1].block_table[:2] == shared == sibs[2].block_table[:2]
    assert all(sched.block_manager.blocks[b].ref_count == 3 for b in shared)
    assert len({s.block_table[2] for s in sibs}) == 3  # the partial block is never shared
    for s in sibs:
        assert_correct(s)


def hybrid_scheduler(snapshots: int) -> tuple[Scheduler, FakeModel]:
    cfg = EngineConfig(
        max_model_len=32,
        block_size=4,
        num_kv_blocks=40,
        max_num_seqs=3,
        num_state_slots=3,
        num_state_snapshots=snapshots,
    )
    sched = Scheduler(cfg)
    return sched, FakeModel(sched)


def run_to_end(sched: Scheduler, model: FakeModel, seqs: list[Sequence], max_tokens: int):
    for s in seqs:
        sched.add(s)
    while any(not s.is_finished for s in seqs):
        step(sched, model)
        for s in seqs:
            if not s.is_finished and s.num_output_tokens >= max_tokens:
                sched.finish(s, "length")
    for s in seqs:
        assert_correct(s)


def test_hybrid_prefix_resumes_from_the_state_saved_at_the_prompts_last_boundary():
    """A 10-token prompt (blocks of 4) saves the state after 8 tokens; the same prompt again,
    and a longer one that starts with it, resume there from the snapshot slot; a prompt that
    shares only its first block finds no saved state and starts at 0."""
    sched, model = hybrid_scheduler(snapshots=2)
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    first = make(prompt, 0)
    run_to_end(sched, model, [first], 3)
    assert first.num_cached_tokens == 0 and sched.snapshots.num_saved == 1
    (slot,) = sched.snapshots.by_block.values()
    again, longer = make(prompt, 1), make(prompt + [3, 3, 1, 0, 2], 2)
    sched.add(again)
    batch = step(sched, model)
    assert again.num_cached_tokens == 8 and batch.seqs[0].state_source == slot
    run_to_end(sched, model, [longer], 4)
    assert longer.num_cached_tokens == 8
    while not again.is_finished:  # a decode in each of the steps above
        step(sched, model)
        if again.num_output_tokens >= 3:
            sched.finish(again, "length")
    assert_correct(again)
    other = make(prompt[:4] + [0, 0, 0, 0, 0], 3)
    run_to_end(sched, model, [other], 2)
    assert other.num_cached_tokens == 0  # its chain (1 block) ends at no saved state
    assert sched.snapshots.num_resumed == 2 and not sched.snapshots.pins


def test_hybrid_snapshot_slots_are_reused_least_recently_used():
    """One snapshot slot: b's state replaces a's, so a is computed again from position 0
    (and saves its state again), while b resumes."""
    sched, model = hybrid_scheduler(snapshots=1)
    a, b = [1, 2, 3, 4, 5, 0, 1], [5, 4, 3, 2, 1, 0, 5]
    for i, prompt in enumerate([a, b, a, a, b]):
        seq = make(prompt, i)
        run_to_end(sched, model, [seq], 2)
        expected = {0: 0, 1: 0, 2: 0, 3: 4, 4: 0}[i]
        assert seq.num_cached_tokens == expected, (i, seq.num_cached_tokens)
    assert len(sched.snapshots.by_block) == 1 and not sched.snapshots.free


def test_hybrid_samples_resume_from_sibling_zeros_state():
    sched, model = hybrid_scheduler(snapshots=1)
    prompt = list(range(1, 11))
    sibs = [Sequence(i, "r", prompt, index=i) for i in range(3)]
    run_to_end(sched, model, sibs, 4)
    assert [s.num_cached_tokens for s in sibs] == [0, 8, 8]


def test_a_failed_step_gives_back_its_snapshot_slots_and_pins():
    """The model raised: discard() returns the slot the step would have saved into and the
    pin of the state it read, and the aborted sequences free the rest."""
    sched, model = hybrid_scheduler(snapshots=2)
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    run_to_end(sched, model, [make(prompt, 0)], 1)
    failing = [make(prompt, 1), make([4] * 9, 2)]  # resumes; saves a new state
    for s in failing:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs[0].state_source is not None and batch.seqs[1].snapshot is not None
    sched.discard(batch)
    for s in failing:
        sched.finish(s, "abort")
    check_invariants(sched)
    assert len(sched.snapshots.free) == 1 and len(sched.snapshots.by_block) == 1


def test_siblings_go_on_when_sibling_zero_finishes_early():
    cfg = EngineConfig(
        max_model_len=32, block_size=4, num_kv_blocks=40, enable_prefix_caching=False
    )
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    sibs = [Sequence(i, "r", list(range(1, 11)), index=i) for i in range(2)]
    for s in sibs:
        sched.add(s)
    step(sched, model)
    sched.finish(sibs[0], "stop")
    batch = step(sched, model)
    assert batch.seqs[0].seq is sibs[1] and batch.seqs[0].start == 8  # revived from free list


def test_abort_while_waiting_and_running_frees_at_once():
    cfg = EngineConfig(max_model_len=32, block_size=4, num_kv_blocks=9, max_num_seqs=1)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    sibs = [Sequence(i, "r", list(range(1, 11)), index=i) for i in range(3)]
    other = make([5, 6], 7)
    for s in (*sibs, other):
        sched.add(s)
    step(sched, model)
    assert sched.num_running == 1 and sched.num_waiting == 3
    assert sched.abort("r") == sibs
    assert all(s.finish_reason == "abort" and s.is_finished for s in sibs)
    assert sched.block_manager.num_free_blocks == 8 and sched.abort("r") == []
    batch = step(sched, model)
    assert batch.seqs[0].seq is other
    sched.finish(other, "length")
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 8


def test_postprocess_skips_a_sequence_aborted_after_schedule():
    cfg = EngineConfig(max_model_len=32, block_size=4, num_kv_blocks=9)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    seq = make([1, 2, 3], 0)
    sched.add(seq)
    batch = sched.schedule()
    sampled = model.run(batch)
    sched.abort("0")
    sched.postprocess(batch, sampled)
    assert seq.num_output_tokens == 0 and sched.block_manager.num_free_blocks == 8


def test_sequence_basics():
    seq = Sequence(3, "r", [1, 2, 3], params={"t": 0})
    assert seq.status is SequenceStatus.WAITING and seq.state_slot is None
    assert (seq.num_prompt_tokens, seq.num_tokens, seq.num_output_tokens) == (3, 3, 0)
    seq.append_token(9)
    assert seq.token_ids == [1, 2, 3, 9] and seq.output_token_ids == [9]
    assert seq.prompt_token_ids == [1, 2, 3] and not seq.is_finished
    with pytest.raises(ValueError, match="empty prompt"):
        Sequence(0, "r", [])
    sched = Scheduler(EngineConfig())
    batch = sched.schedule()
    assert batch.seqs == [] and batch.num_tokens == 0 and not sched.has_unfinished()
    with pytest.raises(ValueError, match="finish reason"):
        sched.finish(seq, "done")


# ---- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(block_size=0), ["block_size=0", "block_size=1 or more"]),
        (dict(block_size=-4), ["block_size=-4", "block_size=1 or more"]),
        (
            dict(max_model_len=100, block_size=16, num_kv_blocks=7),
            ["num_kv_blocks=7", "max_model_len=100", "at least 8"],
        ),
        (
            dict(max_num_seqs=8, max_num_batched_tokens=4),
            ["max_num_batched_tokens=4", "max_num_seqs=8", "at least 8"],
        ),
    ],
)
def test_bad_config_raises_with_value_and_fix(kw, words):
    with pytest.raises(ValueError) as info:
        EngineConfig(**kw)
    for w in words:
        assert w in str(info.value)


def test_every_engine_module_imports_without_array_libraries():
    """engine/ is the backend-independent core: the runner (runner/) is what touches arrays."""
    code = textwrap.dedent("""
        import sys
        BLOCKED = {"numpy", "jax", "jaxlib", "torch", "cupy", "array_api_compat",
                   "array_api_extra", "array_api_strict"}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked")
        sys.meta_path.insert(0, Block())
        for name in BLOCKED:
            sys.modules[name] = None
        try:
            import numpy
        except ImportError:
            pass
        else:
            raise SystemExit("numpy was not blocked")
        import importlib, pkgutil
        import nanovllm.engine
        for m in pkgutil.iter_modules(nanovllm.engine.__path__):
            importlib.import_module("nanovllm.engine." + m.name)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_kv_pool_sizing_rule():
    """The pool takes what the memory budget holds, capped at every sequence at full length,
    and max_model_len defaults to what the model and the pool allow."""

    def size(**kw):
        args = dict(
            per_block=1000,
            block_size=16,
            model_max_len=2048,
            max_model_len=None,
            max_num_seqs=4,
            num_kv_blocks=None,
            kv_cache_memory=None,
        )
        return size_kv_cache(**{**args, **kw})

    assert size() == (4 * 128 + 1, 2048)  # 1 GiB holds more than 4 full sequences need
    assert size(kv_cache_memory=50_000) == (50, 49 * 16)  # the budget binds: shorter max len
    assert size(kv_cache_memory=10) == (2, 16)  # never below the null block and one more
    assert size(num_kv_blocks=7, max_model_len=32) == (7, 32)  # given blocks are kept
    assert size(per_block=DEFAULT_KV_CACHE_MEMORY // 100, max_num_seqs=64)[0] == 100
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds .*pass at most 2048"):
        size(max_model_len=4096)


def test_speculation_backs_off_after_proposals_rejected_whole():
    """A decode whose proposals were all rejected proposes nothing for 1, 2, 4, ... steps
    (each miss cost a verification of several rows for one token); a hit ends the back-off."""
    cfg = EngineConfig(
        max_model_len=200, block_size=4, num_kv_blocks=60, speculative=SpeculativeConfig(3, 2, 1)
    )
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    seq = make([1, 2, 3, 1, 2, 3, 1, 2], 0, max_tokens=150)
    sched.add(seq)
    step(sched, model)
    history = []  # per step: (proposed, accepted)
    while seq.num_tokens < 150:
        batch = step(sched, model)
        drafted = batch.seqs[0].num_draft
        history.append((drafted, seq.num_computed_tokens - batch.seqs[0].start - 1))
    assert_correct(seq)
    misses = 0
    for i, (drafted, accepted) in enumerate(history[:-1]):
        if drafted and not accepted:
            misses += 1
            skip = (1 << min(misses, 5)) // 2
            assert all(d == 0 for d, _ in history[i + 1 : i + 1 + skip]), (i, history)
        elif drafted:
            misses = 0
    assert any(d and not a for d, a in history) and any(a for _, a in history), history
