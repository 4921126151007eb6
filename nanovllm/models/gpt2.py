"""GPT-2: learned positions, pre-LayerNorm blocks, GELU (tanh), Conv1D weights, tied head."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedFeatureError
from ..layers.activation import gelu_tanh
from ..layers.attention import paged_attention, write_kv
from ..layers.erf import gelu_erf
from ..layers.linear import embedding, linear
from .base import COLUMNS, ROWS, CausalLM, lm_head, require, weight

ACTIVATIONS = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": gelu_erf,
}


def _get(c: dict, name: str, hf_name: str):
    """GPT-2's own spelling (n_embd) or the generic one (hidden_size) that GGUF configs use."""
    return c[name] if name in c else require(c, hf_name)


@dataclass(slots=True)
class GPT2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    layer_norm_eps: float
    max_position_embeddings: int
    activation: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, c: dict) -> GPT2Config:
        act = c.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise UnsupportedFeatureError(
                f"activation_function={act!r} is not supported for "
                f"GPT-2; supported: {', '.join(ACTIVATIONS)}"
            )
        if c.get("add_cross_attention"):
            raise UnsupportedFeatureError(
                "add_cross_attention=True (an encoder-decoder GPT-2) is not supported"
            )
        hidden = _get(c, "n_embd", "hidden_size")
        heads = _get(c, "n_head", "num_attention_heads")
        return cls(
            vocab_size=require(c, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=c.get("n_inner") or c.get("intermediate_size") or 4 * hidden,
            num_layers=_get(c, "n_layer", "num_hidden_layers"),
            num_heads=heads,
            head_dim=hidden // heads,
            layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=_get(c, "n_positions", "max_position_embeddings"),
            activation=act,
            scale_attn_weights=c.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=c.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        )


class GPT2LMHeadModel(CausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        self.backend, self.xp = backend, backend.xp
        self.cfg = cfg = GPT2Config.from_hf(hf_config)
        self.num_layers, self.num_kv_heads, self.head_dim = (
            cfg.num_layers,
            cfg.num_heads,
            cfg.head_dim,
        )
        self.vocab_size = cfg.vocab_size
        base = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.scales = [
            base / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base
            for i in range(cfg.num_layers)
        ]
        self.act = ACTIVATIONS[cfg.activation]
        self.prefix = "transformer."
        self.params: dict = {}

    def weight_table(self) -> tuple[dict, set[str]]:
        c, t = self.cfg, self.prefix
        H, inner = c.hidden_size, c.intermediate_size

        def norm(name):
            return (weight(name + ".weight", (H,)), weight(name + ".bias", (H,)))

        def conv1d(name, n_in, n_out, split):  # stored [in, out]: laid out for `x @ w`
            bias_split = 0 if split == COLUMNS else None
            return (
                weight(name + ".weight", (n_in, n_out), split=split),
                weight(name + ".bias", (n_out,), split=bias_split),
            )

        ignored: set[str] = set()
        layers = []
        for i in range(c.num_layers):
            p = f"{t}h.{i}."
            layers.append(
                {
                    "ln_1": norm(p + "ln_1"),
                    "ln_2": norm(p + "ln_2"),
                    "qkv": conv1d(p + "attn.c_attn", H, 3 * H, COLUMNS),
                    "o": conv1d(p + "attn.c_proj", H, H, ROWS),
                    "fc": conv1d(p + "mlp.c_fc", H, inner, COLUMNS),
                    "proj": conv1d(p + "mlp.c_proj", inner, H, ROWS),
                }
            )
            ignored |= {p + "attn.bias", p + "attn.masked_bias"}  # causal-mask buffers
        wte = weight(t + "wte.weight", (c.vocab_size, H), split=0)
        return {
            "wte": wte,
            "wpe": weight(t + "wpe.weight", (c.max_position_embeddings, H)),
            "layers": layers,
            "ln_f": norm(t + "ln_f"),
            "lm_head": lm_head(wte, c.tie_word_embeddings, ignored),
        }, ignored

    def load_weights(self, tensors: dict, source: str) -> None:
        # GPT2Model checkpoints (the hub's "gpt2") have no "transformer." prefix
        if "transformer.wte.weight" not in tensors and "wte.weight" in tensors:
            self.prefix = ""
        super().load_weights(tensors, source)

    def forward(self, params: dict, input_ids, positions, kv_caches: list, meta):
        """Token ids [T] -> final hidden states [T, E]; writes the step's K/V to the pools.

        T tokens in the step, E = hidden_size, H heads (each with its own K/V), D = E / H,
        F = intermediate_size.
        """
        xp, c = self.xp, self.cfg
        T, E, eps = input_ids.shape[0], c.hidden_size, c.layer_norm_eps
        H, D = c.num_heads, c.head_dim
        kv_caches = list(kv_caches)
        tokens = embedding(xp, params["wte"], input_ids)  # [T, E]
        h = tokens + embedding(xp, params["wpe"], positions)  # [T, E]
        for i, layer in enumerate(params["layers"]):
            norm_w, norm_b = layer["ln_1"]
            x = self.backend.layer_norm(h, norm_w, norm_b, eps)  # [T, E]
            qkv = linear(x, *layer["qkv"])  # [T, 3*E]
            q, k, v = (
                xp.reshape(qkv[:, j * E : (j + 1) * E], (T, H, D)) for j in range(3)
            )  # [T, H, D] each
            k_pool, v_pool = kv_caches[i]  # [H, num_slots, D] each
            k_pool, v_pool = write_kv(self.backend, k_pool, v_pool, k, v, meta.slot_mapping)
            kv_caches[i] = (k_pool, v_pool)
            o = paged_attention(xp, q, k_pool, v_pool, meta, self.scales[i])  # [T, E]
            h = h + linear(o, *layer["o"])  # [T, E]
            norm_w, norm_b = layer["ln_2"]
            x = self.backend.layer_norm(h, norm_w, norm_b, eps)  # [T, E]
            up = self.act(xp, linear(x, *layer["fc"]))  # [T, F]
            h = h + linear(up, *layer["proj"])  # [T, E]
        norm_w, norm_b = params["ln_f"]
        return self.backend.layer_norm(h, norm_w, norm_b, eps), kv_caches  # [T, E]

    def compute_logits(self, params: dict, hidden):
        return hidden @ params["lm_head"]
