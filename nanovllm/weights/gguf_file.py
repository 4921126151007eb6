"""A GGUF file: an HF-style config, dequantized float32 tensors with HF names, and its tokenizer."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from ..errors import WeightsError
from ..memory import check_fits
from ..models.config_check import check_config
from .gguf_reader import GGUFFile, GGUFFormatError, GGUFTensor
from .gguf_tokenizer import GGUFTokenizerData, build_tokenizer


@dataclass(frozen=True, slots=True)
class GGUFArch:
    """How one GGUF architecture maps onto a Hugging Face one."""

    hf_architecture: str
    model_type: str
    config_keys: dict[str, str]  # "{arch}.<key>" -> HF config key
    globals: dict[str, str]  # GGUF tensor stem -> HF name, outside the blocks
    layer: dict[str, str]  # "blk.{i}.<stem>" -> layer_prefix + "<name>"
    defaults: dict[str, object] = field(default_factory=dict)
    permute_qk: bool = False  # llama.cpp interleaves Q/K rows for its rotary layout
    layer_prefix: str = "model.layers.{i}."
    transposed: tuple[str, ...] = ()  # HF weights (name fragments) llama.cpp stores transposed
    optional_layer: tuple[str, ...] = ()  # layer stems only some variants of the arch have
    # fix-ups of the config read from the metadata, before any size in it is used
    read_config: Callable[[dict, str], None] | None = None
    finish: Callable[[dict, dict[str, np.ndarray]], None] | None = None  # variant fix-ups


LLAMA = GGUFArch(
    hf_architecture="LlamaForCausalLM",
    model_type="llama",
    config_keys={
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "block_count": "num_hidden_layers",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.key_length": "head_dim",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "rope.freq_base": "rope_theta",
        "context_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
    },
    globals={"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    layer={
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu"},
    permute_qk=True,
)


def _llama_like(
    hf_architecture: str,
    model_type: str,
    permute_qk: bool,
    config_keys=None,
    layer=None,
    defaults=None,
) -> GGUFArch:
    return GGUFArch(
        hf_architecture,
        model_type,
        LLAMA.config_keys | (config_keys or {}),
        LLAMA.globals,
        LLAMA.layer | (layer or {}),
        LLAMA.defaults | (defaults or {}),
        permute_qk=permute_qk,
    )


# llama.cpp converts Qwen with NEOX rope (no Q/K interleave), Granite as a Llama (interleaved)
QWEN2 = _llama_like("Qwen2ForCausalLM", "qwen2", False, defaults={"rope_theta": 1000000.0})
QWEN3 = _llama_like(
    "Qwen3ForCausalLM",
    "qwen3",
    False,
    defaults={"rope_theta": 1000000.0},
    layer={"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
)
GRANITE = _llama_like(
    "GraniteForCausalLM",
    "granite",
    True,
    config_keys={
        "embedding_scale": "embedding_multiplier",
        "residual_scale": "residual_multiplier",
        "attention.scale": "attention_multiplier",
        "logit_scale": "logits_scaling",
    },
)

# llama.cpp stores GPT-2's Conv1D weights transposed ([out, in]) and its tied head as output
GPT2 = GGUFArch(
    hf_architecture="GPT2LMHeadModel",
    model_type="gpt2",
    config_keys={
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "block_count": "num_hidden_layers",
        "attention.head_count": "num_attention_heads",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
        "context_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
    },
    globals={
        "token_embd": "transformer.wte",
        "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
    },
    layer={
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
    defaults={"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    layer_prefix="transformer.h.{i}.",
    transposed=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"),
)


def _falcon_variant(config: dict, tensors: dict[str, np.ndarray]) -> None:
    """llama.cpp's Falcon: attn_norm_2 marks ln_attn/ln_mlp (Falcon-40B), more than one KV head
    the new decoder; query_key_value is stored [all Q | K | V] (its "jploski" layout), which the
    new decoder's HF layout interleaves per KV group as [q.. k v]."""
    two_norms = "transformer.h.0.ln_mlp.weight" in tensors
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    new = two_norms or kv > 1
    config.update(
        new_decoder_architecture=new,
        multi_query=not new,
        parallel_attn=True,
        num_ln_in_parallel_attn=(2 if two_norms else 1) if new else None,
        bias="transformer.h.0.self_attention.query_key_value.bias" in tensors,
        num_kv_heads=kv,
    )
    if two_norms:
        for name in [n for n in tensors if ".input_layernorm." in n]:
            tensors[name.replace(".input_layernorm.", ".ln_attn.")] = tensors.pop(name)
    if not new:
        return  # multi-query: [all Q | K | V] is HF's layout too
    d = config["hidden_size"] // heads
    for name in [n for n in tensors if ".query_key_value." in n]:
        w = tensors[name]
        rest = w.shape[1:]
        q = w[: heads * d].reshape(kv, heads // kv, d, *rest)
        k = w[heads * d : (heads + kv) * d].reshape(kv, 1, d, *rest)
        v = w[(heads + kv) * d :].reshape(kv, 1, d, *rest)
        tensors[name] = np.concatenate([q, k, v], axis=1).reshape(w.shape)


FALCON = GGUFArch(
    hf_architecture="FalconForCausalLM",
    model_type="falcon",
    config_keys={
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "block_count": "num_hidden_layers",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
        "rope.freq_base": "rope_theta",
        "context_length": "max_position_embeddings",
        "vocab_size": "vocab_size",
    },
    globals={
        "token_embd": "transformer.word_embeddings",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
    },
    layer={
        "attn_norm": "input_layernorm",
        "attn_norm_2": "ln_mlp",
        "attn_qkv": "self_attention.query_key_value",
        "attn_output": "self_attention.dense",
        "ffn_up": "mlp.dense_h_to_4h",
        "ffn_down": "mlp.dense_4h_to_h",
    },
    defaults={"activation": "gelu", "layer_norm_epsilon": 1e-5, "rope_theta": 10000.0},
    layer_prefix="transformer.h.{i}.",
    optional_layer=("attn_norm_2",),
    finish=_falcon_variant,
)


def _gemma_variant(pattern: int) -> Callable[[dict, dict[str, np.ndarray]], None]:
    """llama.cpp's Gemma 2/3: its converter stores every norm as 1 + w (Hugging Face stores w);
    every `pattern`-th layer attends fully, the others through the window (llama.cpp's
    swa pattern); queries are scaled by head_dim^-0.5, but by (hidden / heads)^-0.5 in the
    27B models (46 layers for Gemma 2, 62 for Gemma 3), as llama.cpp does."""

    def finish(config: dict, tensors: dict[str, np.ndarray]) -> None:
        for name in tensors:
            if name.endswith(("norm.weight", "layernorm.weight")):
                tensors[name] = tensors[name] - np.float32(1.0)
        layers = config["num_hidden_layers"]
        config["layer_types"] = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ]
        big = layers == (46 if pattern == 2 else 62)
        heads = config["num_attention_heads"]
        config["query_pre_attn_scalar"] = (
            config["hidden_size"] // heads if big else config["head_dim"]
        )

    return finish


_GEMMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GEMMA2 = GGUFArch(
    hf_architecture="Gemma2ForCausalLM",
    model_type="gemma2",
    config_keys=LLAMA.config_keys
    | {
        "attention.sliding_window": "sliding_window",
        "attn_logit_softcapping": "attn_logit_softcapping",
        "final_logit_softcapping": "final_logit_softcapping",
    },
    globals={"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    layer=_GEMMA_LAYER,
    defaults={
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    finish=_gemma_variant(2),
)
# Gemma 3's sliding layers use RoPE base 10000 (llama.cpp's default; its GGUF does not store it)
GEMMA3 = GGUFArch(
    hf_architecture="Gemma3ForCausalLM",
    model_type="gemma3_text",
    config_keys=LLAMA.config_keys | {"attention.sliding_window": "sliding_window"},
    globals=GEMMA2.globals,
    layer=_GEMMA_LAYER | {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    defaults=GEMMA2.defaults | {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0},
    finish=_gemma_variant(6),
)


def _granite_hybrid_config(config: dict, file: str) -> None:
    """llama.cpp's granitehybrid metadata: a per-layer KV head count that is 0 on Mamba
    layers, the Mamba sizes under ssm.*, and rope.scaling.finetuned set when the attention
    layers use RoPE (its converter writes False for Granite 4.0-H, which has none)."""
    layers = config["num_hidden_layers"]
    kv = config.pop("_kv_heads_per_layer", None)
    kv = [int(k) for k in np.ravel(kv)] if kv is not None else [config["num_attention_heads"]]
    if len(kv) == 1:
        kv = kv * layers
    if len(kv) != layers:
        raise WeightsError(
            f"{file}: granitehybrid.attention.head_count_kv has {len(kv)} entries for "
            f"{layers} layers; reconvert the model with llama.cpp's convert_hf_to_gguf.py"
        )
    config["layer_types"] = ["attention" if k else "mamba" for k in kv]
    config["num_key_value_heads"] = max(kv) or config["num_attention_heads"]
    config["position_embedding_type"] = "rope" if config.pop("_use_rope", False) else "nope"
    inner, hidden = config.pop("_ssm_inner_size", None), config["hidden_size"]
    heads = config.get("mamba_n_heads")
    if "mamba" in config["layer_types"]:
        if inner is None or heads is None or inner % hidden or inner % heads:
            raise WeightsError(
                f"{file}: granitehybrid.ssm.inner_size={inner} must be a multiple of "
                f"embedding_length={hidden} and of ssm.time_step_rank={heads} (the Mamba "
                "heads); reconvert the model with llama.cpp's convert_hf_to_gguf.py"
            )
        config["mamba_expand"], config["mamba_d_head"] = inner // hidden, inner // heads
    config["num_local_experts"] = config.get("num_local_experts") or 0


def _granite_hybrid_tensors(config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Undo what llama.cpp's converter did to the Hugging Face tensors: gate and up split
    apart (shared MLP and experts), conv1d squeezed to [conv_dim, d_conv], A stored as
    -exp(A_log) and A, D as [heads, 1], the gated norm as [groups, inner / groups]."""
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for gate, up, joined, axis in (
            ("shared_mlp.gate", "shared_mlp.up", "shared_mlp.input_linear", 0),
            ("block_sparse_moe.gate", "block_sparse_moe.up", "block_sparse_moe.input_linear", 1),
        ):
            if p + gate + ".weight" in tensors and p + up + ".weight" in tensors:
                tensors[p + joined + ".weight"] = np.concatenate(
                    [tensors.pop(p + gate + ".weight"), tensors.pop(p + up + ".weight")], axis
                )
        m = p + "mamba."
        if m + "conv1d.weight" in tensors:
            w = tensors[m + "conv1d.weight"]
            tensors[m + "conv1d.weight"] = w.reshape(w.shape[0], 1, w.shape[-1])
        if m + "A" in tensors:
            tensors[m + "A_log"] = np.log(-tensors.pop(m + "A").reshape(-1))
        if m + "D" in tensors:
            tensors[m + "D"] = tensors[m + "D"].reshape(-1)
        if m + "dt.bias" in tensors:
            tensors[m + "dt_bias"] = tensors.pop(m + "dt.bias")
        if m + "norm.weight" in tensors:
            tensors[m + "norm.weight"] = tensors[m + "norm.weight"].reshape(-1)
    embed = tensors.get("model.embed_tokens.weight")
    if embed is not None:  # its converter may pad the vocabulary list, never the table
        config["vocab_size"] = int(embed.shape[0])
    shared = tensors.get("model.layers.0.shared_mlp.output_linear.weight")
    if shared is not None:
        config["shared_intermediate_size"] = int(shared.shape[1])
    config["mamba_conv_bias"] = any(".mamba.conv1d.bias" in n for n in tensors) or not any(
        ".mamba.conv1d." in n for n in tensors
    )  # any Mamba layer: layer 0 may be attention
    config["mamba_proj_bias"] = any(".mamba.in_proj.bias" in n for n in tensors)


# Granite 4.0 hybrid: each layer is a Mamba2 or an attention mixer, then a shared MLP (its
# gate/up named ffn_*_shexp beside experts, ffn_* without), and MoE experts where present
_GRANITE_HYBRID_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ssm_in": "mamba.in_proj",
    "ssm_conv1d": "mamba.conv1d",
    "ssm_dt": "mamba.dt",
    "ssm_a": "mamba.A",
    "ssm_d": "mamba.D",
    "ssm_norm": "mamba.norm",
    "ssm_out": "mamba.out_proj",
    "ffn_gate_inp": "block_sparse_moe.router.layer",
    "ffn_gate_exps": "block_sparse_moe.gate",
    "ffn_up_exps": "block_sparse_moe.up",
    "ffn_down_exps": "block_sparse_moe.output_linear",
    "ffn_gate_shexp": "shared_mlp.gate",
    "ffn_up_shexp": "shared_mlp.up",
    "ffn_down_shexp": "shared_mlp.output_linear",
    "ffn_gate": "shared_mlp.gate",
    "ffn_up": "shared_mlp.up",
    "ffn_down": "shared_mlp.output_linear",
}
GRANITE_HYBRID = GGUFArch(
    hf_architecture="GraniteMoeHybridForCausalLM",
    model_type="granitemoehybrid",
    config_keys=GRANITE.config_keys
    | {
        "attention.head_count_kv": "_kv_heads_per_layer",
        "rope.scaling.finetuned": "_use_rope",
        "expert_count": "num_local_experts",
        "expert_used_count": "num_experts_per_tok",
        "expert_shared_feed_forward_length": "shared_intermediate_size",
        "ssm.conv_kernel": "mamba_d_conv",
        "ssm.state_size": "mamba_d_state",
        "ssm.group_count": "mamba_n_groups",
        "ssm.inner_size": "_ssm_inner_size",
        "ssm.time_step_rank": "mamba_n_heads",
    },
    globals=LLAMA.globals,
    layer=_GRANITE_HYBRID_LAYER,
    defaults=LLAMA.defaults,
    permute_qk=True,
    # a layer has the stems of its kind only; the model's weight table names what is missing
    optional_layer=tuple(s for s in _GRANITE_HYBRID_LAYER if s not in ("attn_norm", "ffn_norm")),
    read_config=_granite_hybrid_config,
    finish=_granite_hybrid_tensors,
)

GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": LLAMA,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "granite": GRANITE,
    "gpt2": GPT2,
    "falcon": FALCON,
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
    "granitehybrid": GRANITE_HYBRID,
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(weight|bias))?")  # ssm_a, ssm_d: no suffix
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias)")


def load_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray], GGUFTokenizerData | None]:
    """An HF-style config dict, float32 tensors keyed by HF name, and the tokenizer (if stored)."""
    file = str(path)
    reader = open_gguf(file)
    arch = str(read_field(reader, "general.architecture", file))
    if arch not in GGUF_ARCHS:
        raise WeightsError(
            f"{file}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHS))}. Use the Hugging Face checkpoint"
        )
    spec = GGUF_ARCHS[arch]
    names = {t.name for t in reader.tensors}
    config = gguf_config(reader, arch, spec, names, file)
    check_config(config, len(names), file)  # before any size is used
    check_complete(names, spec, config["num_hidden_layers"], file)
    check_fits(
        f"{file}: its weights dequantized to float32",
        4 * sum(int(t.n_elements) for t in reader.tensors),
        "use a smaller model or free memory",
    )
    tensors = {}
    for tensor in tqdm(
        reader.tensors, desc=f"Dequantizing {Path(file).name}", unit="tensor", leave=False
    ):
        if tensor.name == "rope_freqs.weight":
            continue
        name = hf_name(tensor.name, spec, file)
        values = dequantize_tensor(tensor, file)
        if spec.permute_qk and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            if values.shape[0] % (2 * heads):
                raise WeightsError(
                    f"{file}: tensor {tensor.name!r} has {values.shape[0]} rows, "
                    f"not a multiple of 2 x {heads} heads; the metadata is wrong"
                )
            values = unpermute_rows(values, heads)
        if values.ndim == 2 and name.endswith(spec.transposed):
            values = np.ascontiguousarray(values.T)
        tensors[name] = values
    if spec.finish is not None:
        spec.finish(config, tensors)
    tokenizer = build_tokenizer(lambda key: read_field(reader, key, file, None), file)
    return config, tensors, tokenizer


def load_gguf_tokenizer(path: str | Path) -> GGUFTokenizerData | None:
    """The tokenizer stored in a GGUF file (None if it has none), without its tensors."""
    file = str(path)
    reader = open_gguf(file)
    return build_tokenizer(lambda key: read_field(reader, key, file, None), file)


def open_gguf(file: str) -> GGUFFile:
    if not Path(file).is_file():
        raise WeightsError(f"{file} does not exist; pass the path of a .gguf file")
    try:
        return GGUFFile(file)
    except (GGUFFormatError, OSError) as e:
        raise WeightsError(
            f"{file} is not a readable GGUF file, or is truncated or corrupt ({e}); "
            f"download it again"
        ) from e


_MISSING = object()


def read_field(reader: GGUFFile, key: str, file: str, default: Any = _MISSING) -> Any:
    value = reader.fields.get(key)
    if value is None:
        if default is _MISSING:
            raise WeightsError(
                f"{file} lacks the metadata key {key!r}; reconvert the model "
                f"with llama.cpp's convert_hf_to_gguf.py"
            )
        return default
    return value


def gguf_config(reader: GGUFFile, arch: str, spec: GGUFArch, names: set[str], file: str) -> dict:
    config: dict = {"architectures": [spec.hf_architecture], "model_type": spec.model_type}
    config |= spec.defaults
    for key, hf_key in spec.config_keys.items():
        value = read_field(reader, f"{arch}.{key}", file, None)
        if value is not None:
            config[hf_key] = float(value) if isinstance(value, float) else value
    for hf_key in _REQUIRED:
        if hf_key not in config:
            gguf_key = next(k for k, v in spec.config_keys.items() if v == hf_key)
            raise WeightsError(
                f"{file} lacks the metadata key '{arch}.{gguf_key}' ({hf_key}); "
                f"reconvert the model with llama.cpp's convert_hf_to_gguf.py"
            )
    if spec.read_config is not None:
        spec.read_config(config, file)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    rope_dims = read_field(reader, f"{arch}.rope.dimension_count", file, None)
    heads = config["num_attention_heads"]
    config.setdefault("head_dim", rope_dims or config["hidden_size"] // heads)
    if "vocab_size" not in config:
        config["vocab_size"] = next(
            (int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), 0
        )
    config["tie_word_embeddings"] = "output.weight" not in names
    config["attention_bias"] = "blk.0.attn_q.bias" in names
    config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    config["rope_scaling"] = rope_scaling(reader, arch, config, file)
    for name in ("bos", "eos", "padding"):
        token = read_field(reader, f"tokenizer.ggml.{name}_token_id", file, None)
        if token is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(token)
    return config


def rope_scaling(reader: GGUFFile, arch: str, config: dict, file: str) -> dict | None:
    prefix = f"{arch}.rope.scaling."
    keys = {
        k[len(prefix) :]: read_field(reader, k, file) for k in reader.fields if k.startswith(prefix)
    }
    kind = str(keys.pop("type", "none"))
    keys.pop("finetuned", None)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if kind != "none" or keys:
            raise WeightsError(
                f"{file} has both rope_freqs.weight and {prefix}* metadata; "
                f"this mix is not supported"
            )
        return llama3_rope_scaling(dequantize_tensor(freqs, file), config, file)
    if kind == "none":
        return None
    renames = {
        "factor": "factor",
        "original_context_length": "original_max_position_embeddings",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
    }
    allowed = {"linear": ("factor",), "yarn": tuple(renames)}
    if kind not in allowed:
        raise WeightsError(
            f"{file}: {prefix}type={kind!r} is not supported (supported: "
            f"{', '.join(allowed)}); use the Hugging Face checkpoint"
        )
    for key in keys:
        if key not in allowed[kind]:
            raise WeightsError(
                f"{file}: {prefix}{key} is not supported with {kind} rope "
                f"scaling; use the Hugging Face checkpoint"
            )
    return {"rope_type": kind} | {renames[k]: v for k, v in keys.items()}


def llama3_rope_scaling(divisors: np.ndarray, config: dict, file: str) -> dict:
    """Recover HF's llama3 rope_scaling from the per-frequency divisors llama.cpp stores.

    Scaling (original length, low, high factor) by one constant leaves every frequency the same,
    so low_freq_factor=1 is chosen and the other two follow from the smoothly scaled frequencies.
    """
    divisors = divisors.astype(np.float64).ravel()
    dim, theta = config["head_dim"], config["rope_theta"]
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    factor = float(divisors.max())
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor) if factor > 1 else divisors * 0
    middle = (smooth > 1e-6) & (smooth < 1 - 1e-6)
    if len(divisors) != len(wavelen) or middle.sum() < 2:
        raise WeightsError(
            f"{file}: rope_freqs.weight does not follow llama3 rope scaling "
            f"(with at least two smoothly scaled frequencies); this rope scaling "
            f"is not supported, use the Hugging Face checkpoint"
        )
    slope, intercept = np.polyfit(1 / wavelen[middle], smooth[middle], 1)  # smooth = a/λ + b
    high = 1 - 1 / intercept
    return {
        "rope_type": "llama3",
        "factor": _snap(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": _snap(high),
        "original_max_position_embeddings": _snap(slope * (high - 1)),
    }


def _snap(x: float) -> float | int:
    """x, or the integer it is within float32 rounding of."""
    return int(round(x)) if abs(x - round(x)) < 1e-5 * max(1.0, abs(x)) else float(x)


def check_complete(names: set[str], spec: GGUFArch, layers: int, file: str) -> None:
    needed = [f"{stem}.weight" for stem in spec.globals if stem != "output"]
    needed += [
        f"blk.{i}.{stem}.weight"
        for i in range(layers)
        for stem in spec.layer
        if stem not in spec.optional_layer
    ]
    missing = [name for name in needed if name not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(
            f"{file} lacks tensor {missing[0]!r}{more}; the file is incomplete, "
            f"download or convert it again"
        )


def hf_name(name: str, spec: GGUFArch, file: str) -> str:
    if m := _LAYER_NAME.fullmatch(name):
        layer, stem, kind = m.groups()
        if stem in spec.layer:
            suffix = f".{kind}" if kind else ""
            return f"{spec.layer_prefix.format(i=layer)}{spec.layer[stem]}{suffix}"
    elif (m := _GLOBAL_NAME.fullmatch(name)) and m.group(1) in spec.globals:
        return f"{spec.globals[m.group(1)]}.{m.group(2)}"
    raise WeightsError(
        f"{file}: tensor {name!r} has no Hugging Face counterpart for a "
        f"{spec.model_type} model; this variant is not supported"
    )


def dequantize_tensor(tensor: GGUFTensor, file: str) -> np.ndarray:
    """A float32 copy of one tensor in HF (row-major, outermost first) shape."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise WeightsError(
            f"{file}: tensor {tensor.name!r} uses {tensor.tensor_type.name}, "
            f"which cannot be dequantized; requantize the model with another "
            f"type (e.g. Q8_0, Q4_K_M)"
        ) from e
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    if np.shares_memory(values, tensor.data):
        values = values.copy()
    return values


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (pairs interleaved per head) back to HF's half split."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ROWS_PER_CALL = 256  # rows gguf dequantizes at once: its own default, 16, costs 3x in overhead


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """gguf's dequantization, over groups of rows large enough that numpy's per-call overhead
    is small and small enough that each group stays in cache. Bit-identical to
    gguf.quants.dequantize (tests/test_weights.py checks)."""
    # (gguf keeps its per-type classes in a private table; without it, its public path)
    quant = getattr(gguf.quants, "_type_traits", {}).get(qtype)
    if quant is None:  # float types, a type gguf cannot dequantize, or another gguf
        return gguf.quants.dequantize(data, qtype)
    quant.init_grid()
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty(gguf.quants.quant_shape_from_byte_shape(rows.shape, qtype), np.float32)
    for i in range(0, rows.shape[0], ROWS_PER_CALL):
        out[i : i + ROWS_PER_CALL] = quant.dequantize_rows(rows[i : i + ROWS_PER_CALL])
    return out.reshape(gguf.quants.quant_shape_from_byte_shape(data.shape, qtype))
