"""Which layers of a Hugging Face config attend through a sliding window, as one number."""

from __future__ import annotations

from ..errors import UnsupportedFeatureError


def sliding_window(c: dict, num_layers: int, gate: str | None = None) -> int | None:
    """The window every layer uses, or None when no layer slides.

    `layer_types` (transformers 5) names each layer; older configs set `sliding_window` and, for
    Qwen, turn it on with `use_sliding_window` (the `gate`) for layers >= `max_window_layers`.
    The runner masks one window for the whole model, so a mix of windowed and full layers fails.
    """
    window = c.get("sliding_window")
    types = c.get("layer_types")
    if types is None:
        if not window or (gate is not None and not c.get(gate, False)):
            return None
        first = c.get("max_window_layers", 0) if gate is not None else 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    sliding = [t == "sliding_attention" for t in types]
    if not any(sliding):
        return None
    if not window:
        raise UnsupportedFeatureError(
            "layer_types has sliding_attention layers but "
            f"sliding_window={window!r}; the config is inconsistent"
        )
    if not all(sliding):
        raise UnsupportedFeatureError(
            f"sliding_window={window} on {sum(sliding)} of {len(sliding)} layers (layer_types / "
            "max_window_layers) is not supported; nanovllm applies one window to every layer"
        )
    return int(window)
