"""Mamba2 mixer (Granite 4.0-H) with per-sequence conv and SSM state in slot pools.

A layer's cache is `(conv_pool [slots, d_conv - 1, conv_dim], ssm_pool [slots, heads, head_dim,
d_state])`; each running sequence owns one slot (`seq.state_slot`), and one extra scratch slot
that no sequence owns absorbs the writes of padding rows. A step's tokens are laid out as for
attention (decode tokens first, then prefill chunks back to back); each group is processed as
[S sequences, Q steps], prefill through the padded `prefill_query_index` layout. Steps past a
sequence's length get dt = 0, which leaves its state unchanged.

The scan is the chunked SSD form (Mamba2 paper, as transformers' torch fallback): within a chunk
of `chunk_size` steps the outputs are a masked quadratic form, and the state is carried from
chunk to chunk (and from step to step: a decode is the one-step case of the same form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .activation import silu
from .linear import linear


@dataclass(slots=True)
class StateMetadata:
    """Where each sequence of a step keeps its recurrent state.

    decode_* have one entry per decode row (padding rows: the scratch slot); prefill_* one per
    sequence of the padded prefill part (padding sequences: the scratch slot, length 0).
    The state is read from `read_slots` (a sequence's own slot, or the snapshot a resumed
    prefix starts from) and written to `slots`. `reset` is True where a sequence starts at
    position 0, so the old state read is ignored. Where a step saves snapshots (a hybrid
    model's prefix cache), the state after `snapshot_lens` tokens of each chunk (a decode's:
    after it) is also written to `snapshot_slots` (the scratch slot where none is saved).
    """

    static_fields: ClassVar[tuple[str, ...]] = ("num_decode", "prefill_seqs", "prefill_steps")
    num_decode: int = 0  # rows of decode tokens (padding included) before the prefill rows
    decode_slots: Any = None  # [num_decode] int
    decode_read_slots: Any = None  # [num_decode] int
    decode_reset: Any = None  # [num_decode] bool
    decode_snapshot_slots: Any = None  # [num_decode] int, or None: no snapshot this step
    prefill_slots: Any = None  # [S] int
    prefill_read_slots: Any = None  # [S] int
    prefill_reset: Any = None  # [S] bool
    prefill_lens: Any = None  # [S] int: tokens of each sequence in this chunk
    prefill_snapshot_lens: Any = None  # [S] int, or None: no snapshot this step
    prefill_snapshot_slots: Any = None  # [S] int
    prefill_seqs: int = 0  # S
    prefill_steps: int = 0  # Q
    prefill_query_index: Any = None  # [S*Q] prefill rows forming the padded [S, Q] view
    prefill_output_index: Any = None  # [num_prefill_rows] rows of that view to keep


@dataclass(slots=True)
class Mamba2Spec:
    intermediate: int  # I = heads * head_dim
    heads: int
    head_dim: int
    groups: int
    d_state: int
    d_conv: int
    chunk_size: int
    eps: float
    dt_min: float = 0.0
    dt_max: float = float("inf")

    @property
    def conv_dim(self) -> int:
        return self.intermediate + 2 * self.groups * self.d_state


def softplus(xp, x):
    return xp.logaddexp(xp.zeros_like(x), x)


def gated_rms_norm(xp, y, gate, weight, groups: int, eps: float):
    """transformers' RMSNormGated (norm_before_gate=False): norm(y * silu(gate)) per group."""
    y = y * silu(xp, gate)  # [T, n]
    T, n = y.shape
    g = xp.reshape(y, (T, groups, n // groups))  # [T, groups, n / groups]
    g = g * (1.0 / xp.sqrt(xp.mean(g * g, axis=-1, keepdims=True) + eps))
    return xp.reshape(g, (T, n)) * weight  # [T, n]


def _conv_state_at(xp, seq, lens, K: int, device):
    """The conv state after `lens` [S] steps: the K-1 inputs before each, from seq [S, K-1+Q, C]
    (the old state, then the chunk's inputs)."""
    S, n, C = seq.shape
    rows = (
        xp.arange(S, dtype=lens.dtype, device=device)[:, None] * n
        + lens[:, None]
        + xp.arange(K - 1, dtype=lens.dtype, device=device)[None, :]
    )  # [S, K-1]
    flat = xp.reshape(seq, (S * n, C))
    return xp.reshape(xp.take(flat, xp.reshape(rows, (-1,)), axis=0), (S, K - 1, C))


def _conv(xp, state, x, weight, bias, lens, device, snapshot_lens=None):
    """Causal depthwise conv + SiLU. state [S, K-1, C], x [S, Q, C], weight [K, C].

    Returns the outputs [S, Q, C], the new state (the last K-1 inputs up to each length) and,
    with `snapshot_lens`, the state after that many steps (else None).
    """
    S, Q, C = x.shape
    K = weight.shape[0]
    seq = xp.concat([state, x], axis=1)  # [S, K-1+Q, C]
    out = seq[:, 0:Q, :] * weight[0, :]  # [S, Q, C]
    for k in range(1, K):
        out = out + seq[:, k : k + Q, :] * weight[k, :]
    if bias is not None:
        out = out + bias
    new_state = seq[:, Q:, :] if lens is None else _conv_state_at(xp, seq, lens, K, device)
    snapshot = None if snapshot_lens is None else _conv_state_at(xp, seq, snapshot_lens, K, device)
    return silu(xp, out), new_state, snapshot


def _by_head(xp, t, heads: int):
    """[S, c, groups, n] -> [S, heads, c, n]: each group shared by heads // groups heads."""
    S, c, G, n = t.shape
    t = xp.broadcast_to(t[:, :, :, None, :], (S, c, G, heads // G, n))
    return xp.permute_dims(xp.reshape(t, (S, c, heads, n)), (0, 2, 1, 3))


def _ssd_chunk(xp, h, x, dt, A, B, C, device):
    """One chunk of the SSD scan. h [S,H,P,N]; x [S,H,c,P]; dt [S,H,c]; B, C [S,H,c,N].

    y_t = C_t . (exp(sum a_1..t) h + sum_{s<=t} exp(sum a_{s+1..t}) dt_s B_s x_s),
    a = dt * A. Returns y [S,H,c,P] (without the D skip) and the state after the chunk.
    """
    c = x.shape[2]
    a = dt * A[:, None]  # [S,H,c], <= 0
    acum = xp.cumulative_sum(a, axis=-1)  # [S,H,c]
    t_idx = xp.arange(c, device=device)
    below = t_idx[:, None] > t_idx[None, :]  # [c,c]
    causal = t_idx[:, None] >= t_idx[None, :]  # [c,c]
    rep = xp.where(below, xp.broadcast_to(a[..., :, None], a.shape + (c,)), 0.0)  # [S,H,c,c]
    seg = xp.cumulative_sum(rep, axis=-2)  # seg[t, s] = sum a_{s+1..t} for s <= t
    decay = xp.exp(xp.where(causal, seg, -xp.inf))  # [S,H,c,c]
    xdt = x * dt[..., None]  # [S,H,c,P]
    scores = (C @ xp.matrix_transpose(B)) * decay  # [S,H,c,c]
    y = scores @ xdt + (C @ xp.matrix_transpose(h)) * xp.exp(acum)[..., None]  # [S,H,c,P]
    last = acum[..., c - 1 : c]  # [S,H,1]
    to_end = xp.exp(last - acum)  # [S,H,c]
    h = h * xp.exp(last)[..., None] + xp.matrix_transpose(xdt * to_end[..., None]) @ B  # [S,H,P,N]
    return y, h


def _ssm_state_at(xp, h, x, dt, A, B, steps, device):
    """The SSM state after `steps` [S] steps of the chunk, from the state h [S,H,P,N] before
    it: the state update of _ssd_chunk over the whole chunk with dt = 0 from each sequence's
    `steps` on. x [S,H,Q,P]; dt [S,H,Q]; B [S,H,Q,N]."""
    Q = x.shape[2]
    before = xp.arange(Q, dtype=steps.dtype, device=device)[None, :] < steps[:, None]  # [S,Q]
    dt = xp.where(before[:, None, :], dt, 0.0)  # [S,H,Q]
    acum = xp.cumulative_sum(dt * A[:, None], axis=-1)  # [S,H,Q]
    last = acum[..., Q - 1 : Q]  # [S,H,1]
    weights = xp.exp(last - acum) * dt  # [S,H,Q]
    return h * xp.exp(last)[..., None] + xp.matrix_transpose(x * weights[..., None]) @ B


def _mix(xp, layer: dict, spec: Mamba2Spec, conv_state, h, xbc, dt, lens, device, snap=None):
    """xbc [S,Q,conv_dim], dt [S,Q,H] raw -> y [S,Q,I], new conv state, new ssm state, and
    with `snap` [S] the (conv, ssm) state after that many steps of each sequence (else None).

    S sequences of Q steps; H heads of P = head_dim, N = d_state, G groups, I = H * P.
    """
    S, Q = xbc.shape[0], xbc.shape[1]
    H, P, N, G, I = spec.heads, spec.head_dim, spec.d_state, spec.groups, spec.intermediate
    h_before = h
    xbc, conv_state, conv_snap = _conv(
        xp, conv_state, xbc, layer["conv_w"], layer["conv_b"], lens, device, snap
    )  # [S,Q,conv_dim]
    dt = softplus(xp, dt + layer["dt_bias"])  # [S,Q,H]
    if spec.dt_min > 0.0 or spec.dt_max < float("inf"):
        dt = xp.clip(dt, spec.dt_min, spec.dt_max)
    if lens is not None:  # steps past a sequence's chunk leave its state unchanged
        valid = xp.arange(Q, dtype=lens.dtype, device=device)[None, :] < lens[:, None]  # [S,Q]
        dt = xp.where(valid[:, :, None], dt, 0.0)
    x = xp.permute_dims(xp.reshape(xbc[:, :, :I], (S, Q, H, P)), (0, 2, 1, 3))  # [S,H,Q,P]
    B = _by_head(xp, xp.reshape(xbc[:, :, I : I + G * N], (S, Q, G, N)), H)  # [S,H,Q,N]
    C = _by_head(xp, xp.reshape(xbc[:, :, I + G * N :], (S, Q, G, N)), H)  # [S,H,Q,N]
    dt = xp.permute_dims(dt, (0, 2, 1))  # [S,H,Q]
    ys = []
    for lo in range(0, Q, spec.chunk_size):
        hi = min(lo + spec.chunk_size, Q)
        y, h = _ssd_chunk(
            xp,
            h,
            x[:, :, lo:hi, :],
            dt[:, :, lo:hi],
            layer["A"],
            B[:, :, lo:hi, :],
            C[:, :, lo:hi, :],
            device,
        )  # y [S,H,hi-lo,P]
        ys.append(y)
    y = ys[0] if len(ys) == 1 else xp.concat(ys, axis=2)  # [S,H,Q,P]
    y = y + x * xp.reshape(layer["D"], (1, H, 1, 1))  # the D skip
    y = xp.reshape(xp.permute_dims(y, (0, 2, 1, 3)), (S, Q, I))  # [S,Q,I]
    snapshot = None
    if snap is not None:
        snapshot = (conv_snap, _ssm_state_at(xp, h_before, x, dt, layer["A"], B, snap, device))
    return y, conv_state, h, snapshot


def _gather_state(xp, conv_pool, ssm_pool, slots, reset):
    """The state of each slot in `slots` [S], zeros where `reset` [S]: conv [S, d_conv - 1,
    conv_dim] and ssm [S, heads, head_dim, d_state]."""
    conv = xp.take(conv_pool, slots, axis=0)
    h = xp.take(ssm_pool, slots, axis=0)
    conv = xp.where(reset[:, None, None], 0.0, conv)
    h = xp.where(reset[:, None, None, None], 0.0, h)
    return conv, h


def mamba2_mixer(backend, layer: dict, spec: Mamba2Spec, x, cache, meta):
    """x [T, hidden] (normed) -> [T, hidden], and the layer's updated (conv_pool, ssm_pool).

    T tokens (the decode rows, then the prefill rows); I = spec.intermediate, H = spec.heads,
    conv_dim = I + 2 * groups * d_state (x | B | C); prefill runs as S sequences of Q steps.
    """
    xp = backend.xp
    conv_pool, ssm_pool = cache
    state: StateMetadata = meta.state
    I, conv_dim = spec.intermediate, spec.conv_dim
    proj = linear(x, layer["in_proj"], layer["in_proj_b"])  # [T, I + conv_dim + H]
    gate = proj[:, :I]  # [T, I]
    xbc = proj[:, I : I + conv_dim]  # [T, conv_dim]
    dt = proj[:, I + conv_dim :]  # [T, H]
    num_decode = state.num_decode
    ys = []
    if state.decode_slots is not None:  # a decode row is one step of its sequence
        conv, h = _gather_state(
            xp, conv_pool, ssm_pool, state.decode_read_slots, state.decode_reset
        )
        y, conv, h, _ = _mix(
            xp,
            layer,
            spec,
            conv,
            h,
            xbc[:num_decode, None, :],
            dt[:num_decode, None, :],
            None,
            backend.device,
        )  # [num_decode, 1, I]
        conv_pool = backend.scatter_rows(conv_pool, state.decode_slots, conv)
        ssm_pool = backend.scatter_rows(ssm_pool, state.decode_slots, h)
        if state.decode_snapshot_slots is not None:
            conv_pool = backend.scatter_rows(conv_pool, state.decode_snapshot_slots, conv)
            ssm_pool = backend.scatter_rows(ssm_pool, state.decode_snapshot_slots, h)
        ys.append(y[:, 0, :])  # [num_decode, I]
    if state.prefill_slots is not None:
        S, Q = state.prefill_seqs, state.prefill_steps
        conv, h = _gather_state(
            xp, conv_pool, ssm_pool, state.prefill_read_slots, state.prefill_reset
        )
        rows = state.prefill_query_index  # [S*Q]
        prefill_xbc = xp.reshape(
            xp.take(xbc[num_decode:, ...], rows, axis=0), (S, Q, conv_dim)
        )  # [S, Q, conv_dim]
        prefill_dt = xp.reshape(
            xp.take(dt[num_decode:, ...], rows, axis=0), (S, Q, spec.heads)
        )  # [S, Q, H]
        y, conv, h, snapshot = _mix(
            xp, layer, spec, conv, h, prefill_xbc, prefill_dt, state.prefill_lens,
            backend.device, state.prefill_snapshot_lens,
        )  # [S, Q, I]  # fmt: skip
        conv_pool = backend.scatter_rows(conv_pool, state.prefill_slots, conv)
        ssm_pool = backend.scatter_rows(ssm_pool, state.prefill_slots, h)
        if snapshot is not None:
            conv_pool = backend.scatter_rows(conv_pool, state.prefill_snapshot_slots, snapshot[0])
            ssm_pool = backend.scatter_rows(ssm_pool, state.prefill_snapshot_slots, snapshot[1])
        ys.append(
            xp.take(xp.reshape(y, (S * Q, I)), state.prefill_output_index, axis=0)
        )  # [num_prefill_rows, I]
    y = ys[0] if len(ys) == 1 else xp.concat(ys, axis=0)  # [T, I]
    y = gated_rms_norm(xp, y, gate, layer["norm"], spec.groups, spec.eps)  # [T, I]
    return linear(y, layer["out_proj"], layer["out_proj_b"]), (conv_pool, ssm_pool)  # [T, hidden]
