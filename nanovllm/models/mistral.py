"""Mistral: Llama with a sliding attention window (the runner masks keys older than it)."""

from __future__ import annotations

from .llama import LlamaForCausalLM
from .sliding import layer_windows


class MistralForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        super().__init__(hf_config, backend, max_positions)
        self.layer_windows = layer_windows(hf_config, self.cfg.num_layers)
