"""ModelRunner: turns the scheduler's Batch into arrays, runs the model, samples.

This is the one engine module that touches arrays: host-side index arrays are built with
numpy, moved to the backend, and token ids come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layers.activation import log_softmax
from ..layers.attention import AttentionMetadata, AttentionPart
from ..layers.sampler import SamplingTensors, sample


@dataclass(slots=True)
class SeqResult:
    token_id: int | None = None
    logprobs: dict[int, tuple[float, int]] | None = None  # token id -> (logprob, rank)
    # prompt positions start+1 .. : per position, token id -> (logprob, rank)
    prompt_logprobs: list[dict[int, tuple[float, int]]] | None = None


def kv_cache_bytes_per_block(model, block_size: int, itemsize: int) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * itemsize


def _top_logprobs(row: np.ndarray, k: int, chosen: list[int]) -> dict[int, tuple[float, int]]:
    """The top k of one log-softmax row plus the chosen tokens, each with its rank."""
    out: dict[int, tuple[float, int]] = {}
    if k > 0:
        top = np.argpartition(-row, k - 1)[:k]
        top = top[np.argsort(-row[top], kind="stable")]
        for r, t in enumerate(top.tolist(), start=1):
            out[t] = (float(row[t]), r)
    for t in chosen:
        if t not in out:
            out[t] = (float(row[t]), int(np.count_nonzero(row > row[t])) + 1)
    return out


class ModelRunner:
    def __init__(self, model, backend, config, eos_token_ids=(), seed: int = 0):
        self.model, self.backend, self.config = model, backend, config
        self.eos_token_ids = [t for t in eos_token_ids if 0 <= t < model.vocab_size]
        self.xp = backend.xp
        self.block_size = config.block_size
        slots = config.num_kv_blocks * config.block_size
        shape = (slots, model.num_kv_heads, model.head_dim)
        self.kv_caches = [(backend.zeros(shape), backend.zeros(shape))
                          for _ in range(model.num_layers)]
        self.rng = np.random.default_rng(seed)

    # ---- batch -> arrays -------------------------------------------------------------
    def _part(self, group, query_len: int, window: int | None) -> AttentionPart:
        bs = self.block_size
        S = len(group)
        L = max(s.context_len for s in group)
        blocks = -(-L // bs)
        table = np.zeros((S, blocks), dtype=np.int64)  # padded with the null block 0
        for i, s in enumerate(group):
            table[i, :len(s.block_table)] = s.block_table[:blocks]
        slots = (table[:, :, None] * bs + np.arange(bs)).reshape(S, blocks * bs)[:, :L]
        key_pos = np.arange(L)
        starts = np.array([s.start for s in group])
        q_pos = starts[:, None] + np.arange(query_len)[None, :]  # [S, Q]
        lens = np.array([len(s.token_ids) for s in group])
        q_pos = np.where(np.arange(query_len)[None, :] < lens[:, None], q_pos, 0)
        mask = key_pos[None, None, :] <= q_pos[:, :, None]
        if window is not None:
            mask &= key_pos[None, None, :] > q_pos[:, :, None] - window
        b = self.backend
        return AttentionPart(b.index(slots), b.asarray(mask[:, None, None, :, :]), S,
                             query_len, L)

    def _metadata(self, decode, prefill) -> AttentionMetadata:
        b = self.backend
        window = getattr(self.model, "sliding_window", None)
        slot_mapping = [x for s in decode + prefill for x in s.slot_mapping]
        meta = AttentionMetadata(b.index(slot_mapping), len(decode), None, None)
        if decode:
            meta.decode = self._part(decode, 1, window)
        if prefill:
            Q = max(len(s.token_ids) for s in prefill)
            part = self._part(prefill, Q, window)
            qi, oi, offset = [], [], 0
            for i, s in enumerate(prefill):
                n = len(s.token_ids)
                qi.extend(range(offset, offset + n))
                qi.extend([offset] * (Q - n))
                oi.extend(range(i * Q, i * Q + n))
                offset += n
            part.query_index, part.output_index = b.index(qi), b.index(oi)
            meta.prefill = part
        return meta

    def _sampling_tensors(self, rows) -> SamplingTensors:
        b, V = self.backend, self.model.vocab_size
        params = [s.seq.params for s in rows]
        temp = np.array([p.temperature for p in params], dtype=np.float32)
        top_k = np.array([p.top_k if p.top_k > 0 else V for p in params], dtype=np.int64)
        top_p = np.array([p.top_p for p in params], dtype=np.float32)
        min_p = np.array([p.min_p for p in params], dtype=np.float32)
        uniform = np.empty(len(rows), dtype=np.float64)
        for i, s in enumerate(rows):
            p = s.seq.params
            if p.seed is not None:
                key = [p.seed & 0xFFFFFFFFFFFFFFFF, s.seq.index, s.seq.num_output_tokens]
                uniform[i] = np.random.default_rng(key).random()
            else:
                uniform[i] = self.rng.random()
        penalties = None
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
               for p in params):
            counts = np.zeros((len(rows), V), dtype=np.float32)
            seen = np.zeros((len(rows), V), dtype=bool)
            for i, s in enumerate(rows):
                out = np.asarray(s.seq.output_token_ids, dtype=np.int64)
                counts[i] = np.bincount(out, minlength=V)[:V]
                seen[i, s.seq.token_ids] = True
            penalties = (b.asarray(counts), b.asarray(seen),
                         b.asarray(np.array([p.presence_penalty for p in params], np.float32)),
                         b.asarray(np.array([p.frequency_penalty for p in params], np.float32)),
                         b.asarray(np.array([p.repetition_penalty for p in params], np.float32)))
        banned = None
        if any(s.seq.num_output_tokens < s.seq.params.min_tokens for s in rows):
            mask = np.zeros((len(rows), V), dtype=bool)
            for i, s in enumerate(rows):
                p = s.seq.params
                if s.seq.num_output_tokens < p.min_tokens:
                    mask[i, p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)] = True
            banned = b.asarray(mask)
        return SamplingTensors(
            b.asarray(temp), b.index(top_k), b.asarray(top_p), b.asarray(min_p),
            b.asarray(uniform.astype(np.float32)), all_greedy=bool(np.all(temp == 0)),
            needs_sort=bool(np.any((top_k < V) | (top_p < 1.0))),
            needs_min_p=bool(np.any(min_p > 0)), penalties=penalties, banned=banned)

    # ---- one step ------------------------------------------------------------------------
    def execute(self, batch) -> list[SeqResult]:
        """Runs one scheduled step; returns one SeqResult per batch.seqs entry, in order."""
        b = self.backend
        order = sorted(range(len(batch.seqs)), key=lambda i: len(batch.seqs[i].token_ids) > 1)
        seqs = [batch.seqs[i] for i in order]
        decode = [s for s in seqs if len(s.token_ids) == 1]
        prefill = [s for s in seqs if len(s.token_ids) > 1]
        ids = [t for s in seqs for t in s.token_ids]
        pos = [p for s in seqs for p in range(s.start, s.start + len(s.token_ids))]
        meta = self._metadata(decode, prefill)
        with b.inference():
            return self._run(batch, seqs, ids, pos, meta)

    def _run(self, batch, seqs, ids, pos, meta) -> list[SeqResult]:
        xp, b = self.xp, self.backend
        hidden, self.kv_caches = self.model.forward(b.index(ids), b.index(pos),
                                                    self.kv_caches, meta)
        # rows of `hidden` that need logits: every prompt row for prompt-logprob requests,
        # else only the last row of chunks that end in a sample
        rows, sample_at, prompt_rows, offset = [], {}, {}, 0
        for s in seqs:
            n = len(s.token_ids)
            p = s.seq.params
            wants_prompt = (p.prompt_logprobs is not None
                            and s.start < s.seq.num_prompt_tokens - 1)
            if wants_prompt:
                prompt_rows[id(s)] = len(rows)
                rows.extend(range(offset, offset + n))
            if s.sample:
                sample_at[id(s)] = len(rows) - 1 if wants_prompt else len(rows)
                if not wants_prompt:
                    rows.append(offset + n - 1)
            offset += n
        results = {id(s): SeqResult() for s in seqs}
        if rows:
            logits = self.model.compute_logits(xp.take(hidden, b.index(rows), axis=0))
            sampled = [s for s in seqs if s.sample]
            if sampled:
                self._sample(logits, sampled, [sample_at[id(s)] for s in sampled], results)
            if prompt_rows:
                self._prompt_logprobs(logits, seqs, prompt_rows, results)
        return [results[id(batch.seqs[i])] for i in range(len(batch.seqs))]

    def _sample(self, logits, sampled, at, results) -> None:
        xp, b = self.xp, self.backend
        index = b.index(at)
        rows = xp.take(logits, index, axis=0)
        tokens = b.to_host(sample(xp, rows, self._sampling_tensors(sampled))).tolist()
        want = [i for i, s in enumerate(sampled) if s.seq.params.logprobs is not None]
        lp = b.to_host(log_softmax(xp, xp.take(rows, b.index(want), axis=0))) if want else None
        for i, s in enumerate(sampled):
            results[id(s)].token_id = int(tokens[i])
        for j, i in enumerate(want):
            s = sampled[i]
            results[id(s)].logprobs = _top_logprobs(lp[j], s.seq.params.logprobs, [tokens[i]])

    def _prompt_logprobs(self, logits, seqs, prompt_rows, results) -> None:
        xp, b = self.xp, self.backend
        for s in seqs:
            if id(s) not in prompt_rows:
                continue
            first, n = prompt_rows[id(s)], len(s.token_ids)
            # row for position p predicts token p + 1, which must be a prompt token
            last = min(s.start + n, s.seq.num_prompt_tokens - 1)
            count = last - s.start
            lp = b.to_host(log_softmax(xp, logits[first:first + count, ...]))
            k = s.seq.params.prompt_logprobs
            targets = s.seq.token_ids[s.start + 1:s.start + 1 + count]
            results[id(s)].prompt_logprobs = [
                _top_logprobs(lp[j], k, [targets[j]]) for j in range(count)]
