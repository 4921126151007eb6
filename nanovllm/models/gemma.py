"""Gemma 2 and Gemma 3 (text): Llama-like attention with four norms per layer, GeGLU, embeddings
scaled by sqrt(hidden), and layers that interleave a sliding window with full attention.

- RMSNorm weights count from 1: a norm multiplies by (1 + w). The table adds the 1 once, at
  load, so the forward pass uses the ordinary `rms_norm`.
- Each layer: h += post_attn_norm(attn(input_norm(h))); h += post_mlp_norm(mlp(pre_mlp_norm(h))).
- Scores are scaled by query_pre_attn_scalar^-0.5, not head_dim^-0.5.
- Gemma 2 squashes attention scores and final logits with tanh (softcapping).
- Gemma 3 normalizes each q and k head (RMSNorm) before RoPE, and its sliding layers use
  their own RoPE base (`rope_parameters["sliding_attention"]`, formerly
  `rope_local_base_freq`); rope scaling applies to the full-attention layers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UnsupportedFeatureError
from ..layers.activation import gelu_tanh
from ..layers.attention import paged_attention, write_kv
from ..layers.linear import embedding, linear
from ..layers.rotary import RopeSpec, RotaryEmbedding, rope_spec
from .base import (
    COLUMNS,
    ROWS,
    CausalLM,
    Weight,
    attention_weights,
    fused,
    lm_head,
    require,
    weight,
)
from .sliding import layer_windows


@dataclass(slots=True)
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    attn_softcap: float | None
    final_softcap: float | None
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, c: dict) -> GemmaConfig:
        act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedFeatureError(
                f"hidden_activation={act!r} is not supported for Gemma; supported: "
                "'gelu_pytorch_tanh'"
            )
        heads = require(c, "num_attention_heads")
        hidden = require(c, "hidden_size")
        head_dim = c.get("head_dim") or hidden // heads
        return cls(
            vocab_size=require(c, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=require(c, "intermediate_size"),
            num_layers=require(c, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or head_dim),
            attn_softcap=c.get("attn_logit_softcapping"),
            final_softcap=c.get("final_logit_softcapping"),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            attention_bias=bool(c.get("attention_bias", False)),
            max_position_embeddings=c.get("max_position_embeddings", 8192),
        )


def plus_one(w):
    """A Gemma norm weight w -> the factor (1 + w) it multiplies by."""
    return w + 1.0


class Gemma2ForCausalLM(CausalLM):
    qk_norm = False  # Gemma 3 normalizes each q and k head

    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        self.backend = backend
        self.xp = backend.xp
        self.cfg = cfg = GemmaConfig.from_hf(hf_config)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.num_layers, self.num_kv_heads, self.head_dim = (
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.vocab_size = cfg.vocab_size
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.layer_windows = layer_windows(hf_config, cfg.num_layers)
        # per layer, the RoPE it uses: one spec for full layers, one for sliding ones
        self.rope_specs = self.rope_by_kind(hf_config, cfg.head_dim)
        self.params: dict = {}

    @staticmethod
    def rope_by_kind(hf_config: dict, dim: int) -> dict[str, RopeSpec]:
        spec = rope_spec(hf_config, dim)
        return {"full": spec, "sliding": spec}

    def layer_rope(self, i: int) -> str:
        return "full" if self.layer_windows[i] is None else "sliding"

    def weight_table(self) -> tuple[dict, set[str]]:
        c = self.cfg
        E, I, D = c.hidden_size, c.intermediate_size, c.head_dim
        q, kv = c.num_heads * D, c.num_kv_heads * D
        embed = weight("model.embed_tokens.weight", (c.vocab_size, E), split=0)
        ignored: set[str] = set()
        layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."

            def norm(name: str, size: int = E) -> Weight:
                return weight(p + name + ".weight", (size,), prepare=plus_one)  # noqa: B023

            layer = {
                "attn_norm": norm("input_layernorm"),
                "post_attn_norm": norm("post_attention_layernorm"),
                "mlp_norm": norm("pre_feedforward_layernorm"),
                "post_mlp_norm": norm("post_feedforward_layernorm"),
                **attention_weights(a, E, q, kv, c.attention_bias),
                "gate_up": fused(
                    [m + "gate_proj.weight", m + "up_proj.weight"],
                    [(I, E), (I, E)],
                    linear=True,
                    split=COLUMNS,
                ),
                "down": weight(m + "down_proj.weight", (E, I), linear=True, split=ROWS),
            }
            if self.qk_norm:
                layer["qk_norm"] = Weight(
                    (a + "q_norm.weight", a + "k_norm.weight"), ((D,), (D,)), prepare=self._qk_norm
                )
            layers.append(layer)
            ignored.add(a + "rotary_emb.inv_freq")
        head = lm_head(embed, c.tie_word_embeddings, ignored)
        final_norm = weight("model.norm.weight", (E,), prepare=plus_one)
        return {"embed": embed, "layers": layers, "norm": final_norm, "lm_head": head}, ignored

    def _qk_norm(self, qk):
        """[q_norm | k_norm] -> one (1 + w) factor for the fused [q heads | k heads] view:
        [heads + kv_heads, head_dim]."""
        xp, c, d = self.xp, self.cfg, self.cfg.head_dim
        qk = plus_one(qk)
        return xp.concat(
            [
                xp.broadcast_to(qk[:d], (c.num_heads, d)),
                xp.broadcast_to(qk[d:], (c.num_kv_heads, d)),
            ]
        )

    def load_weights(self, tensors: dict, source: str) -> None:
        super().load_weights(tensors, source)
        b = self.backend
        self.rotaries: dict[str, RotaryEmbedding] = {}
        for kind, spec in self.rope_specs.items():  # one table where both kinds share a spec
            same = [r for k, r in self.rotaries.items() if self.rope_specs[k] == spec]
            self.rotaries[kind] = (
                same[0]
                if same
                else RotaryEmbedding(self.xp, spec, self.max_positions, b.dtype, b.device)
            )
        self.embed_scale = math.sqrt(self.cfg.hidden_size)

    def forward(self, params: dict, input_ids, positions, kv_caches: list, meta):
        """Token ids [T] -> final hidden states [T, E]; writes the step's K/V to the pools.

        T tokens in the step, E = hidden_size, H query heads, KV key/value heads, D head_dim,
        I = intermediate_size.
        """
        xp, c = self.xp, self.cfg
        T = input_ids.shape[0]
        H, KV, D, I = c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        q_size, kv_size = H * D, KV * D
        eps = c.rms_norm_eps
        tables = {kind: r.tables(positions) for kind, r in self.rotaries.items()}  # [T, 1, 2, D/2]
        kv_caches = list(kv_caches)
        h = embedding(xp, params["embed"], input_ids) * self.embed_scale  # [T, E]
        for i, layer in enumerate(params["layers"]):
            x = self.backend.rms_norm(h, layer["attn_norm"], eps)  # [T, E]
            qkv = linear(x, layer["qkv"], layer["qkv_b"])  # [T, (H + 2*KV) * D]
            qk = xp.reshape(qkv[:, : q_size + kv_size], (T, H + KV, D))  # [T, H + KV, D]
            if self.qk_norm:
                qk = self.backend.rms_norm(qk, layer["qk_norm"], eps)  # [T, H + KV, D]
            kind = self.layer_rope(i)
            qk = self.rotaries[kind].apply(qk, *tables[kind])  # q and k heads rotated together
            q, k = qk[:, :H, :], qk[:, H:, :]  # [T, H, D], [T, KV, D]
            v = xp.reshape(qkv[:, q_size + kv_size :], (T, KV, D))  # [T, KV, D]
            k_pool, v_pool = kv_caches[i]  # [KV, num_slots, D] each
            k_pool, v_pool = write_kv(self.backend, k_pool, v_pool, k, v, meta.slot_mapping)
            kv_caches[i] = (k_pool, v_pool)
            o = paged_attention(
                xp, q, k_pool, v_pool, meta, self.scale, self.layer_windows[i], c.attn_softcap
            )  # [T, H*D]
            o = linear(o, layer["o"], layer["o_b"])  # [T, E]
            h = h + self.backend.rms_norm(o, layer["post_attn_norm"], eps)  # [T, E]
            x = self.backend.rms_norm(h, layer["mlp_norm"], eps)  # [T, E]
            gate_up = linear(x, layer["gate_up"])  # [T, 2*I]
            gate, up = gate_up[:, :I], gate_up[:, I:]  # [T, I] each
            y = linear(gelu_tanh(xp, gate) * up, layer["down"])  # [T, E]
            h = h + self.backend.rms_norm(y, layer["post_mlp_norm"], eps)  # [T, E]
        return self.backend.rms_norm(h, params["norm"], eps), kv_caches  # [T, E]

    def compute_logits(self, params: dict, hidden):
        logits = hidden @ params["lm_head"]  # [N, V]
        cap = self.cfg.final_softcap
        return logits if cap is None else self.xp.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True

    @staticmethod
    def rope_by_kind(hf_config: dict, dim: int) -> dict[str, RopeSpec]:
        """transformers 5 keeps one rope_parameters entry per layer type; earlier configs
        give the full layers' rope_theta (+ rope_scaling) and the sliding layers'
        rope_local_base_freq."""
        params = hf_config.get("rope_parameters") or {}
        if "full_attention" in params:
            return {
                "full": rope_spec({"rope_parameters": params["full_attention"]}, dim),
                "sliding": rope_spec(
                    {"rope_parameters": params.get("sliding_attention") or {}}, dim
                ),
            }
        local = float(hf_config.get("rope_local_base_freq", 10000.0))
        return {"full": rope_spec(hf_config, dim), "sliding": RopeSpec(dim=dim, theta=local)}
