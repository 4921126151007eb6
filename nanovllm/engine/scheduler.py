"""Continuous batching: decide which tokens of which sequences the next model step computes.

Every sequence is a list of tokens (prompt + generated) of which the first
`num_computed_tokens` already have their K/V in the cache. One step computes, for each
scheduled sequence, the next `n >= 1` tokens, and samples a new token when that chunk
reaches the end of the list. A prompt, a chunk of a long prompt, a decode (n = 1: the
last sampled token) and the re-prefill after a preemption are all this one rule.

`schedule()` builds one step within `max_num_seqs` and `max_num_batched_tokens`:

1. Running sequences first, decodes before unfinished prefills, oldest first. Each
   gets blocks for exactly the tokens it is given. When the pool is empty, the most
   recently admitted running sequence not yet in this step is preempted (its blocks are
   freed and it goes back to the front of the waiting queue, to be recomputed later);
   if that is the sequence asking, it preempts itself. A prefill chunk shrinks to the
   room left rather than preempt when some room is left.
2. If nothing was preempted, waiting sequences are admitted in order while the token
   budget, `max_num_seqs`, the state slots and the free blocks allow. An admitted
   sequence first reuses the longest chain of its full blocks found in the prefix
   cache, then gets fresh blocks for its first chunk. Siblings of an `n > 1` request
   wait until sibling 0 has computed the prompt, then find its full blocks the same way.

After the model ran, `postprocess()` advances `num_computed_tokens`, registers the blocks
that became full in the prefix cache, and appends the sampled tokens. Where every layer
slides (`sliding_window`), it also frees the blocks that fell out of the window: their
table entries become the null block, so a long sequence holds about window / block_size
blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # num_computed_tokens before this step; positions start..start+len(token_ids)-1
    token_ids: list[int]  # the tokens to compute this step
    slot_mapping: list[int]  # per token: table[pos // block_size] * block_size + pos % block_size
    block_table: list[int]  # the sequence's blocks (a copy), covering context_len tokens
    context_len: int  # start + len(token_ids)
    sample: bool  # sample a token after this chunk


@dataclass(slots=True)
class Batch:
    seqs: list[ScheduledSeq]
    preempted: list[Sequence]  # preempted while building this batch

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.free_state_slots: deque[int] = deque(range(config.num_state_slots))
        self.leaders: dict[str, Sequence] = {}  # request_id -> its unfinished sibling 0
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} was already scheduled; add a new Sequence")
        self.waiting.append(seq)
        if seq.index == 0:
            self.leaders[seq.request_id] = seq

    def schedule(self) -> Batch:
        batch = Batch([], [])
        budget = self.config.max_num_batched_tokens
        scheduled: set[Sequence] = set()
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier one
                continue
            n = self._reserve(
                seq, min(seq.num_tokens - seq.num_computed_tokens, budget), scheduled, batch
            )
            if n:
                self._emit(batch, seq, n)
                scheduled.add(seq)
                budget -= n
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _reserve(self, seq: Sequence, n: int, scheduled: set[Sequence], batch: Batch) -> int:
        """Get blocks for up to n more tokens of a running seq, preempting if none are left."""
        while True:
            room = (
                len(seq.block_table) + self.block_manager.num_free_blocks
            ) * self.block_size - seq.num_computed_tokens
            if room > 0:
                n = min(n, room)
                self.block_manager.append(seq, seq.num_computed_tokens + n)
                return n
            victim = next(s for s in reversed(self.running) if s not in scheduled)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return 0

    def _admit(self, batch: Batch, budget: int) -> None:
        # the queue is walked without copying it, and only as far as admissions go, so a step
        # costs the same however many requests wait
        bm, config = self.block_manager, self.config
        admitted: list[Sequence] = []
        for seq in self.waiting:
            if budget == 0 or len(self.running) >= config.max_num_seqs:
                break
            if self._held_back(seq):
                continue
            if config.num_state_slots and not self.free_state_slots:
                break
            cached = bm.cached_prefix(seq) if self._may_use_cache(seq) else None
            start = len(cached or ()) * self.block_size
            n = min(seq.num_tokens - start, budget)
            if not bm.can_allocate(cached or [], start + n):
                break
            admitted.append(seq)
            bm.allocate(seq, start + n, cached)
            seq.num_computed_tokens = seq.num_cached_tokens = start
            seq.status = SequenceStatus.RUNNING
            if config.num_state_slots:
                seq.state_slot = self.free_state_slots.popleft()
            self.running.append(seq)
            self._emit(batch, seq, n)
            budget -= n
        for seq in admitted:  # in queue order: usually its head
            if self.waiting[0] is seq:
                self.waiting.popleft()
            else:
                self.waiting.remove(seq)

    def _sharing_siblings(self, seq: Sequence) -> bool:
        # a recurrent state cannot be shared from blocks, so hybrid models compute each sibling
        return seq.index > 0 and seq.use_prefix_cache and self.config.num_state_slots == 0

    def _held_back(self, seq: Sequence) -> bool:
        leader = self.leaders.get(seq.request_id)
        return self._sharing_siblings(seq) and leader is not None and leader.num_output_tokens == 0

    def _may_use_cache(self, seq: Sequence) -> bool:
        return (
            seq.use_prefix_cache
            and self.config.enable_prefix_caching
            or self._sharing_siblings(seq)
        )

    def _emit(self, batch: Batch, seq: Sequence, n: int) -> None:
        bs, table, start = self.block_size, seq.block_table, seq.num_computed_tokens
        end = start + n
        slots = [table[p // bs] * bs + p % bs for p in range(start, end)]
        batch.seqs.append(
            ScheduledSeq(
                seq, start, seq.token_ids[start:end], slots, list(table), end, end == seq.num_tokens
            )
        )

    def postprocess(self, batch: Batch, sampled: list[int | None]) -> None:
        if len(sampled) != len(batch.seqs):
            raise ValueError(
                f"got {len(sampled)} sampled tokens for a batch of "
                f"{len(batch.seqs)} sequences; pass one entry per ScheduledSeq"
            )
        for s, token in zip(batch.seqs, sampled, strict=True):
            if s.sample and token is None and s.seq.status is SequenceStatus.RUNNING:
                raise ValueError(f"sequence {s.seq.seq_id} was to be sampled but got None")
        for s, token in zip(batch.seqs, sampled, strict=True):
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted since schedule()
                continue
            seq.num_computed_tokens = s.context_len
            self.block_manager.cache_full_blocks(seq)
            if self.config.sliding_window is not None:
                self.block_manager.free_out_of_window(seq, self.config.sliding_window)
            if s.sample and token is not None:
                seq.append_token(token)

    def finish(self, seq: Sequence, reason: str) -> None:
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason {reason!r} is not one of {FINISH_REASONS}")
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if self.leaders.get(seq.request_id) is seq:
            del self.leaders[seq.request_id]

    def abort(self, request_id: str) -> list[Sequence]:
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.state_slot is not None:
            self.free_state_slots.append(seq.state_slot)
            seq.state_slot = None
