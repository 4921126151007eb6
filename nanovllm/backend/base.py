"""What every backend offers: the namespace, device and dtype, plus what the standard lacks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layers import activation, norm


@dataclass(eq=False)
class Backend:
    """An eager backend; a jitting one (jax) overrides `jits`, `bucket`, `jit` and
    `compilations`. The runner and the models ask these, and never probe for attributes."""

    name: str
    xp: Any
    device: Any = None
    dtype: Any = None  # the compute dtype (xp.float32 unless asked otherwise)
    int_dtype: Any = None  # index dtype for token ids, positions and slots

    jits = False  # the step is compiled per distinct input shape

    def fused_attention(self) -> Callable | None:
        """An eager backend's kernel for whole attention items, `fused(q [S, H, Q, D],
        k, v [S, KV, K, D], bias [S, 1, Q, K], scale) -> [S, H, Q, D]`: softmax(q k^T * scale +
        bias) v, each group of H // KV query heads reading one K/V head. None: the attention is
        written out against the array API (layers/attention.py)."""
        return None

    # whether fused_attention's kernel also takes a lone decode query whose keys are runs of
    # pool slots; if not, that query is written out (layers/attention._attend_one_query)
    fused_attention_lone_query = True

    # The models' norms and SiLU go through these: written against the array API (layers/) by
    # default; a backend may take its own way instead (torch: its library's kernels, one call
    # where the written-out form is several, each with its cost per call)
    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        """x [..., n] over its root mean square along the last axis, times weight ([n], or
        broadcast to x's shape)."""
        return norm.rms_norm(self.xp, x, weight, eps)

    def layer_norm(self, x: Any, weight: Any, bias: Any, eps: float) -> Any:
        """x [..., n] less its mean over its standard deviation, times weight, plus bias."""
        return norm.layer_norm(self.xp, x, weight, bias, eps)

    def silu(self, x: Any) -> Any:
        return activation.silu(self.xp, x)

    def bucket(self, n: int) -> int:
        """A size (rows, items) as this backend wants it: a jitting backend rounds sizes up to
        few values so that it compiles few times; an eager one takes them as they are."""
        return n

    def compilations(self) -> int | None:
        """How many times jitted functions were compiled so far; None where nothing is."""
        return None

    @property
    def itemsize(self) -> int:
        """Bytes per element of the compute dtype (what the KV cache is sized by)."""
        return self.xp.finfo(self.dtype).bits // 8

    def asarray(self, host: Any, dtype: Any = None) -> Any:
        """Host (numpy or Python) data -> an array on this backend's device."""
        return self.xp.asarray(host, dtype=dtype, device=self.device)

    def weight(self, host: np.ndarray) -> Any:
        """A float weight from the host, cast to the compute dtype."""
        return self.asarray(np.ascontiguousarray(host), dtype=self.dtype)

    def joined_weight(self, parts: list[np.ndarray]) -> Any:
        """One weight made of host arrays joined along axis 0 (fused q|k|v, gate|up)."""
        return self.weight(join_rows(parts))

    def linear_weight(self, w: Any) -> Any:
        """A linear layer's weight, laid out [in, out], as this backend multiplies by it
        (numpy: in the layout its one-row products stream fastest, with products of a few rows
        by cache-sized panels)."""
        return w

    def shard(self, w: Any, axis: int | None) -> Any:
        """A weight placed for tensor parallelism, cut along `axis` across the devices where
        the backend runs on several (None: each device holds it whole); else as it is."""
        return w

    def step_input(self, host: np.ndarray, dtype: Any = None) -> Any:
        """Per-step host data (indices, masks, sampling parameters) as the step takes it."""
        return self.asarray(host, dtype=dtype)

    def index(self, host: Any) -> Any:
        """Per-step indices (token ids, positions, slots) in the index dtype."""
        return self.step_input(np.asarray(host), dtype=self.int_dtype)

    def to_host(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def scatter_rows(self, pool: Any, slots: Any, rows: Any, axis: int = 0) -> Any:
        """pool[slots] = rows along `axis` (rows has the pool's shape, but len(slots) along
        it); in place where the library allows. Returns the pool."""
        pool[(slice(None),) * axis + (slots,)] = rows
        return pool

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.xp.zeros(shape, dtype=dtype or self.dtype, device=self.device)

    def kv_pool(self, shape: tuple[int, int, int]) -> Any:
        """A zeroed K or V pool [kv_heads, slots, head_dim] (cut by KV head across the devices
        where the backend runs on several)."""
        return self.zeros(shape)

    def register_step_dataclass(self, cls: type) -> None:
        """Tell a jitting backend about a dataclass the step takes (see its `static_fields`)."""

    def jit(self, fn: Callable, **kwargs: Any) -> Callable:
        return fn

    def inference(self) -> contextlib.AbstractContextManager:
        """A context the model runs under (no autograd for torch)."""
        return contextlib.nullcontext()

    @property
    def on_host(self) -> bool:
        """Arrays live in the machine's own memory (a CPU device), not on an accelerator."""
        return "cpu" in str(self.device).lower()

    def describe(self) -> str:
        dtype = getattr(self.dtype, "__name__", self.dtype)
        return f"{self.name} (device={self.device}, dtype={dtype})"


def join_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Host arrays joined along axis 0: a view where they lie back to back in the memory of
    one mapped file (converted weights, written in the order the table reads them), else a
    copy."""
    if len(parts) == 1:
        return parts[0]
    first, root = parts[0], _root(parts[0])
    if (
        root.base is not None
        and root.flags.c_contiguous
        and all(_root(p) is root and p.flags.c_contiguous for p in parts)
        and all(p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in parts)
        and all(a.ctypes.data + a.nbytes == b.ctypes.data for a, b in zip(parts, parts[1:]))
    ):
        start = first.ctypes.data - root.ctypes.data
        span = root.reshape(-1).view(np.uint8)[start : start + sum(p.nbytes for p in parts)]
        return span.view(first.dtype).reshape(-1, *first.shape[1:])
    return np.concatenate(parts, axis=0)


def _root(a: np.ndarray) -> np.ndarray:
    """The array a view's memory was first given to (its base, if any, is not an array: the
    mapped file)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a
