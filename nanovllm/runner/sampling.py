"""What the sampler gets from the host: the step's sampling parameters as arrays, and the
top-k logprob entries read back from a log-softmax row."""

from __future__ import annotations

import numpy as np

from ..layers.sampler import SamplingTensors
from ..structured_outputs import fill_bitmask


def top_logprobs(row: np.ndarray, k: int, chosen: list[int]) -> dict[int, tuple[float, int]]:
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


def unpack_index(b, V: int) -> tuple:
    """Where token t's bit lies in a packed mask row: (word t // 32 [V], bit t % 32 [V])."""
    tokens = np.arange(V)
    return b.index(tokens // 32), b.step_input((tokens % 32).astype(np.int32))


def sampling_tensors(
    rows,
    b,
    V: int,
    n: int,
    eos_token_ids: list[int],
    rng,
    token_bits: tuple = (),
    offsets: list[int] | None = None,
) -> SamplingTensors:
    """The sampling parameters of the scheduled chunks `rows`, padded to n rows, on backend b.

    A seeded request's uniform is drawn from a generator keyed by (seed, sample index, output
    position), so it never depends on the batch; unseeded ones take the runner's `rng`.

    Speculative decoding: `offsets[i]` says how many of the chunk's proposals come before row
    i; the row is then sampled as if they had been sampled already (its output position,
    penalties, min_tokens and grammar state count them). A chunk's rows are consecutive, from
    offset 0 up.
    """
    offsets = offsets or [0] * len(rows)
    drafts = [s.token_ids[len(s.token_ids) - s.num_draft :][:j] for s, j in zip(rows, offsets)]
    params = [s.seq.params for s in rows]
    temp = np.zeros(n, dtype=np.float32)
    temp[: len(rows)] = [p.temperature for p in params]
    top_k = np.full(n, V, dtype=np.int64)
    top_k[: len(rows)] = [p.top_k if p.top_k > 0 else V for p in params]
    top_p = np.ones(n, dtype=np.float32)
    top_p[: len(rows)] = [p.top_p for p in params]
    min_p = np.zeros(n, dtype=np.float32)
    min_p[: len(rows)] = [p.min_p for p in params]
    uniform = np.zeros(n, dtype=np.float64)
    for i, s in enumerate(rows):
        p = s.seq.params
        if p.seed is not None:
            key = [p.seed & 0xFFFFFFFFFFFFFFFF, s.seq.index, s.seq.num_output_tokens + offsets[i]]
            uniform[i] = np.random.default_rng(key).random()
        else:
            uniform[i] = rng.random()
    penalties = None
    if any(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
    ):
        counts = np.zeros((n, V), dtype=np.float32)
        seen = np.zeros((n, V), dtype=bool)
        for i, s in enumerate(rows):
            out = np.asarray(s.seq.output_token_ids + drafts[i], dtype=np.int64)
            counts[i] = np.bincount(out, minlength=V)[:V]
            seen[i, s.seq.token_ids + drafts[i]] = True

        def column(field: str, fill: float):
            values = np.full(n, fill, dtype=np.float32)
            values[: len(rows)] = [getattr(p, field) for p in params]
            return b.step_input(values)

        penalties = (
            b.step_input(counts),
            b.step_input(seen),
            column("presence_penalty", 0.0),
            column("frequency_penalty", 0.0),
            column("repetition_penalty", 1.0),
        )
    banned = None
    # min_tokens bans the stop tokens, except under a grammar (it decides where output ends)
    short = [s.seq.num_output_tokens + j < s.seq.params.min_tokens and s.seq.matcher is None
             for s, j in zip(rows, offsets)]  # fmt: skip
    if any(short):
        mask = np.zeros((n, V), dtype=bool)
        for i, s in enumerate(rows):
            p = s.seq.params
            if short[i]:
                mask[i, p.stop_token_ids + ([] if p.ignore_eos else eos_token_ids)] = True
        banned = b.step_input(mask)
    bias = None
    if any(p.logit_bias for p in params):
        dense = np.zeros((n, V), dtype=np.float32)
        for i, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                dense[i, token] = value
        bias = b.step_input(dense)
    allowed = None
    if any(s.seq.matcher is not None for s in rows):  # structured outputs: packed masks
        # a chunk's matcher fills its first row, and a row after each of its proposals
        work = [
            (s.seq.matcher, i, s.token_ids[len(s.token_ids) - s.num_draft :])
            for i, (s, j) in enumerate(zip(rows, offsets))
            if s.seq.matcher is not None and j == 0
        ]
        packed = fill_bitmask(work, n, V)  # [n, ceil(V/32)] int32
        allowed = (b.step_input(packed), *token_bits)
    return SamplingTensors(
        b.step_input(temp),
        b.index(top_k),
        b.step_input(top_p),
        b.step_input(min_p),
        b.step_input(uniform.astype(np.float32)),
        all_greedy=bool(np.all(temp == 0)),
        needs_sort=bool(np.any((top_k < V) | (top_p < 1.0))),
        needs_min_p=bool(np.any(min_p > 0)),
        penalties=penalties,
        banned=banned,
        bias=bias,
        allowed=allowed,
    )
