"""Backends: which array namespace, device and dtype; and the few things the standard lacks."""

from __future__ import annotations

import importlib

from ..errors import BackendError
from .base import Backend

# name -> (module in this package, the library it needs, the pip extra that installs it)
BACKENDS = {
    "numpy": ("numpy_backend", "numpy", None),
    "array_api_strict": ("strict_backend", "array_api_strict", "strict"),
    "jax": ("jax_backend", "jax", "jax"),
    "torch": ("torch_backend", "torch", "torch"),
    "cupy": ("cupy_backend", "cupy", "cupy"),
}
ALIASES = {"strict": "array_api_strict", "array-api-strict": "array_api_strict", "np": "numpy"}


def get_backend(
    name: str = "numpy",
    device: str | None = None,
    dtype: str = "float32",
    tensor_parallel_size: int = 1,
) -> Backend:
    key = ALIASES.get(name, name)
    if key not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    if (
        not isinstance(tensor_parallel_size, int)
        or isinstance(tensor_parallel_size, bool)
        or tensor_parallel_size < 1
    ):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size!r} must be a positive integer; "
            "pass 1 (one device) or the number of devices to split the model across"
        )
    if tensor_parallel_size > 1 and key != "jax":
        raise BackendError(
            f"tensor_parallel_size={tensor_parallel_size} needs the jax backend, which "
            f"splits the model with jax.sharding; backend {key!r} runs on one device: pass "
            "backend='jax' (--backend jax), or tensor_parallel_size=1"
        )
    module, library, extra = BACKENDS[key]
    try:
        importlib.import_module(library)
    except ImportError as exc:
        raise BackendError(
            f"backend {key!r} needs the {library!r} package, which is not "
            f"installed ({exc}); install it with: pip install 'nanovllm[{extra}]'"
        ) from exc
    mod = importlib.import_module(f"{__name__}.{module}")
    if tensor_parallel_size > 1:
        return mod.make(device, str(dtype), tensor_parallel_size)
    return mod.make(device, str(dtype))


__all__ = ["Backend", "BackendError", "BACKENDS", "get_backend"]
