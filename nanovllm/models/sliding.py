"""Which layers of a Hugging Face config attend through a sliding window, and how wide."""

from __future__ import annotations

from ..errors import UnsupportedFeatureError


def layer_windows(c: dict, num_layers: int, gate: str | None = None) -> tuple[int | None, ...]:
    """Per layer, the window its queries' keys are cut to, or None for full attention.

    `layer_types` (transformers 5) names each layer; older configs set `sliding_window` and, for
    Qwen, turn it on with `use_sliding_window` (the `gate`) for layers >= `max_window_layers`.
    """
    window = c.get("sliding_window")
    types = c.get("layer_types")
    if types is None:
        if not window or (gate is not None and not c.get(gate, False)):
            return (None,) * num_layers
        first = c.get("max_window_layers", 0) if gate is not None else 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise UnsupportedFeatureError(
            f"layer_types has {len(types)} entries for num_hidden_layers={num_layers}; "
            "the config is inconsistent"
        )
    unknown = sorted({t for t in types} - {"sliding_attention", "full_attention"})
    if unknown:
        raise UnsupportedFeatureError(
            f"layer_types {unknown[0]!r} is not supported; supported: 'full_attention', "
            "'sliding_attention'"
        )
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not window:
        raise UnsupportedFeatureError(
            "layer_types has sliding_attention layers but "
            f"sliding_window={window!r}; the config is inconsistent"
        )
    return tuple(int(window) if s and window else None for s in sliding)
