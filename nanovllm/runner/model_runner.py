"""ModelRunner: turns the scheduler's Batch into arrays, runs the model, samples.

Host-side index arrays are built with numpy (attention_layout.py: which keys each query reads;
sampling.py: the sampling parameters), moved to the backend, and token ids come back to the
host.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..layers.activation import log_softmax
from ..layers.attention import AttentionMetadata, AttentionPart
from ..layers.mamba2 import StateMetadata
from ..layers.sampler import SamplingTensors, sample
from ..models.base import linear_weights
from . import attention_layout as layout
from .row_invariance import invariant_row_block
from .sampling import sampling_tensors, top_logprobs, unpack_index


@dataclass(slots=True)
class SeqResult:
    token_id: int | None = None
    logprobs: dict[int, tuple[float, int]] | None = None  # token id -> (logprob, rank)
    # prompt positions start+1 .. : per position, token id -> (logprob, rank)
    prompt_logprobs: list[dict[int, tuple[float, int]]] | None = None
    error: str | None = None  # the row's logits were not finite: no token could be sampled
    # speculative decoding: the tokens kept after token_id (accepted proposals, then the
    # model's own next token), each with its logprobs entries (None when not asked for)
    more: list[tuple[int, dict[int, tuple[float, int]] | None]] = field(default_factory=list)

    def token_ids(self) -> list[int]:
        return [] if self.token_id is None else [self.token_id, *(t for t, _ in self.more)]


QUERY_TILE = 64  # tiled parts (jitting backends): queries per item
KEY_TILE = 64  # and keys per item
# eager backends: a prefill chunk's queries go in blocks of this many, each over the keys up
# to its last query, so the causal half of the scores is mostly never computed
PREFILL_QUERY_BLOCK = 128


def row_blocks(seqs, size: int) -> list[list[tuple]]:
    """The step's chunks cut into passes of at most `size` rows, in order, as (chunk, piece)
    pairs: a chunk longer than what is left of a pass goes on in the next pass, and only its
    last piece samples. Each pass reads the K/V that the passes before it wrote."""
    blocks, block, free = [], [], size
    for s in seqs:
        n, done = len(s.token_ids), 0
        while done < n:
            m = min(free, n - done)
            piece = replace(
                s,
                start=s.start + done,
                token_ids=s.token_ids[done : done + m],
                slot_mapping=s.slot_mapping[done : done + m],
                context_len=s.start + done + m,
                sample=s.sample and done + m == n,
            )
            block.append((s, piece))
            done, free = done + m, free - m
            if free == 0:
                blocks.append(block)
                block, free = [], size
    return blocks + [block] if block else blocks


def _half_octaves(n: int) -> int:
    """n rounded up to 2^k or 3 * 2^(k-2): at most a third is padding."""
    p = 1 << max(n - 1, 0).bit_length()
    return p * 3 // 4 if p >= 8 and n <= p * 3 // 4 else p


class ModelRunner:
    def __init__(self, model, backend, config, eos_token_ids=(), seed: int = 0):
        self.model, self.backend, self.config = model, backend, config
        self.eos_token_ids = [t for t in eos_token_ids if 0 <= t < model.vocab_size]
        self.xp = backend.xp
        self.block_size = config.block_size
        slots = config.num_kv_blocks * config.block_size
        # one extra state slot, owned by no sequence, takes the padding rows' state writes;
        # the snapshot slots of a hybrid model's prefix cache come after it
        self.scratch_state_slot = config.num_state_slots
        self.kv_caches = model.allocate_cache(
            backend, slots, config.num_state_slots + 1 + config.num_state_snapshots
        )
        self.rng = np.random.default_rng(seed)
        self.token_bits = unpack_index(backend, model.vocab_size)  # for structured outputs
        # a jitting backend wants few distinct shapes: it rounds sizes up to buckets
        self.bucket = backend.bucket
        # tiled attention parts (few shapes) where jitting, exact parts (no padding) otherwise
        self.tiled, self.query_tile, self.key_tile = backend.jits, QUERY_TILE, KEY_TILE
        self.decode_query_tile = 1
        # sizes that set the work (prefill rows, tiled attention items): rounded more finely
        self.fine_bucket = _half_octaves if backend.jits else backend.bucket
        # the rows that get logits, and the sampled rows, are padded with this
        self.rows_bucket = self.bucket
        self.row_block = 0
        if config.batch_invariant:
            # every pass computes exactly row_block rows, so each GEMM has one shape, and as
            # many as the backend multiplies with every row's sums the same wherever it sits
            # (row_invariance.py); attention takes row_block-query tiles at absolute positions
            # (decodes too) over key tiles at absolute positions, merged in key order
            self.row_block = invariant_row_block(backend, linear_weights(model))
            self.tiled = True
            self.query_tile = self.decode_query_tile = self.row_block
            self.rows_bucket = self._row_block
        for cls in (AttentionMetadata, AttentionPart, StateMetadata, SamplingTensors):
            backend.register_step_dataclass(cls)
        self._step = backend.jit(self._device_step, donate_argnums=(1,))
        self._sample = backend.jit(self._device_sample)

    def _row_block(self, n: int) -> int:
        assert n <= self.row_block, (n, self.row_block)
        return self.row_block

    def _device_step(self, params, kv_caches, ids, pos, meta, rows):
        hidden, kv_caches = self.model.forward(params, ids, pos, kv_caches, meta)
        return self.model.compute_logits(params, self.xp.take(hidden, rows, axis=0)), kv_caches

    def _device_sample(self, logits, rows, tensors):
        xp = self.xp
        rows = xp.take(logits, rows, axis=0)
        return sample(xp, rows, tensors), xp.all(xp.isfinite(rows), axis=-1)

    # ---- batch -> arrays -------------------------------------------------------------
    def _padded_prefill(self, prefill) -> tuple[int, int, list[int], list[int]]:
        """The prefill chunks as a padded [S, Q] view: S, Q, the prefill rows forming it, and
        the view's rows to keep (one per prefill row, padding rows included)."""
        S = self.bucket(len(prefill))
        Q = self.bucket(max(len(s.token_ids) for s in prefill))
        qi: list[int] = []
        oi: list[int] = []
        offset = 0
        for i, s in enumerate(prefill):
            n = len(s.token_ids)
            qi.extend(list(range(offset, offset + n)) + [offset] * (Q - n))
            oi.extend(range(i * Q, i * Q + n))
            offset += n
        qi.extend([0] * ((S - len(prefill)) * Q))
        oi.extend([0] * (self.fine_bucket(offset) - offset))
        return S, Q, qi, oi

    def _decode_groups(self, decode, window: int | None) -> list[tuple[int, int]]:
        """Runs of the decode sequences (sorted by context length) attended together: a new
        run starts where the keys read (the context, or the window) grow past twice the run's
        fewest, so little of a gathered context is padding."""

        def keys(s) -> int:
            return s.context_len if window is None else min(s.context_len, window)

        groups, lo = [], 0
        for i in range(1, len(decode) + 1):
            if i == len(decode) or keys(decode[i]) > 2 * keys(decode[lo]) + self.block_size:
                groups.append((lo, i))
                lo = i
        return groups

    def _attention_parts(
        self, decode, num_decode_rows: int, prefill, num_prefill_rows: int, window: int | None
    ) -> list[AttentionPart]:
        """Parts covering the decode rows [0, num_decode_rows) and the prefill rows after them,
        for the layers with this sliding `window` (None: full attention).

        Eager backends: exact parts (a run of decode sequences, one prefill chunk each).
        Jitting backends: one tiled part for the decodes and one for the prefill chunks.
        """
        bs, parts = self.block_size, []
        if self.tiled:
            tiled: list[tuple[tuple, int, int]] = []
            if decode:
                tiles = layout.decode_tiles(decode, self.decode_query_tile)
                tiled.append((tiles, 0, num_decode_rows))
            if prefill:
                tiles = layout.prefill_tiles(prefill, self.query_tile, aligned=bool(self.row_block))
                tiled.append((tiles, num_decode_rows, num_prefill_rows))
            for (tables, q_pos, q_row), first_row, num_rows in tiled:
                part = layout.tiled_part(
                    tables, q_pos, q_row, num_rows, bs, self.key_tile, window,
                    self.fine_bucket, self.bucket,
                )  # fmt: skip
                parts.append(layout.to_device(part, self.backend, first_row, num_rows))
            return parts
        for lo, hi in self._decode_groups(decode, window):
            part = layout.exact_part(decode[lo:hi], hi - lo, 1, bs, window)
            parts.append(layout.to_device(part, self.backend, lo, hi - lo))
        row = num_decode_rows
        for s in prefill:
            n = len(s.token_ids)
            for a in range(0, n, PREFILL_QUERY_BLOCK):
                b = min(a + PREFILL_QUERY_BLOCK, n)
                piece = replace(
                    s, start=s.start + a, token_ids=s.token_ids[a:b], context_len=s.start + b
                )
                part = layout.exact_part([piece], 1, b - a, bs, window)
                parts.append(layout.to_device(part, self.backend, row + a, b - a))
            row += n
        return parts

    def _layout(self, decode, prefill):
        """Token ids, positions, metadata and each sequence's first row, padded if bucketing.

        Rows: the decode tokens (one per sequence, sorted by context length, padded to a
        bucket), then the prefill chunks back to back (padded to a finer bucket); in the
        batch-invariant mode, exactly row_block rows. Padding tokens write to the null block.
        """
        backend = self.backend
        decode = sorted(decode, key=lambda s: s.context_len)
        if self.row_block:  # one pass of row_block rows: the padding goes to the last part
            num_decode_rows = len(decode) if prefill else self.row_block
        else:
            num_decode_rows = self.bucket(len(decode)) if decode else 0
        ids, pos, slots, first = [], [], [], {}
        for i, s in enumerate(decode):
            first[id(s)] = i
            ids.append(s.token_ids[0])
            pos.append(s.start)
            slots.extend(s.slot_mapping)
        pad = num_decode_rows - len(decode)
        ids, pos, slots = ids + [0] * pad, pos + [0] * pad, slots + [0] * pad
        for s in prefill:
            first[id(s)] = len(ids)
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            pos.extend(range(s.start, s.start + n))
            slots.extend(s.slot_mapping)
        num_prefill_rows = len(ids) - num_decode_rows
        if self.row_block:
            num_prefill_rows = self.row_block - num_decode_rows
        elif num_prefill_rows:
            num_prefill_rows = self.fine_bucket(num_prefill_rows)
        pad = num_decode_rows + num_prefill_rows - len(ids)
        ids, pos, slots = ids + [0] * pad, pos + [0] * pad, slots + [0] * pad
        meta = AttentionMetadata(
            backend.index(slots),
            [],
            fused=backend.fused_attention(),
            fused_lone_query=backend.fused_attention_lone_query,
        )
        for window in set(self.model.layer_windows) or {None}:
            parts = self._attention_parts(
                decode, num_decode_rows, prefill, num_prefill_rows, window
            )
            if window is None:
                meta.parts = parts
            else:
                meta.window_parts[window] = parts
        if self.config.num_state_slots:
            meta.state = self._state_metadata(decode, num_decode_rows, prefill)
        return backend.index(ids), backend.index(pos), meta, first

    def _state_metadata(self, decode, num_decode_rows: int, prefill) -> StateMetadata:
        """Each sequence's state slot, the slot its state is read from (its own, or the
        snapshot it resumes from), reset flag (start == 0) and chunk length, and where a
        chunk saves a snapshot; padding rows and padding sequences use the scratch slot."""
        backend, scratch = self.backend, self.scratch_state_slot
        st = StateMetadata(num_decode=num_decode_rows)

        def read(s) -> int:
            return s.seq.state_slot if s.state_source is None else s.state_source

        if decode:
            pad = num_decode_rows - len(decode)
            st.decode_slots = backend.index([s.seq.state_slot for s in decode] + [scratch] * pad)
            st.decode_read_slots = backend.index([read(s) for s in decode] + [scratch] * pad)
            st.decode_reset = backend.step_input(
                np.array([s.start == 0 for s in decode] + [True] * pad)
            )
            if any(s.snapshot for s in decode):  # a decode's snapshot is its state after it
                st.decode_snapshot_slots = backend.index(
                    [s.snapshot[1] if s.snapshot else scratch for s in decode] + [scratch] * pad
                )
        if prefill:
            S, Q, qi, oi = self._padded_prefill(prefill)
            pad = S - len(prefill)
            st.prefill_slots = backend.index([s.seq.state_slot for s in prefill] + [scratch] * pad)
            st.prefill_read_slots = backend.index([read(s) for s in prefill] + [scratch] * pad)
            st.prefill_reset = backend.step_input(
                np.array([s.start == 0 for s in prefill] + [True] * pad)
            )
            st.prefill_lens = backend.index([len(s.token_ids) for s in prefill] + [0] * pad)
            if any(s.snapshot for s in prefill):
                snaps = [s.snapshot or (0, scratch) for s in prefill] + [(0, scratch)] * pad
                st.prefill_snapshot_lens = backend.index([n for n, _ in snaps])
                st.prefill_snapshot_slots = backend.index([slot for _, slot in snaps])
            st.prefill_seqs, st.prefill_steps = S, Q
            st.prefill_query_index, st.prefill_output_index = backend.index(qi), backend.index(oi)
        return st

    # ---- one step ------------------------------------------------------------------------
    def execute(self, batch) -> list[SeqResult]:
        """Runs one scheduled step; returns one SeqResult per batch.seqs entry, in order."""
        if not self.row_block:
            return self._execute(batch.seqs)
        results = {id(s): SeqResult() for s in batch.seqs}
        for block in row_blocks(batch.seqs, self.row_block):
            for (s, piece), r in zip(block, self._execute([piece for _, piece in block])):
                into = results[id(s)]
                if r.prompt_logprobs is not None:
                    into.prompt_logprobs = (into.prompt_logprobs or []) + r.prompt_logprobs
                if piece.sample:
                    into.token_id, into.logprobs, into.error = r.token_id, r.logprobs, r.error
        return [results[id(s)] for s in batch.seqs]

    def _execute(self, seqs) -> list[SeqResult]:
        backend = self.backend
        decode = [s for s in seqs if len(s.token_ids) == 1]
        prefill = [s for s in seqs if len(s.token_ids) > 1]
        ids, pos, meta, first = self._layout(decode, prefill)
        # rows of the hidden states that need logits: every prompt row for prompt-logprob
        # requests, else only the last row of chunks that end in a sample
        rows: list[int] = []
        sample_at: dict[int, int] = {}  # id(chunk) -> its row in `rows`
        prompt_rows: dict[int, int] = {}  # id(chunk) -> its first prompt row in `rows`
        for s in decode + prefill:
            n, offset = len(s.token_ids), first[id(s)]
            wants_prompt = (
                s.seq.params.prompt_logprobs is not None and s.start < s.seq.num_prompt_tokens - 1
            )
            if wants_prompt:
                prompt_rows[id(s)] = len(rows)
                rows.extend(range(offset, offset + n))
            if s.sample:
                # the last row, and with proposals the row before each of them too
                if not wants_prompt:
                    rows.extend(range(offset + n - 1 - s.num_draft, offset + n))
                sample_at[id(s)] = len(rows) - 1 - s.num_draft
        results = {id(s): SeqResult() for s in seqs}
        if not rows:  # nothing to sample: still write the K/V
            rows = [0]
        rows += [0] * (self.rows_bucket(len(rows)) - len(rows))
        with backend.inference():
            logits, self.kv_caches = self._step(
                self.model.params, self.kv_caches, ids, pos, meta, backend.index(rows)
            )
            sampled = [s for s in decode + prefill if s.sample]
            if sampled:
                self._sample_rows(logits, sampled, [sample_at[id(s)] for s in sampled], results)
            if prompt_rows:
                self._prompt_logprobs(logits, decode + prefill, prompt_rows, results)
        return [results[id(s)] for s in seqs]

    def _sample_rows(self, logits, sampled, at, results) -> None:
        """Sample each chunk's row, and with proposals each row before one too (row j as if
        the first j proposals had been sampled: its own uniform, penalties, min_tokens and
        grammar mask); keep the proposals the model itself produced, and its next token."""
        xp, backend = self.xp, self.backend
        # one sampled row per (chunk, j): j proposals of the chunk come before the row
        chunks = [s for s in sampled for _ in range(1 + s.num_draft)]
        offsets = [j for s in sampled for j in range(1 + s.num_draft)]
        rows = [a + j for s, a in zip(sampled, at) for j in range(1 + s.num_draft)]
        n = self.rows_bucket(len(rows))
        tensors = sampling_tensors(
            chunks, backend, self.model.vocab_size, n, self.eos_token_ids, self.rng,
            self.token_bits, offsets,
        )  # fmt: skip
        tokens, finite = self._sample(logits, backend.index(rows + [0] * (n - len(rows))), tensors)
        tokens, finite = backend.to_host(tokens).tolist(), backend.to_host(finite).tolist()
        kept: list[list[int]] = []  # per chunk, the rows (indices into `rows`) it keeps
        i = 0
        for s in sampled:
            draft = s.token_ids[len(s.token_ids) - s.num_draft :]
            keep = [i]
            for j, proposed in enumerate(draft):  # a non-finite row is left to a later step
                if not finite[i + j] or tokens[i + j] != proposed or not finite[i + j + 1]:
                    break
                keep.append(i + j + 1)
            kept.append(keep)
            i += 1 + s.num_draft
        want = [r for s, keep in zip(sampled, kept) if s.seq.params.logprobs is not None
                for r in keep]  # fmt: skip
        if want:
            lp_rows = [rows[r] for r in want]
            lp_rows += [0] * (self.rows_bucket(len(lp_rows)) - len(lp_rows))
            lp = backend.to_host(log_softmax(xp, xp.take(logits, backend.index(lp_rows), axis=0)))
            lp_of = {r: lp[j] for j, r in enumerate(want)}
        for s, keep in zip(sampled, kept):
            k = s.seq.params.logprobs
            entries = [
                (int(tokens[r]), None if k is None else top_logprobs(lp_of[r], k, [tokens[r]]))
                for r in keep
            ]
            res = results[id(s)]
            (res.token_id, res.logprobs), res.more = entries[0], entries[1:]
            if not finite[keep[0]]:
                res.error = (
                    f"the model computed non-finite logits (NaN or infinity) at position "
                    f"{s.context_len - 1 - s.num_draft} of this sequence, so no token could be "
                    "sampled"
                )

    def _prompt_logprobs(self, logits, seqs, prompt_rows, results) -> None:
        lp = self.backend.to_host(log_softmax(self.xp, logits))  # every row: one shape
        for s in seqs:
            if id(s) not in prompt_rows:
                continue
            first, n = prompt_rows[id(s)], len(s.token_ids)
            # row for position p predicts token p + 1, which must be a prompt token
            last = min(s.start + n, s.seq.num_prompt_tokens - 1)
            count = last - s.start
            k = s.seq.params.prompt_logprobs
            targets = s.seq.token_ids[s.start + 1 : s.start + 1 + count]
            results[id(s)].prompt_logprobs = [
                top_logprobs(lp[first + j], k, [targets[j]]) for j in range(count)
            ]
