"""JAX: the step runs under jax.jit, with the KV pool donated so K/V writes are in place.

Sizes are rounded up to powers of two (`bucket`), so a run compiles a bounded number of
times; `compilations()` counts them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BackendError
from ..layers.attention import AttentionMetadata, AttentionPart
from ..layers.mamba2 import StateMetadata
from ..layers.sampler import SamplingTensors
from .base import Backend

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
_registered = False


def _register_pytrees() -> None:
    global _registered
    if _registered:
        return
    jax.tree_util.register_dataclass(
        AttentionMetadata, data_fields=["slot_mapping", "parts", "state"], meta_fields=[])
    jax.tree_util.register_dataclass(
        AttentionPart, data_fields=["context_slots", "mask", "query_index", "combine_index"],
        meta_fields=["num_seqs", "query_len", "context_len", "first_row", "num_rows"])
    jax.tree_util.register_dataclass(  # recurrent-state slots (hybrid models)
        StateMetadata, data_fields=["decode_slots", "decode_reset", "prefill_slots",
                                    "prefill_reset", "prefill_lens", "prefill_query_index",
                                    "prefill_output_index"],
        meta_fields=["num_decode", "prefill_seqs", "prefill_steps"])
    jax.tree_util.register_dataclass(
        SamplingTensors,
        data_fields=["temperature", "top_k", "top_p", "min_p", "uniform", "penalties", "banned",
                     "bias"],
        meta_fields=["all_greedy", "needs_sort", "needs_min_p"])
    _registered = True


class JaxBackend(Backend):
    def asarray(self, host, dtype=None):
        return jax.device_put(jnp.asarray(host, dtype=dtype), self.device)

    def step_input(self, host, dtype=None):
        # left on the host: a jitted function moves its numpy arguments in one dispatch,
        # far cheaper than a device_put per array
        return np.asarray(host, dtype=None if dtype is None else np.dtype(dtype))

    def to_host(self, x):
        return np.asarray(jax.device_get(x))

    def scatter_rows(self, pool, slots, rows):
        return pool.at[slots].set(rows.astype(pool.dtype))

    def jit(self, fn, donate_argnums=(), **kwargs):
        jitted = jax.jit(fn, donate_argnums=donate_argnums, **kwargs)
        self.extra.setdefault("jitted", []).append(jitted)
        return jitted

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()

    def compilations(self) -> int:
        return sum(f._cache_size() for f in self.extra.get("jitted", []))


def make(device: str | None, dtype: str) -> Backend:
    if dtype not in DTYPES:
        raise BackendError(f"dtype={dtype!r} is not supported by the jax backend; choose one "
                           f"of {', '.join(DTYPES)}")
    platform = {"gpu": "gpu", "cuda": "gpu"}.get((device or "").split(":")[0], device)
    try:
        devices = jax.devices(platform) if platform else jax.devices()
    except RuntimeError as exc:
        raise BackendError(f"device={device!r}: jax has no such device here ({exc}); pass "
                           "device='cpu', or install jax[cuda] on a GPU machine") from exc
    index = int(device.split(":")[1]) if device and ":" in device else 0
    _register_pytrees()
    return JaxBackend("jax", jnp, devices[index], DTYPES[dtype], jnp.int32)
