"""Granite 4.0 (GraniteMoeHybridForCausalLM): Mamba2 and attention layers, shared MLP, optional MoE.

Each layer: x += r * mixer(norm(x)), mixer = Mamba2 or attention (RoPE or none); then
x += r * (shared_mlp(norm(x)) + moe(norm(x))). The Granite multipliers are folded into the weights
at load as in granite.py. Mamba layers keep conv and SSM state per sequence in state slots, so a
model with any Mamba layer asks the engine for state slots (`needs_state_slots`); its prefix cache
resumes from states saved at block boundaries (engine/state_snapshots.py). The all-attention
variants (granite-4.0-350m / 1b) use plain paged attention.
The MoE runs every expert on every token, masked by the routing weights (see layers/moe.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UnsupportedFeatureError
from ..layers.attention import paged_attention, write_kv
from ..layers.linear import embedding, linear, prepare_linear
from ..layers.mamba2 import Mamba2Spec, mamba2_mixer
from ..layers.moe import moe
from ..layers.rotary import RotaryEmbedding, rope_spec
from .base import COLUMNS, ROWS, CausalLM, Weight, attention_weights, lm_head, require, weight

MAMBA, ATTENTION = "mamba", "attention"
LAYER_KINDS = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
}


def _float(v) -> float:
    """A JSON float, or transformers 5's {"__float__": "Infinity"} spelling of one."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def _multiplier(c: dict, key: str) -> float:
    """A Granite multiplier: 1.0 when the config leaves it unset or null."""
    value = c.get(key)
    return 1.0 if value is None else float(value)


@dataclass(slots=True)
class GraniteHybridConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_kinds: list[str]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    use_rope: bool
    max_position_embeddings: int
    shared_intermediate_size: int
    intermediate_size: int  # of each expert
    num_experts: int
    top_k: int
    mamba: Mamba2Spec
    mamba_conv_bias: bool
    mamba_proj_bias: bool
    embedding_multiplier: float
    residual_multiplier: float
    attention_multiplier: float
    logits_scaling: float

    @classmethod
    def from_hf(cls, c: dict) -> GraniteHybridConfig:
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedFeatureError(
                f"hidden_act={c['hidden_act']!r} is not supported for "
                "GraniteMoeHybrid; supported: 'silu'"
            )
        pos = c.get("position_embedding_type")
        if pos not in (None, "nope", "rope"):
            raise UnsupportedFeatureError(
                f"position_embedding_type={pos!r} is not supported; "
                "supported: 'rope', 'nope' or null"
            )
        n = require(c, "num_hidden_layers")
        raw = c.get("layer_types") or c.get("layers_block_type") or ["mamba"] * n
        bad = [t for t in raw if t not in LAYER_KINDS]
        if bad or len(raw) != n:
            raise UnsupportedFeatureError(
                f"layer_types={raw!r} is not supported: need {n} entries from "
                f"{', '.join(LAYER_KINDS)}"
            )
        hidden, heads = require(c, "hidden_size"), require(c, "num_attention_heads")
        m_heads = c.get("mamba_n_heads", 128)
        intermediate = int(c.get("mamba_expand", 2) * hidden)
        d_head = c.get("mamba_d_head", "auto")
        d_head = intermediate // m_heads if d_head in ("auto", None) else int(d_head)
        groups = c.get("mamba_n_groups", 1)
        if d_head * m_heads != intermediate or m_heads % groups:
            raise UnsupportedFeatureError(
                f"mamba_n_heads={m_heads} x mamba_d_head={d_head} must equal mamba_expand x "
                f"hidden_size={intermediate}, and mamba_n_groups={groups} must divide the heads"
            )
        limit = c.get("time_step_limit")
        lo, hi = (0.0, math.inf) if limit is None else (_float(limit[0]), _float(limit[1]))
        experts = c.get("num_local_experts", 8) or 0
        return cls(
            vocab_size=require(c, "vocab_size"),
            hidden_size=hidden,
            num_layers=n,
            layer_kinds=[LAYER_KINDS[t] for t in raw],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False)),
            use_rope=pos == "rope",
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            shared_intermediate_size=c.get("shared_intermediate_size", 1024),
            intermediate_size=c.get("intermediate_size", 11008),
            num_experts=experts,
            top_k=c.get("num_experts_per_tok", 2),
            mamba=Mamba2Spec(
                intermediate=intermediate,
                heads=m_heads,
                head_dim=d_head,
                groups=groups,
                d_state=c.get("mamba_d_state", 256),
                d_conv=c.get("mamba_d_conv", 4),
                chunk_size=c.get("mamba_chunk_size", 256) or 256,
                eps=c.get("rms_norm_eps", 1e-6),
                dt_min=lo,
                dt_max=hi,
            ),
            mamba_conv_bias=bool(c.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(c.get("mamba_proj_bias", False)),
            **{
                k: _multiplier(c, k)
                for k in (
                    "embedding_multiplier",
                    "residual_multiplier",
                    "attention_multiplier",
                    "logits_scaling",
                )
            },
        )


