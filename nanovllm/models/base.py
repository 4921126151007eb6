"""What every model shares: the contract the runner and LLM rely on, config reading and the
check of a checkpoint's tensors."""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import UnsupportedFeatureError, WeightsError


class CausalLM(Protocol):
    """A causal language model as the runner and LLM use it, and nothing more.

    Every architecture subclasses this explicitly, which gives it the optional parts' defaults
    (the last block). Built from a Hugging Face config dict and a backend; `load_weights` then
    places the arrays that `forward` and `compute_logits` take as `params`.
    """

    cfg: Any  # the architecture's config dataclass; has `max_position_embeddings`
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    params: dict

    def expected_shapes(self) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """Every Hugging Face tensor name with its shape, and the names that may be absent."""
        ...

    def load_weights(self, tensors: dict, source: str) -> None:
        """Host tensors with Hugging Face names -> `self.params` on the backend."""
        ...

    def forward(self, params: dict, input_ids, positions, kv_caches: list, meta
                ) -> tuple[Any, list]:
        """Token ids [T] -> final hidden states [T, hidden], writing the step's K/V (and state)
        into the caches, which it returns."""
        ...

    def compute_logits(self, params: dict, hidden) -> Any:
        """Hidden states [N, hidden] -> logits [N, vocab_size]."""
        ...

    # ---- optional: the defaults below suit a model whose every layer is attention ----------
    sliding_window: int | None = None  # each query sees only its last this many keys
    needs_state_slots: bool = False  # per-sequence recurrent state (Mamba layers)

    @property
    def num_kv_layers(self) -> int:
        """The layers that keep K/V in the paged pool (what the KV cache is sized by)."""
        return self.num_layers

    def allocate_cache(self, backend, num_kv_slots: int, num_state_slots: int) -> list:
        """Per layer, a (K pool, V pool) pair of [num_kv_slots, kv_heads, head_dim]."""
        shape = (num_kv_slots, self.num_kv_heads, self.head_dim)
        return [(backend.zeros(shape), backend.zeros(shape)) for _ in range(self.num_layers)]


def require(config: dict, key: str, source: str = "config.json") -> Any:
    if key not in config:
        raise ValueError(f"{source} has no {key!r}, which this architecture needs")
    return config[key]


def check_tensors(expected: dict[str, tuple[int, ...]], optional: set[str],
                  tensors: dict[str, Any], source: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightsError(f"{source}: missing tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + "; the checkpoint does not match its config.json")
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]!r}"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                           + "; the checkpoint does not match its config.json architecture")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise WeightsError(f"{source}: tensor {name!r} has shape {got}, expected "
                               f"{tuple(shape)} from config.json")


__all__ = ["UnsupportedFeatureError", "check_tensors", "require"]
