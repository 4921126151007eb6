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

A model with recurrent state (Mamba layers) resumes a cached prefix only where a state was
saved (state_snapshots.py). One is saved per prompt, at its last block boundary
((prompt length - 1) // block_size blocks): the longest prefix that the same prompt sent
again, its other samples, or any longer prompt that starts with it (the next turn of a chat)
can reuse. The chunk that crosses that boundary writes the state there into a snapshot slot.

With speculative decoding (`config.speculative`), a decoding sequence's chunk is its last
token followed by up to k proposed tokens (ngram.py), each with a KV slot and counted in the
token budget; what is left of the budget after every decode's own token is shared out in
order. The runner samples at every one of those positions and keeps the proposals the model
itself would have produced, plus its next token; `postprocess()` then counts only those as
computed (so only accepted tokens are ever sealed into the prefix cache) and gives back the
blocks that held nothing but rejected ones. A sequence whose proposals were rejected whole
decodes plainly for the next 1, 2, 4, 8, then 16 steps: a verification of k + 1 rows costs
more than one row's decode (about 1.8x on numpy), so free text, where lookups rarely hit, pays
little for it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.ngram import propose
from nanovllm.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus
from nanovllm.engine.state_snapshots import BlockKey, StateSnapshots


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # num_computed_tokens before this step; positions start..start+len(token_ids)-1
    token_ids: list[int]  # the tokens to compute this step
    slot_mapping: list[int]  # per token: table[pos // block_size] * block_size + pos % block_size
    block_table: list[int]  # the sequence's blocks (a copy), covering context_len tokens
    context_len: int  # start + len(token_ids)
    sample: bool  # sample a token after this chunk
    # recurrent state (hybrid models): the slot this chunk starts from when it is not the
    # sequence's own (a snapshot it resumes from), and (tokens into the chunk, slot) where the
    # state after that many of its tokens is saved
    state_source: int | None = None
    snapshot: tuple[int, int] | None = None
    # speculative decoding: the last this many of token_ids are proposals, not yet the
    # sequence's; the chunk is sampled at each of them and at the token before them
    num_draft: int = 0


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
        self.block_manager = BlockManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.free_state_slots: deque[int] = deque(range(config.num_state_slots))
        # after the running sequences' slots comes one scratch slot (the runner's), then these
        first = config.num_state_slots + 1
        self.snapshots = StateSnapshots(range(first, first + config.num_state_snapshots))
        self.leaders: dict[str, Sequence] = {}  # request_id -> its unfinished sibling 0
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # speculative decoding: tokens proposed
        self.num_accepted_tokens = 0  # of those, accepted

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
        ordered = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        # speculation may use what is left of the budget once every decode has its token, and
        # the free blocks beyond one for each decode after it (proposals never preempt)
        decodes = sum(1 for s in ordered if s.num_tokens - s.num_computed_tokens == 1)
        spare = budget - decodes
        for seq in ordered:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier one
                continue
            is_decode = seq.num_tokens - seq.num_computed_tokens == 1
            decodes -= is_decode
            draft = self._draft(seq, spare, decodes) if self.config.speculative else []
            n = self._reserve(
                seq,
                min(seq.num_tokens - seq.num_computed_tokens + len(draft), budget),
                scheduled,
                batch,
            )
            if n:
                draft = draft[: n - 1] if draft else draft  # fewer where blocks ran short
                self._emit(batch, seq, n - len(draft), draft=draft)
                scheduled.add(seq)
                budget -= n
                spare -= len(draft)
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _draft(self, seq: Sequence, spare: int, decodes_after: int) -> list[int]:
        """The tokens proposed for a decoding sequence: as many as the speculative config,
        the spare budget, the free blocks (beyond one for each of the `decodes_after` decodes
        still to schedule), max_model_len and the request's max_tokens leave room for (its
        own next token comes after them)."""
        spec = self.config.speculative
        assert spec is not None
        if seq.num_tokens - seq.num_computed_tokens != 1:  # a prompt chunk, not a decode
            return []
        free = max(self.block_manager.num_free_blocks - decodes_after, 0)
        k = min(
            spec.num_speculative_tokens,
            spare,
            (len(seq.block_table) + free) * self.block_size - seq.num_tokens,
            self.config.max_model_len - seq.num_tokens - 1,
            (seq.max_tokens or 1 << 62) - seq.num_output_tokens - 1,
        )
        if k <= 0:
            return []
        if seq.spec_skip:  # its last proposals were all rejected: decode plainly a while
            seq.spec_skip -= 1
            return []
        return propose(seq.token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max)

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
            source = None
            if cached and config.num_state_slots:  # resume only where a state was saved
                cached, source = self._resumable(cached)
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
            if source is not None:
                self.snapshots.pin(source)
            self.running.append(seq)
            self._emit(batch, seq, n, source)
            budget -= n
        for seq in admitted:  # in queue order: usually its head
            if self.waiting[0] is seq:
                self.waiting.popleft()
            else:
                self.waiting.remove(seq)

    def _resumable(self, cached: list[int]) -> tuple[list[int], int | None]:
        """The longest part of a cached chain that ends at a saved state, and that state's
        slot (([], None) if no block of the chain has one)."""
        blocks = self.block_manager.blocks
        for i in range(len(cached), 0, -1):
            slot = self.snapshots.find((cached[i - 1], blocks[cached[i - 1]].serial))
            if slot is not None:
                return cached[:i], slot
        return [], None

    def _snapshot_live(self, key: BlockKey) -> bool:
        block = self.block_manager.blocks[key[0]]
        return block.serial == key[1] and block.hash is not None

    def _sharing_siblings(self, seq: Sequence) -> bool:
        # a recurrent state is shared through a snapshot, so without them hybrid models
        # compute each sibling
        return (
            seq.index > 0
            and seq.use_prefix_cache
            and (self.config.num_state_slots == 0 or bool(self.snapshots))
        )

    def _held_back(self, seq: Sequence) -> bool:
        leader = self.leaders.get(seq.request_id)
        return self._sharing_siblings(seq) and leader is not None and leader.num_output_tokens == 0

    def _may_use_cache(self, seq: Sequence) -> bool:
        return (
            seq.use_prefix_cache
            and self.config.enable_prefix_caching
            or self._sharing_siblings(seq)
        )

    def _emit(
        self,
        batch: Batch,
        seq: Sequence,
        n: int,
        source: int | None = None,
        draft: list[int] | None = None,
    ) -> None:
        """Schedule seq's next n tokens, then the proposed `draft` tokens after them."""
        bs, table, start = self.block_size, seq.block_table, seq.num_computed_tokens
        draft = draft or []
        end = start + n + len(draft)
        slots = [table[p // bs] * bs + p % bs for p in range(start, end)]
        batch.seqs.append(
            ScheduledSeq(
                seq,
                start,
                seq.token_ids[start : start + n] + draft,
                slots,
                list(table),
                end,
                start + n == seq.num_tokens,
                source,
                self._snapshot_for(seq, start, end),
                len(draft),
            )
        )

    def _snapshot_for(self, seq: Sequence, start: int, end: int) -> tuple[int, int] | None:
        """(offset, slot) if this chunk crosses the prompt's last block boundary. A state saved
        there already would have been resumed from, so the chunk would start at it."""
        if not self.snapshots or not seq.use_prefix_cache:  # it neither resumes nor saves
            return None
        boundary = (seq.num_prompt_tokens - 1) // self.block_size * self.block_size
        if not start < boundary <= end:
            return None
        slot = self.snapshots.take(self._snapshot_live)
        return None if slot is None else (boundary - start, slot)

    def postprocess(self, batch: Batch, sampled: list[int | list[int] | None]) -> None:
        """After the step: per scheduled chunk, the sampled token (None if not sampled), or
        for a chunk with proposals the tokens kept: the accepted proposals, then the model's
        own next token (one more than the number accepted)."""
        if len(sampled) != len(batch.seqs):
            raise ValueError(
                f"got {len(sampled)} sampled tokens for a batch of "
                f"{len(batch.seqs)} sequences; pass one entry per ScheduledSeq"
            )
        kept: list[list[int]] = []
        for s, token in zip(batch.seqs, sampled, strict=True):
            tokens = [] if token is None else [token] if isinstance(token, int) else list(token)
            running = s.seq.status is SequenceStatus.RUNNING
            if s.sample and not tokens and running:
                raise ValueError(f"sequence {s.seq.seq_id} was to be sampled but got None")
            if len(tokens) > 1 + s.num_draft or (tokens and not s.sample):
                raise ValueError(
                    f"sequence {s.seq.seq_id} got {len(tokens)} tokens for a chunk with "
                    f"{s.num_draft} proposals; pass at most {1 + s.num_draft}"
                )
            kept.append(tokens)
        for s, tokens in zip(batch.seqs, kept, strict=True):
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted since schedule()
                self._release_state_refs(s)
                continue
            # the proposals after the accepted ones were computed, but are not the sequence's
            rejected = s.num_draft - max(len(tokens) - 1, 0)
            seq.num_computed_tokens = s.context_len - rejected
            self.num_draft_tokens += s.num_draft
            self.num_accepted_tokens += s.num_draft - rejected
            if s.num_draft:  # a miss backs off for 1, 2, 4, 8, 16 steps; a hit ends it
                seq.spec_misses = seq.spec_misses + 1 if rejected == s.num_draft else 0
                seq.spec_skip = (1 << min(seq.spec_misses, 5)) // 2
            for token in tokens:  # first: the accepted proposals are hashed into full blocks
                seq.append_token(token)
            self.block_manager.cache_full_blocks(seq)
            self._save_snapshot(s)
            if self.config.sliding_window is not None:
                self.block_manager.free_out_of_window(seq, self.config.sliding_window)
            if rejected:  # blocks that held only rejected proposals go back
                self.block_manager.trim(seq, seq.num_computed_tokens)

    def _save_snapshot(self, s: ScheduledSeq) -> None:
        """Bind the state this step saved to the block it ends at, now sealed: to the block the
        prefix cache finds for the same tokens, which is another one where this sequence
        computed again a prefix whose blocks were cached but whose state was not."""
        if s.state_source is not None:
            self.snapshots.unpin(s.state_source)
        if s.snapshot is None:
            return
        bm, (offset, slot) = self.block_manager, s.snapshot
        block = bm.blocks[s.block_table[(s.start + offset) // self.block_size - 1]]
        found = bm.hash_to_block.get(block.hash) if block.hash is not None else None
        if found is not None and bm.blocks[found].token_ids == block.token_ids:
            self.snapshots.bind((found, bm.blocks[found].serial), slot)
        else:
            self.snapshots.release(slot)

    def _release_state_refs(self, s: ScheduledSeq) -> None:
        if s.state_source is not None:
            self.snapshots.unpin(s.state_source)
        if s.snapshot is not None:
            self.snapshots.release(s.snapshot[1])

    def discard(self, batch: Batch) -> None:
        """A step that did not run (the model raised): give back the snapshot slots it took
        and the pins it held; its sequences are aborted by the caller."""
        for s in batch.seqs:
            self._release_state_refs(s)

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
