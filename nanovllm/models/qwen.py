"""Qwen2 (Llama with biases on q/k/v, none on o) and Qwen3 (per-head RMSNorm on q and k)."""

from __future__ import annotations

from ..layers.activation import silu
from ..layers.attention import paged_attention, write_kv
from ..layers.linear import embedding, linear
from ..layers.norm import rms_norm
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
        for i, layer in enumerate(self.params["layers"]):
            a = f"model.layers.{i}.self_attn."
            layer["q_norm"] = self.backend.weight(tensors.pop(a + "q_norm.weight"))
            layer["k_norm"] = self.backend.weight(tensors.pop(a + "k_norm.weight"))

    def forward(self, params: dict, input_ids, positions, kv_caches: list, meta):
        """Llama's forward with RMSNorm over each head of q and k before RoPE."""
        xp, c, P = self.xp, self.cfg, params
        T = input_ids.shape[0]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos, sin = self.rotary.tables(positions)
        kv_caches = list(kv_caches)
        h = embedding(xp, P["embed"], input_ids)
        for i, L in enumerate(P["layers"]):
            x = rms_norm(xp, h, L["attn_norm"], c.rms_norm_eps)
            qkv = linear(x, L["qkv"], L["qkv_b"])
            q = xp.reshape(qkv[:, :q_size], (T, c.num_heads, c.head_dim))
            k = xp.reshape(qkv[:, q_size:q_size + kv_size], (T, c.num_kv_heads, c.head_dim))
            v = xp.reshape(qkv[:, q_size + kv_size:], (T, c.num_kv_heads, c.head_dim))
            q = rms_norm(xp, q, L["q_norm"], c.rms_norm_eps)
            k = rms_norm(xp, k, L["k_norm"], c.rms_norm_eps)
            q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
            k_pool, v_pool = write_kv(self.backend, *kv_caches[i], k, v, meta.slot_mapping)
            kv_caches[i] = (k_pool, v_pool)
            o = paged_attention(xp, q, k_pool, v_pool, meta, self.scale)
            h = h + linear(o, L["o"], L["o_b"])
            x = rms_norm(xp, h, L["mlp_norm"], c.rms_norm_eps)
            gu = linear(x, L["gate_up"], L["gate_up_b"])
            n = c.intermediate_size
            h = h + linear(silu(xp, gu[:, :n]) * gu[:, n:], L["down"], L["down_b"])
        return rms_norm(xp, h, P["norm"], c.rms_norm_eps), kv_caches
