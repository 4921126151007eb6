"""Rotary embedding: each head's halves x1, x2 become (x1 cos - x2 sin, x2 cos + x1 sin), as
transformers' rotate_half computes them, on every backend; with a rotary dim below the head's
the features past it pass through."""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm.backend import get_backend
from nanovllm.layers.rotary import RopeSpec, RotaryEmbedding


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dim", [16, 8], ids=["whole", "partial"])
def test_rotary_turns_each_heads_halves_by_its_positions_angles(backend, rows, dim):
    b = get_backend(backend)
    heads, head_dim, theta = 3, 16, 10000.0
    rng = np.random.default_rng(rows + dim)
    x = rng.standard_normal((rows, heads, head_dim)).astype(np.float32)
    positions = rng.integers(0, 64, rows)
    rotary = RotaryEmbedding(b.xp, RopeSpec(dim=dim, theta=theta), 64, b.dtype, b.device)
    with b.inference():
        got = b.to_host(rotary.apply(b.asarray(x), *rotary.tables(b.index(positions))))

    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)  # [dim/2]
    angle = positions[:, None, None] * inv_freq  # [rows, 1, dim/2]
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2, rest = x[..., : dim // 2], x[..., dim // 2 : dim], x[..., dim:]
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
