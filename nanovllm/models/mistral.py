"""Mistral: Llama with a sliding attention window (the runner masks keys older than it)."""

from __future__ import annotations

from .llama import LlamaForCausalLM
from .sliding import sliding_window


class MistralForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        super().__init__(hf_config, backend, max_positions)
        self.sliding_window = sliding_window(hf_config, self.cfg.num_layers)
