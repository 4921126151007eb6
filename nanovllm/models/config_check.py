"""The size fields of a model's config, checked before anything is built from them.

A config comes from a model file: untrusted input. Every size field any of our architectures
reads is checked for type and range here, naming the field, its value and the limit, so that
`"num_hidden_layers": 1000000000` or `"num_attention_heads": 0` fail at once rather than as
an out-of-memory or a ZeroDivisionError deep inside a model.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# field -> (smallest, largest) allowed when present and not null; generous for real models
# (Llama 3.1 405B, Gemma 3's 262144 vocab, 10M-token contexts)
SIZE_FIELDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 17),
    "n_embd": (1, 1 << 17),
    "n_embed": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "n_inner": (1, 1 << 20),
    "shared_intermediate_size": (0, 1 << 20),
    "num_hidden_layers": (1, 1 << 12),
    "n_layer": (1, 1 << 12),
    "num_attention_heads": (1, 1 << 12),
    "n_head": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12),
    "num_kv_heads": (1, 1 << 12),
    "n_head_kv": (1, 1 << 12),
    "head_dim": (1, 1 << 12),
    "max_position_embeddings": (1, 1 << 31),
    "n_positions": (1, 1 << 31),
    "sliding_window": (1, 1 << 31),
    "num_local_experts": (0, 1 << 12),
    "num_experts_per_tok": (0, 1 << 12),  # 0: dense
    "mamba_n_heads": (1, 1 << 12),
    "mamba_d_head": (1, 1 << 12),
    "mamba_n_groups": (1, 1 << 12),
    "mamba_d_state": (1, 1 << 12),
    "mamba_d_conv": (1, 64),
    "mamba_expand": (1, 64),
    "mamba_chunk_size": (1, 1 << 16),
}
LAYER_FIELDS = ("num_hidden_layers", "n_layer")


def check_config(config: dict[str, Any], num_tensors: int, source: str) -> None:
    """Type and range of every size field; heads that divide; no more layers than the
    checkpoint has tensors (each layer has at least one)."""
    for name, (low, high) in SIZE_FIELDS.items():
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(
                f"{source}: {name}={value!r} is a {type(value).__name__}; it must "
                f"be an integer in [{low}, {high}]"
            )
        if not low <= value <= high:
            raise ConfigError(
                f"{source}: {name}={value} is out of range; it must be an integer "
                f"in [{low}, {high}]"
            )
    for name in LAYER_FIELDS:
        layers = config.get(name)
        if layers is not None and layers > num_tensors:
            raise ConfigError(
                f"{source}: {name}={layers}, but the checkpoint holds only "
                f"{num_tensors} tensors, so at most {num_tensors} layers; the "
                "config does not match the weights"
            )
    hidden = _first(config, "hidden_size", "n_embd", "n_embed")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = _first(config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise ConfigError(
            f"{source}: hidden_size={hidden} is not a multiple of "
            f"num_attention_heads={heads}, and no head_dim is given"
        )
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads={heads} is not a multiple of the "
            f"{kv_heads} key/value heads, so the heads cannot be grouped"
        )
    experts, top = config.get("num_local_experts"), config.get("num_experts_per_tok")
    if experts and top and top > experts:
        raise ConfigError(
            f"{source}: num_experts_per_tok={top} exceeds num_local_experts={experts}"
        )


def _first(config: dict, *names: str) -> int | None:
    return next((config[n] for n in names if config.get(n) is not None), None)
