"""Qwen2 (Llama with biases on q/k/v, none on o) and Qwen3 (per-head RMSNorm on q and k)."""

from __future__ import annotations

from .llama import LlamaForCausalLM
from .sliding import sliding_window


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        super().__init__(hf_config, backend, max_positions)
        self.cfg.attention_bias = self.qkv_bias(hf_config)
        self.sliding_window = sliding_window(hf_config, self.cfg.num_layers, "use_sliding_window")

    @staticmethod
    def qkv_bias(hf_config: dict) -> bool:
        return True

    def expected_shapes(self):
        shapes, optional = super().expected_shapes()
        for i in range(self.cfg.num_layers):
            shapes.pop(f"model.layers.{i}.self_attn.o_proj.bias", None)
        return shapes, optional


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @staticmethod
    def qkv_bias(hf_config: dict) -> bool:
        return bool(hf_config.get("attention_bias", False))

    def expected_shapes(self):
        # Qwen3's o_proj has a bias exactly when q/k/v do (Llama's rule)
        shapes, optional = LlamaForCausalLM.expected_shapes(self)
        for i in range(self.cfg.num_layers):
            a = f"model.layers.{i}.self_attn."
            shapes[a + "q_norm.weight"] = shapes[a + "k_norm.weight"] = (self.cfg.head_dim,)
        return shapes, optional

    def load_weights(self, tensors: dict, source: str) -> None:
        super().load_weights(tensors, source)  # checks the norms' shapes, leaves them in tensors
        xp, c = self.xp, self.cfg
        for i, layer in enumerate(self.params["layers"]):
            a = f"model.layers.{i}.self_attn."
            q = self.backend.weight(tensors.pop(a + "q_norm.weight"))
            k = self.backend.weight(tensors.pop(a + "k_norm.weight"))
            # one weight for Llama's fused [q heads | k heads] view: [heads + kv_heads, head_dim]
            layer["qk_norm"] = xp.concat([xp.broadcast_to(q, (c.num_heads, c.head_dim)),
                                          xp.broadcast_to(k, (c.num_kv_heads, c.head_dim))])
