"""Qwen2 (Llama with biases on q/k/v, none on o) and Qwen3 (per-head RMSNorm on q and k)."""

from __future__ import annotations

from .base import Weight
from .llama import LlamaForCausalLM
from .sliding import layer_windows


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        super().__init__(hf_config, backend, max_positions)
        self.cfg.attention_bias = self.qkv_bias(hf_config)
        self.layer_windows = layer_windows(hf_config, self.cfg.num_layers, "use_sliding_window")

    @staticmethod
    def qkv_bias(hf_config: dict) -> bool:
        return True

    def weight_table(self) -> tuple[dict, set[str]]:
        table, ignored = super().weight_table()
        for layer in table["layers"]:
            layer["o_b"] = None  # Qwen2: biases on q, k and v only
        return table, ignored


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @staticmethod
    def qkv_bias(hf_config: dict) -> bool:
        return bool(hf_config.get("attention_bias", False))

    def weight_table(self) -> tuple[dict, set[str]]:
        # Qwen3's o_proj has a bias exactly when q/k/v do (Llama's rule)
        table, ignored = LlamaForCausalLM.weight_table(self)
        d = self.cfg.head_dim
        for i, layer in enumerate(table["layers"]):
            a = f"model.layers.{i}.self_attn."
            layer["qk_norm"] = Weight(
                (a + "q_norm.weight", a + "k_norm.weight"), ((d,), (d,)), prepare=self._qk_norm
            )
        return table, ignored

    def _qk_norm(self, qk):
        """[q_norm | k_norm] -> one weight for Llama's fused [q heads | k heads] view:
        [heads + kv_heads, head_dim]."""
        xp, c, d = self.xp, self.cfg, self.cfg.head_dim
        return xp.concat(
            [
                xp.broadcast_to(qk[:d], (c.num_heads, d)),
                xp.broadcast_to(qk[d:], (c.num_kv_heads, d)),
            ]
        )