class GraniteMoeHybridForCausalLM(CausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        self.backend = backend
        self.xp = backend.xp
        self.cfg = c = GraniteHybridConfig.from_hf(hf_config)
        self.rope_spec = rope_spec(hf_config, c.head_dim) if c.use_rope else None
        self.max_positions = max_positions or c.max_position_embeddings
        self.num_layers, self.num_kv_heads, self.head_dim = c.num_layers, c.num_kv_heads, c.head_dim
        self.needs_state_slots = MAMBA in c.layer_kinds
        self.vocab_size = c.vocab_size
        self.scale = c.attention_multiplier
        self.params: dict = {}
        self.rotary: RotaryEmbedding | None = None

    def weight_table(self) -> tuple[dict, set[str]]:
        c, m = self.cfg, self.cfg.mamba
        H = c.hidden_size
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        xp = self.xp
        ignored: set[str] = set()
        layers = []
        for i, kind in enumerate(c.layer_kinds):
            p = f"model.layers.{i}."
            S = c.shared_intermediate_size
            layer: dict[str, Weight | None] = {
                "in_norm": weight(p + "input_layernorm.weight", (H,)),
                "mlp_norm": weight(p + "post_attention_layernorm.weight", (H,)),
                "shared_in": weight(
                    p + "shared_mlp.input_linear.weight", (2 * S, H), linear=True, split=COLUMNS
                ),
                "shared_out": weight(
                    p + "shared_mlp.output_linear.weight", (H, S), linear=True, split=ROWS
                ),
            }
            if c.num_experts:
                E, I = c.num_experts, c.intermediate_size
                e = p + "block_sparse_moe."

                def per_expert(w):  # [experts, out, in] -> one [in, out] weight per expert
                    return [prepare_linear(xp, w[k, ...]) for k in range(w.shape[0])]

                layer |= {
                    "router": weight(e + "router.layer.weight", (E, H), linear=True),
                    "experts_in": weight(
                        e + "input_linear.weight", (E, 2 * I, H), prepare=per_expert
                    ),
                    "experts_out": weight(
                        e + "output_linear.weight", (E, H, I), prepare=per_expert
                    ),
                }
            if kind == ATTENTION:
                layer |= attention_weights(p + "self_attn.", H, q, kv, c.attention_bias)
            else:
                a, proj = p + "mamba.", m.intermediate + m.conv_dim + m.heads
                layer |= {
                    "in_proj": weight(a + "in_proj.weight", (proj, H), linear=True),
                    "in_proj_b": (
                        weight(a + "in_proj.bias", (proj,)) if c.mamba_proj_bias else None
                    ),
                    "conv_w": weight(
                        a + "conv1d.weight",
                        (m.conv_dim, 1, m.d_conv),
                        prepare=lambda w: xp.matrix_transpose(w[:, 0, :]),
                    ),
                    "conv_b": (
                        weight(a + "conv1d.bias", (m.conv_dim,)) if c.mamba_conv_bias else None
                    ),
                    "dt_bias": weight(a + "dt_bias", (m.heads,)),
                    "A": weight(a + "A_log", (m.heads,), prepare=lambda w: -xp.exp(w)),
                    "D": weight(a + "D", (m.heads,)),
                    "norm": weight(a + "norm.weight", (m.intermediate,)),
                    "out_proj": weight(a + "out_proj.weight", (H, m.intermediate), linear=True),
                    "out_proj_b": weight(a + "out_proj.bias", (H,)) if c.mamba_proj_bias else None,
                }
            layers.append(layer)
        embed = weight("model.embed_tokens.weight", (c.vocab_size, H), split=0)
        return {
            "embed": embed,
            "layers": layers,
            "norm": weight("model.norm.weight", (H,)),
            "lm_head": lm_head(embed, c.tie_word_embeddings, ignored),
        }, ignored

    def load_weights(self, tensors: dict, source: str) -> None:
        """Granite's multipliers are folded into the host tensors first: residual_multiplier
        into every branch output, embedding_multiplier into the table, and logits_scaling (and,
        with a tied head, the embedding multiplier the table now carries) into the final norm."""
        c = self.cfg
        r = c.residual_multiplier
        for name in list(tensors):
            if any(
                s in name
                for s in (
                    ".self_attn.o_proj.",
                    ".mamba.out_proj.",
                    ".shared_mlp.output_linear.",
                    ".block_sparse_moe.output_linear.",
                )
            ):
                tensors[name] = tensors[name] * r
        head_scale = c.logits_scaling * (c.embedding_multiplier if c.tie_word_embeddings else 1.0)
        for name, scale in (
            ("model.embed_tokens.weight", c.embedding_multiplier),
            ("model.norm.weight", 1.0 / head_scale),
        ):
            if name in tensors:  # else the table check names it as missing
                tensors[name] = tensors[name] * scale
        super().load_weights(tensors, source)
        if self.rope_spec is not None:  # set exactly when c.use_rope
            self.rotary = RotaryEmbedding(
                self.xp, self.rope_spec, self.max_positions, self.backend.dtype, self.backend.device
            )

    @property
    def num_kv_layers(self) -> int:
        return self.cfg.layer_kinds.count(ATTENTION)

    @property
    def state_elements_per_slot(self) -> int:
        m = self.cfg.mamba
        per_layer = (m.d_conv - 1) * m.conv_dim + m.heads * m.head_dim * m.d_state
        return per_layer * self.cfg.layer_kinds.count(MAMBA)

    def allocate_cache(self, backend, num_kv_slots: int, num_state_slots: int) -> list:
        """Per layer: (K pool, V pool) for attention, (conv, ssm) state pools for Mamba."""
        c, m = self.cfg, self.cfg.mamba
        kv = (c.num_kv_heads, num_kv_slots, c.head_dim)
        conv = (num_state_slots, m.d_conv - 1, m.conv_dim)
        ssm = (num_state_slots, m.heads, m.head_dim, m.d_state)
        return [
            (backend.kv_pool(kv), backend.kv_pool(kv))
            if kind == ATTENTION
            else (backend.zeros(conv), backend.zeros(ssm))
            for kind in c.layer_kinds
        ]

    def _attention(self, layer, x, cache, meta, rope):
        """x [T, E] (normed) -> [T, E], and the layer's updated (K pool, V pool).

        H query heads, KV key/value heads, D head_dim; rope: (cos, sin), or None without RoPE.
        """
        xp, c = self.xp, self.cfg
        T, H, KV, D = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = H * D, KV * D
        qkv = linear(x, layer["qkv"], layer["qkv_b"])  # [T, (H + 2*KV) * D]
        qk = xp.reshape(qkv[:, : q_size + kv_size], (T, H + KV, -1))  # [T, H + KV, D]
        if rope is not None:
            qk = self.rotary.apply(qk, *rope)  # q and k heads rotated together
        q, k = qk[:, :H, :], qk[:, H:, :]  # [T, H, D], [T, KV, D]
        v = xp.reshape(qkv[:, q_size + kv_size :], (T, KV, D))  # [T, KV, D]
        k_pool, v_pool = cache  # [KV, num_slots, D] each
        k_pool, v_pool = write_kv(self.backend, k_pool, v_pool, k, v, meta.slot_mapping)
        o = paged_attention(xp, q, k_pool, v_pool, meta, self.scale)  # [T, H*D]
        return linear(o, layer["o"], layer["o_b"]), (k_pool, v_pool)  # [T, E]

    def forward(self, params: dict, input_ids, positions, kv_caches: list, meta):
        """Token ids [T] -> final hidden states [T, E]; writes the step's K/V and recurrent
        state into the caches.

        T tokens in the step, E = hidden_size, F = shared_intermediate_size, D head_dim.
        """
        xp, c = self.xp, self.cfg
        F = c.shared_intermediate_size
        rope = self.rotary.tables(positions) if self.rotary is not None else None  # [T, 1, 2, D/2]
        caches = list(kv_caches)
        h = embedding(xp, params["embed"], input_ids)  # [T, E]
        for i, (kind, layer) in enumerate(zip(c.layer_kinds, params["layers"])):
            x = self.backend.rms_norm(h, layer["in_norm"], c.rms_norm_eps)  # [T, E]
            if kind == ATTENTION:
                out, caches[i] = self._attention(layer, x, caches[i], meta, rope)  # [T, E]
            else:
                out, caches[i] = mamba2_mixer(
                    self.backend, layer, c.mamba, x, caches[i], meta
                )  # [T, E]
            h = h + out  # [T, E]
            x = self.backend.rms_norm(h, layer["mlp_norm"], c.rms_norm_eps)  # [T, E]
            gate_up = x @ layer["shared_in"]  # [T, 2*F]
            act = self.backend.silu(gate_up[:, :F]) * gate_up[:, F:]  # [T, F]
            out = act @ layer["shared_out"]  # [T, E]
            if c.num_experts:
                out = out + moe(
                    xp, x, layer["router"], layer["experts_in"], layer["experts_out"], c.top_k
                )  # [T, E]
            h = h + out  # [T, E]
        return self.backend.rms_norm(h, params["norm"], c.rms_norm_eps), caches  # [T, E]

    def compute_logits(self, params: dict, hidden):
        return hidden @ params["lm_head"]
