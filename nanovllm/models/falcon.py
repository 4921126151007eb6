"""Falcon (and the RefinedWeb/RefinedWebModel configs it grew from): LayerNorm, rotary, GELU.

Three block layouts: sequential (attn then MLP), parallel with one shared norm, and the new
decoder (Falcon-40B/180B) with grouped KV heads and ln_attn/ln_mlp. The fused query_key_value
rows are reordered at load into [all Q | all K | all V] whatever the checkpoint's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedFeatureError
from ..layers.activation import gelu_tanh
from ..layers.attention import paged_attention, write_kv
from ..layers.erf import gelu_erf
from ..layers.linear import embedding, linear
from ..layers.rotary import RotaryEmbedding, rope_spec
from .base import COLUMNS, ROWS, CausalLM, lm_head, require, weight

ACTIVATIONS = {"gelu": gelu_erf, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh}


def _first(c: dict, *names, default=None):
    return next((c[n] for n in names if c.get(n) is not None), default)


@dataclass(slots=True)
class FalconConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_norm_eps: float
    layout: str  # "grouped" (new decoder), "multi_query" ([Q.. K V]) or "per_head" ([q k v]..)
    parallel_attn: bool
    two_norms: bool  # ln_attn + ln_mlp (new decoder), else input_layernorm (+ post_attention)
    bias: bool
    activation: str
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, c: dict) -> FalconConfig:
        if c.get("alibi"):
            raise UnsupportedFeatureError(
                "alibi=True (ALiBi position bias instead of rotary) is "
                "not supported for Falcon; only rotary Falcon models"
            )
        if c.get("apply_residual_connection_post_layernorm"):
            raise UnsupportedFeatureError(
                "apply_residual_connection_post_layernorm=True is not supported for Falcon"
            )
        act = c.get("activation", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedFeatureError(
                f"activation={act!r} is not supported for Falcon; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        model_type = c.get("model_type")
        hidden = _first(c, "hidden_size", "n_embed")
        heads = _first(c, "num_attention_heads", "n_head")
        layers = _first(c, "num_hidden_layers", "n_layer")
        if hidden is None or heads is None or layers is None:
            raise ValueError(
                "config.json lacks hidden_size, num_attention_heads or "
                "num_hidden_layers (or n_embed/n_head/n_layer), which Falcon needs"
            )
        # RefinedWeb (original Falcon-40B) is the new decoder; RefinedWebModel (7B) the old one
        new = bool(c.get("new_decoder_architecture", model_type == "RefinedWeb"))
        parallel = bool(c.get("parallel_attn", True))
        num_ln = c.get("num_ln_in_parallel_attn")
        if new:
            if not parallel:
                raise UnsupportedFeatureError(
                    "new_decoder_architecture=True with "
                    "parallel_attn=False is not supported for Falcon"
                )
            num_ln = 2 if num_ln is None else num_ln
            kv = _first(c, "num_kv_heads", "n_head_kv", default=heads)
            layout = "grouped"
        elif c.get("multi_query", True):
            kv, layout = 1, "multi_query"
        else:
            kv, layout = heads, "per_head"
        if num_ln not in (None, 1, 2) or (num_ln == 2 and not new):
            raise UnsupportedFeatureError(
                f"num_ln_in_parallel_attn={num_ln} is not supported "
                "with this Falcon layout; supported: 1, or 2 with "
                "new_decoder_architecture"
            )
        return cls(
            vocab_size=require(c, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_first(c, "ffn_hidden_size", "intermediate_size", default=4 * hidden),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=hidden // heads,
            layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
            layout=layout,
            parallel_attn=parallel,
            two_norms=num_ln == 2,
            bias=bool(c.get("bias", False)),
            activation=act,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
        )


class FalconForCausalLM(CausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        self.backend, self.xp = backend, backend.xp
        self.cfg = cfg = FalconConfig.from_hf(hf_config)
        self.rope_spec = rope_spec(hf_config, cfg.head_dim)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.num_layers, self.num_kv_heads, self.head_dim = (
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.vocab_size = cfg.vocab_size
        self.scale = cfg.head_dim**-0.5
        self.act = ACTIVATIONS[cfg.activation]
        self.params: dict = {}

    def _norm_names(self) -> list[str]:
        c = self.cfg
        if c.two_norms:
            return ["ln_attn", "ln_mlp"]
        return (
            ["input_layernorm"]
            if c.parallel_attn
            else ["input_layernorm", "post_attention_layernorm"]
        )

    def weight_table(self) -> tuple[dict, set[str]]:
        c, H = self.cfg, self.cfg.hidden_size
        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim

        def norm(name):
            return (weight(name + ".weight", (H,)), weight(name + ".bias", (H,)))

        def lin(name, shape, split, reorder=None):  # reorder: fused q/k/v rows -> [Q | K | V]
            bias_split = 0 if split == COLUMNS else None
            bias = (
                weight(name + ".bias", shape[:1], prepare=reorder, split=bias_split)
                if c.bias
                else None
            )
            return (weight(name + ".weight", shape, True, reorder, split), bias)

        ignored: set[str] = set()
        layers = []
        for i in range(c.num_layers):
            p = f"transformer.h.{i}."
            layers.append(
                {
                    "norms": [norm(p + n) for n in self._norm_names()],
                    "qkv": lin(
                        p + "self_attention.query_key_value", (qkv, H), COLUMNS, self._qkv_rows
                    ),
                    "o": lin(p + "self_attention.dense", (H, H), ROWS),
                    "up": lin(p + "mlp.dense_h_to_4h", (c.intermediate_size, H), COLUMNS),
                    "down": lin(p + "mlp.dense_4h_to_h", (H, c.intermediate_size), ROWS),
                }
            )
        embed = weight("transformer.word_embeddings.weight", (c.vocab_size, H), split=0)
        return {
            "embed": embed,
            "layers": layers,
            "lm_head": lm_head(embed, c.tie_word_embeddings, ignored),
            "ln_f": norm("transformer.ln_f"),
        }, ignored

    def _qkv_rows(self, x):
        """query_key_value rows (axis 0) in the checkpoint's layout -> [Q | K | V]."""
        xp, c = self.xp, self.cfg
        rest = tuple(x.shape[1:])
        d, heads, kv = c.head_dim, c.num_heads, c.num_kv_heads
        if c.layout == "multi_query":
            return x  # already [Q heads | K | V]
        if c.layout == "per_head":
            g = xp.reshape(x, (heads, 3, d) + rest)
            parts = [g[:, j, ...] for j in range(3)]
        else:
            g = xp.reshape(x, (kv, heads // kv + 2, d) + rest)
            parts = [g[:, :-2, ...], g[:, -2, ...], g[:, -1, ...]]
        return xp.concat([xp.reshape(p, (-1,) + rest) for p in parts], axis=0)

    def load_weights(self, tensors: dict, source: str) -> None:
        super().load_weights(tensors, source)
        self.rotary = RotaryEmbedding(
            self.xp, self.rope_spec, self.max_positions, self.backend.dtype, self.backend.device
        )

    def _attention(self, x, i, layer, cos, sin, kv_caches, meta):
        """x [T, E] (normed) -> [T, E]; writes the step's K/V into kv_caches[i].

        H query heads, KV key/value heads, D head_dim.
        """
        xp, c = self.xp, self.cfg
        T, H, KV, D = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = H * D, KV * D
        qkv = linear(x, *layer["qkv"])  # [T, (H + 2*KV) * D]
        q = xp.reshape(qkv[:, :q_size], (T, H, D))  # [T, H, D]
        k = xp.reshape(qkv[:, q_size : q_size + kv_size], (T, KV, D))  # [T, KV, D]
        v = xp.reshape(qkv[:, q_size + kv_size :], (T, KV, D))  # [T, KV, D]
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        k_pool, v_pool = kv_caches[i]  # [KV, num_slots, D] each
        k_pool, v_pool = write_kv(self.backend, k_pool, v_pool, k, v, meta.slot_mapping)
        kv_caches[i] = (k_pool, v_pool)
        o = paged_attention(xp, q, k_pool, v_pool, meta, self.scale)  # [T, H*D]
        return linear(o, *layer["o"])  # [T, E]

    def forward(self, params: dict, input_ids, positions, kv_caches: list, meta):
        """Token ids [T] -> final hidden states [T, E]; writes the step's K/V to the pools.

        T tokens in the step, E = hidden_size, F = intermediate_size, D head_dim.
        """
        xp, c = self.xp, self.cfg
        eps = c.layer_norm_eps
        cos, sin = self.rotary.tables(positions)  # [T, 1, 2, D/2] each
        kv_caches = list(kv_caches)
        h = embedding(xp, params["embed"], input_ids)  # [T, E]
        for i, layer in enumerate(params["layers"]):
            norm_w, norm_b = layer["norms"][0]
            x = self.backend.layer_norm(h, norm_w, norm_b, eps)  # [T, E]
            attn = self._attention(x, i, layer, cos, sin, kv_caches, meta)  # [T, E]
            if c.parallel_attn:  # attention and MLP both read the block's input
                y = x  # [T, E]
                if c.two_norms:  # ln_mlp: the MLP's own norm of the block's input
                    norm_w, norm_b = layer["norms"][1]
                    y = self.backend.layer_norm(h, norm_w, norm_b, eps)  # [T, E]
                up = self.act(xp, linear(y, *layer["up"]))  # [T, F]
                h = h + (linear(up, *layer["down"]) + attn)  # [T, E]
            else:
                h = h + attn  # [T, E]
                norm_w, norm_b = layer["norms"][1]
                y = self.backend.layer_norm(h, norm_w, norm_b, eps)  # [T, E]
                up = self.act(xp, linear(y, *layer["up"]))  # [T, F]
                h = h + linear(up, *layer["down"])  # [T, E]
        norm_w, norm_b = params["ln_f"]
        return self.backend.layer_norm(h, norm_w, norm_b, eps), kv_caches  # [T, E]

    def compute_logits(self, params: dict, hidden):
        return hidden @ params["lm_head"]
