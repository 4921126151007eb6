"""Llama family (Llama 2/3.x, TinyLlama, SmolLM2): RMSNorm, GQA with RoPE, SwiGLU MLP."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedFeatureError
from ..layers.attention import paged_attention, write_kv
from ..layers.linear import embedding, linear
from ..layers.rotary import RotaryEmbedding, rope_spec
from .base import COLUMNS, ROWS, CausalLM, attention_weights, fused, lm_head, require, weight


@dataclass(slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, c: dict) -> LlamaConfig:
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedFeatureError(
                f"hidden_act={c['hidden_act']!r} is not supported for Llama; supported: 'silu'"
            )
        heads = require(c, "num_attention_heads")
        hidden = require(c, "hidden_size")
        return cls(
            vocab_size=require(c, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=require(c, "intermediate_size"),
            num_layers=require(c, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
        )


class LlamaForCausalLM(CausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        self.backend = backend
        self.xp = backend.xp
        self.cfg = cfg = LlamaConfig.from_hf(hf_config)
        self.rope_spec = rope_spec(hf_config, cfg.head_dim)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.num_layers, self.num_kv_heads, self.head_dim = (
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.vocab_size = cfg.vocab_size
        self.scale = cfg.head_dim**-0.5
        self.params: dict = {}

    def weight_table(self) -> tuple[dict, set[str]]:
        c = self.cfg
        H, I = c.hidden_size, c.intermediate_size
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        embed = weight("model.embed_tokens.weight", (c.vocab_size, H), split=0)
        ignored: set[str] = set()
        layers = []
        for i in range(c.num_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            attn_bias, mlp_bias = c.attention_bias, c.mlp_bias
            layers.append(
                {
                    "attn_norm": weight(f"model.layers.{i}.input_layernorm.weight", (H,)),
                    "mlp_norm": weight(f"model.layers.{i}.post_attention_layernorm.weight", (H,)),
                    **attention_weights(a, H, q, kv, attn_bias),
                    "gate_up": fused(
                        [m + "gate_proj.weight", m + "up_proj.weight"],
                        [(I, H), (I, H)],
                        linear=True,
                        split=COLUMNS,
                    ),
                    "gate_up_b": fused(
                        [m + "gate_proj.bias", m + "up_proj.bias"], [(I,), (I,)], split=0
                    )
                    if mlp_bias
                    else None,
                    "down": weight(m + "down_proj.weight", (H, I), linear=True, split=ROWS),
                    "down_b": weight(m + "down_proj.bias", (H,)) if mlp_bias else None,
                }
            )
            ignored.add(a + "rotary_emb.inv_freq")
        head = lm_head(embed, c.tie_word_embeddings, ignored)
        return {
            "embed": embed,
            "layers": layers,
            "norm": weight("model.norm.weight", (H,)),
            "lm_head": head,
        }, ignored

    def load_weights(self, tensors: dict, source: str) -> None:
        super().load_weights(tensors, source)
        self.rotary = RotaryEmbedding(
            self.xp, self.rope_spec, self.max_positions, self.backend.dtype, self.backend.device
        )

    def forward(self, params: dict, input_ids, positions, kv_caches: list, meta):
        """Token ids [T] -> final hidden states [T, E]; writes the step's K/V to the pools.

        T tokens in the step, E = hidden_size, H query heads, KV key/value heads, D head_dim,
        I = intermediate_size.
        """
        xp, c = self.xp, self.cfg
        T = input_ids.shape[0]
        H, KV, D, I = c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        q_size, kv_size = H * D, KV * D
        cos, sin = self.rotary.tables(positions)  # [T, 1, 2, D/2] each
        kv_caches = list(kv_caches)
        h = embedding(xp, params["embed"], input_ids)  # [T, E]
        for i, layer in enumerate(params["layers"]):
            x = self.backend.rms_norm(h, layer["attn_norm"], c.rms_norm_eps)  # [T, E]
            qkv = linear(x, layer["qkv"], layer["qkv_b"])  # [T, (H + 2*KV) * D]
            qk = xp.reshape(qkv[:, : q_size + kv_size], (T, H + KV, -1))  # [T, H + KV, D]
            if "qk_norm" in layer:  # Qwen3: RMSNorm over each q and k head before RoPE
                qk = self.backend.rms_norm(qk, layer["qk_norm"], c.rms_norm_eps)  # [T, H + KV, D]
            qk = self.rotary.apply(qk, cos, sin)  # q and k heads rotated together
            q, k = qk[:, :H, :], qk[:, H:, :]  # [T, H, D], [T, KV, D]
            v = xp.reshape(qkv[:, q_size + kv_size :], (T, KV, D))  # [T, KV, D]
            k_pool, v_pool = kv_caches[i]  # [KV, num_slots, D] each
            k_pool, v_pool = write_kv(self.backend, k_pool, v_pool, k, v, meta.slot_mapping)
            kv_caches[i] = (k_pool, v_pool)
            window = self.layer_windows[i] if self.layer_windows else None
            o = paged_attention(xp, q, k_pool, v_pool, meta, self.scale, window)  # [T, H*D]
            h = h + linear(o, layer["o"], layer["o_b"])  # [T, E]
            x = self.backend.rms_norm(h, layer["mlp_norm"], c.rms_norm_eps)  # [T, E]
            gate_up = linear(x, layer["gate_up"], layer["gate_up_b"])  # [T, 2*I]
            gate, up = gate_up[:, :I], gate_up[:, I:]  # [T, I] each
            h = h + linear(self.backend.silu(gate) * up, layer["down"], layer["down_b"])  # [T, E]
        return self.backend.rms_norm(h, params["norm"], c.rms_norm_eps), kv_caches  # [T, E]

    def compute_logits(self, params: dict, hidden):
        return hidden @ params["lm_head"]
