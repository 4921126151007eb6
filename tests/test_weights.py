"""Weight loaders: HF safetensors directories and GGUF files, checked against transformers."""

from __future__ import annotations

import copy
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from nanovllm.weights import WeightsError, load_gguf, load_hf_dir
from nanovllm.weights.default_model import DEFAULT_GGUF_NAME, cache_dir
from nanovllm.weights.gguf_file import dequantize, dequantize_tensor, open_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REAL_GGUF = cache_dir() / DEFAULT_GGUF_NAME
# the default SmolLM2 GGUF, fetched into the cache first where it is not there yet
needs_real_gguf = pytest.mark.usefixtures("default_gguf")


def tiny_llama(**overrides) -> tuple[transformers.LlamaConfig, dict[str, np.ndarray]]:
    settings = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    config = transformers.LlamaConfig(**(settings | overrides))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases start constant: make them distinct
            p.normal_(0, 0.5)
    return config, model


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- safetensors directories


@pytest.fixture(scope="module")
def llama_model():
    return tiny_llama()[1]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_hf_dir_matches_state_dict(tmp_path, llama_model, dtype):
    model = copy.deepcopy(llama_model).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, tensors = load_hf_dir(tmp_path)
    assert config == json.loads((tmp_path / "config.json").read_text())
    expected = state_dict(model)
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_hf_dir_sharded(tmp_path, llama_model):
    llama_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _, tensors = load_hf_dir(tmp_path)
    expected = state_dict(llama_model)
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


@pytest.fixture
def saved_dir(tmp_path, llama_model) -> Path:
    llama_model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(WeightsError) as info:
        load_hf_dir(path)
    for fragment in fragments:
        assert fragment in str(info.value)
    return str(info.value)


def test_hf_dir_truncated(saved_dir):
    file = saved_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    expect_error(saved_dir, str(file), "truncated")


def test_hf_dir_too_short_for_header(saved_dir):
    file = saved_dir / "model.safetensors"
    file.write_bytes(b"\x01\x02")
    expect_error(saved_dir, str(file), "truncated")


def test_hf_dir_corrupt_header(saved_dir):
    file = saved_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"\xff not json!!"
    file.write_bytes(bytes(data))
    expect_error(saved_dir, str(file), "corrupt header")


def test_hf_dir_header_length_too_large(saved_dir):
    file = saved_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    file.write_bytes(bytes(data))
    expect_error(saved_dir, str(file))


def test_hf_dir_missing_config(saved_dir):
    (saved_dir / "config.json").unlink()
    expect_error(saved_dir, str(saved_dir / "config.json"), "missing")


def test_hf_dir_without_weights(saved_dir):
    (saved_dir / "model.safetensors").unlink()
    expect_error(saved_dir, "model.safetensors")


def test_hf_dir_missing_shard(tmp_path, llama_model):
    llama_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(tmp_path, str(shard), "missing")


def test_hf_dir_shard_lacks_indexed_tensor(tmp_path, llama_model):
    llama_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = next(iter(data["weight_map"].values()))
    data["weight_map"]["model.extra.weight"] = shard
    index.write_text(json.dumps(data))
    expect_error(tmp_path, str(tmp_path / shard), "model.extra.weight")


def test_hf_dir_unsupported_dtype(saved_dir):
    from safetensors.numpy import save_file

    save_file({"counts": np.arange(4, dtype=np.int64)}, str(saved_dir / "model.safetensors"))
    expect_error(saved_dir, "counts", "I64")


# ---------------------------------------------------------------- GGUF files written here

HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        layer, rest = stem[len("model.layers.") :].split(".", 1)
        return f"blk.{layer}.{HF_TO_GGUF_LAYER[rest]}.{kind}"
    return f"{HF_TO_GGUF[stem]}.{kind}"


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to q_proj/k_proj rows (and biases)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(
    path: Path, config, weights: dict[str, np.ndarray], arch: str = "llama", metadata=None
) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if metadata is not None:
        metadata(writer)
    for name, value in weights.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if ".q_proj." in name:
            value = interleave(value, config.num_attention_heads)
        elif ".k_proj." in name:
            value = interleave(value, config.num_key_value_heads)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "attention_bias": True}])
def test_gguf_round_trip_undoes_llama_permutation(tmp_path, overrides):
    hf_config, model = tiny_llama(**overrides)
    expected = state_dict(model)
    file = write_llama_gguf(tmp_path / "tiny.gguf", hf_config, expected)
    config, tensors, tokenizer = load_gguf(file)
    assert tokenizer is None
    if hf_config.tie_word_embeddings:
        del expected["lm_head.weight"]
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
    ):
        assert config[key] == getattr(hf_config, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    assert config["rope_scaling"] is None
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"


def test_gguf_unsupported_architecture(tmp_path):
    hf_config, model = tiny_llama()
    file = write_llama_gguf(tmp_path / "x.gguf", hf_config, {}, arch="bloom")
    with pytest.raises(
        WeightsError,
        match=r"architecture 'bloom' is not supported; supported: "
        r".*llama",
    ):
        load_gguf(file)


def test_gguf_unknown_tensor(tmp_path):
    hf_config, model = tiny_llama()
    extra = np.zeros(4, np.float32)
    file = write_llama_gguf(
        tmp_path / "x.gguf",
        hf_config,
        state_dict(model),
        metadata=lambda w: w.add_tensor("blk.1.ffn_xx.weight", extra),
    )
    with pytest.raises(WeightsError, match="blk.1.ffn_xx.weight"):
        load_gguf(file)


def test_gguf_missing_tensor(tmp_path):
    hf_config, model = tiny_llama()
    weights = state_dict(model)
    del weights["model.layers.1.mlp.down_proj.weight"]
    file = write_llama_gguf(tmp_path / "x.gguf", hf_config, weights)
    with pytest.raises(WeightsError, match=r"lacks tensor 'blk.1.ffn_down.weight'"):
        load_gguf(file)


def test_gguf_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_gguf_not_a_gguf(tmp_path):
    file = tmp_path / "x.gguf"
    file.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(WeightsError, match=str(file)):
        load_gguf(file)


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_gguf_truncated_synthetic(tmp_path, cut):
    hf_config, model = tiny_llama()
    file = write_llama_gguf(tmp_path / "x.gguf", hf_config, state_dict(model))
    file.write_bytes(file.read_bytes()[: int(file.stat().st_size * cut)])
    with pytest.raises(WeightsError, match=str(file)):
        load_gguf(file)


# ---------------------------------------------------------------- rope scaling metadata


def rope_metadata(**keys):
    def add(writer: gguf.GGUFWriter) -> None:
        for key, value in keys.items():
            full = f"llama.rope.scaling.{key}"
            if isinstance(value, str):
                writer.add_string(full, value)
            elif isinstance(value, float):
                writer.add_float32(full, value)
            else:
                writer.add_uint32(full, value)

    return add


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({"type": "none"}, None),
        ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
        (
            {
                "type": "yarn",
                "factor": 8.0,
                "original_context_length": 4096,
                "yarn_beta_fast": 32.0,
            },
            {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
            },
        ),
    ],
)
def test_gguf_rope_scaling(tmp_path, keys, expected):
    hf_config, model = tiny_llama()
    file = write_llama_gguf(
        tmp_path / "x.gguf", hf_config, state_dict(model), metadata=rope_metadata(**keys)
    )
    config, _, _ = load_gguf(file)
    assert config["rope_scaling"] == expected


@pytest.mark.parametrize(
    "keys, named",
    [
        ({"type": "longrope"}, "llama.rope.scaling.type"),
        (
            {"type": "yarn", "factor": 4.0, "yarn_log_multiplier": 0.1},
            "llama.rope.scaling.yarn_log_multiplier",
        ),
    ],
)
def test_gguf_rope_scaling_unsupported(tmp_path, keys, named):
    hf_config, model = tiny_llama()
    file = write_llama_gguf(
        tmp_path / "x.gguf", hf_config, state_dict(model), metadata=rope_metadata(**keys)
    )
    with pytest.raises(WeightsError, match=named):
        load_gguf(file)


def llama_cpp_rope_freqs(
    theta: float, dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """The rope_freqs.weight divisors llama.cpp's convert script writes for llama3 scaling."""
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_gguf_llama3_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dim = 500000.0, 128
    hf_config, model = tiny_llama(
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_theta=theta,
        num_hidden_layers=1,
    )
    scaling = dict(factor=8.0, low=1.0, high=4.0, original=8192)
    freqs = llama_cpp_rope_freqs(theta, dim, **scaling)

    def add_freqs(writer):
        writer.add_tensor("rope_freqs.weight", freqs)

    file = write_llama_gguf(tmp_path / "x.gguf", hf_config, state_dict(model), metadata=add_freqs)
    config, tensors, _ = load_gguf(file)
    assert "rope_freqs.weight" not in tensors
    got = config["rope_scaling"]
    assert got["rope_type"] == "llama3"
    assert got["factor"] == 8 and got["original_max_position_embeddings"] == 8192
    assert got["high_freq_factor"] == pytest.approx(4.0) and got["low_freq_factor"] == 1.0

    def inv_freq(rope: dict) -> np.ndarray:
        params = {"rope_theta": theta} | rope
        cfg = transformers.LlamaConfig(
            hidden_size=256,
            num_attention_heads=2,
            max_position_embeddings=131072,
            rope_parameters=params,
        )
        return ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].numpy()

    reference = inv_freq(
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    np.testing.assert_allclose(inv_freq(got), reference, rtol=1e-6)


# ---------------------------------------------------------------- dequantization


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def ref_q8_0(b: np.ndarray) -> np.ndarray:
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    return d * b[:, 2:].view(np.int8).astype(np.float32)


def ref_q4_0(b: np.ndarray) -> np.ndarray:
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    qs = b[:, 2:18].astype(np.int32)
    return d * (np.concatenate([qs & 15, qs >> 4], axis=1) - 8)


def ref_q4_1(b: np.ndarray) -> np.ndarray:
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    m = b[:, 2:4].copy().view("<f2").astype(np.float32)
    qs = b[:, 4:20].astype(np.int32)
    return d * np.concatenate([qs & 15, qs >> 4], axis=1) + m


def scale_min_k4(j: int, s: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(s[j] & 63), int(s[j + 4] & 63)
    return (
        int((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)),
        int((s[j + 4] >> 4) | ((s[j] >> 6) << 4)),
    )


def ref_q4_k(b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(b), 256), np.float32)
    for n, block in enumerate(b):
        d, dmin = block[:4].copy().view("<f2").astype(np.float32)
        scales, qs = block[4:16], block[16:144].astype(np.int32)
        for j in range(4):
            (s1, m1), (s2, m2) = scale_min_k4(2 * j, scales), scale_min_k4(2 * j + 1, scales)
            q = qs[32 * j : 32 * j + 32]
            out[n, 64 * j : 64 * j + 32] = d * s1 * (q & 15) - dmin * m1
            out[n, 64 * j + 32 : 64 * j + 64] = d * s2 * (q >> 4) - dmin * m2
    return out


def ref_q5_k(b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(b), 256), np.float32)
    for n, block in enumerate(b):
        d, dmin = block[:4].copy().view("<f2").astype(np.float32)
        scales, qh, qs = block[4:16], block[16:48].astype(np.int32), block[48:176].astype(np.int32)
        for j in range(4):
            (s1, m1), (s2, m2) = scale_min_k4(2 * j, scales), scale_min_k4(2 * j + 1, scales)
            q = qs[32 * j : 32 * j + 32]
            low = (q & 15) + 16 * ((qh >> (2 * j)) & 1)
            high = (q >> 4) + 16 * ((qh >> (2 * j + 1)) & 1)
            out[n, 64 * j : 64 * j + 32] = d * s1 * low - dmin * m1
            out[n, 64 * j + 32 : 64 * j + 64] = d * s2 * high - dmin * m2
    return out


def ref_q6_k(b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(b), 256), np.float32)
    for n, block in enumerate(b):
        ql, qh = block[:128].astype(np.int32), block[128:192].astype(np.int32)
        sc = block[192:208].view(np.int8).astype(np.float32)
        d = block[208:210].copy().view("<f2").astype(np.float32)[0]
        for half in range(2):
            lo, hi, s, y = ql[64 * half :], qh[32 * half :], sc[8 * half :], out[n, 128 * half :]
            for l in range(32):
                i = l // 16
                y[l] = d * s[i] * (((lo[l] & 15) | (((hi[l] >> 0) & 3) << 4)) - 32)
                y[l + 32] = d * s[i + 2] * (((lo[l + 32] & 15) | (((hi[l] >> 2) & 3) << 4)) - 32)
                y[l + 64] = d * s[i + 4] * (((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32)
                y[l + 96] = d * s[i + 6] * (((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32)
    return out


# type -> (elements per block, bytes per block, byte offsets of float16 fields, reference)
QUANTS = {
    Q.Q8_0: (32, 34, (0,), ref_q8_0),
    Q.Q4_0: (32, 18, (0,), ref_q4_0),
    Q.Q4_1: (32, 20, (0, 2), ref_q4_1),
    Q.Q4_K: (256, 144, (0, 2), ref_q4_k),
    Q.Q5_K: (256, 176, (0, 2), ref_q5_k),
    Q.Q6_K: (256, 210, (208,), ref_q6_k),
}


def random_blocks(qtype: Q, n: int, rng: np.random.Generator) -> np.ndarray:
    _, size, halves, _ = QUANTS[qtype]
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for offset in halves:
        blocks[:, offset : offset + 2] = f16_bytes(rng.uniform(-1, 1, n).astype(np.float16))
    return blocks


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory):
    """A GGUF holding a [3, cols] tensor of every type, and the values each should hold."""
    rng = np.random.default_rng(0)
    file = tmp_path_factory.mktemp("quants") / "types.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")
    expected = {}
    for qtype, (block, size, _, reference) in QUANTS.items():
        rows, per_row = 3, 2
        blocks = random_blocks(qtype, rows * per_row, rng)
        expected[qtype.name] = reference(blocks).reshape(rows, per_row * block)
        writer.add_tensor(qtype.name, blocks.reshape(rows, per_row * size), raw_dtype=qtype)
    floats = rng.standard_normal((3, 40)).astype(np.float32)
    writer.add_tensor("F32", floats)
    writer.add_tensor("F16", floats.astype(np.float16))
    bf16 = (floats.view(np.uint32) >> 16).astype(np.uint16)
    writer.add_tensor("BF16", bf16.view(np.uint8).reshape(3, 80), raw_dtype=Q.BF16)
    expected |= {
        "F32": floats,
        "F16": floats.astype(np.float16).astype(np.float32),
        "BF16": (bf16.astype(np.uint32) << 16).view(np.float32),
    }
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return open_gguf(str(file)), expected


@pytest.mark.parametrize("type_name", [q.name for q in QUANTS] + ["F32", "F16", "BF16"])
def test_dequantize_matches_reference(typed_gguf, type_name):
    reader, expected = typed_gguf
    tensor = next(t for t in reader.tensors if t.name == type_name)
    assert tensor.tensor_type.name == type_name
    values = dequantize_tensor(tensor, "types.gguf")
    assert values.dtype == np.float32 and values.flags.writeable
    assert not np.shares_memory(values, tensor.data)
    np.testing.assert_allclose(values, expected[type_name], rtol=1e-6, atol=1e-6)


def assert_reader_matches_gguf(file) -> None:
    """Our bulk reader gives every metadata value and every tensor view that gguf's gives."""
    ours, theirs = open_gguf(str(file)), gguf.GGUFReader(str(file))
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.fields[key] == value and type(ours.fields[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == ref.tensor_type and mine.shape == tuple(ref.shape.tolist())
        assert (mine.n_elements, mine.n_bytes) == (ref.n_elements, ref.n_bytes), ref.name
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, ref.name
        assert np.array_equal(mine.data, ref.data), ref.name
        # and the row-grouped dequantization is bit-identical to gguf's own
        ours_values = dequantize(mine.data, mine.tensor_type)
        np.testing.assert_array_equal(
            ours_values, gguf.quants.dequantize(ref.data, ref.tensor_type)
        )


def test_bulk_reader_matches_gguf_reader_on_every_type(typed_gguf, tmp_path):
    assert_reader_matches_gguf(typed_gguf[0].path)
    hf_config, model = tiny_llama()
    file = write_llama_gguf(tmp_path / "x.gguf", hf_config, state_dict(model))
    assert_reader_matches_gguf(file)


@needs_real_gguf
def test_bulk_reader_matches_gguf_reader_on_the_real_model():
    assert_reader_matches_gguf(REAL_GGUF)


def corrupt_header(data: bytearray, what: str) -> None:
    """One kind of damage to a GGUF header written by gguf's own writer."""
    if what == "version":
        data[4:8] = (7).to_bytes(4, "little")
    elif what == "big-endian":
        data[4:8] = (3).to_bytes(4, "big")
    elif what == "huge key length":  # the first key's length
        data[24:32] = (1 << 60).to_bytes(8, "little")
    elif what == "value type":  # the first value's type
        key_len = int.from_bytes(data[24:32], "little")
        data[32 + key_len : 36 + key_len] = (99).to_bytes(4, "little")
    elif what == "huge tensor count":
        data[8:16] = (1 << 40).to_bytes(8, "little")


@pytest.mark.parametrize(
    "what, words",
    [
        ("version", "GGUF version 7"),
        ("big-endian", "big-endian"),
        ("huge key length", "runs past the end"),
        ("value type", "unknown metadata value type 99"),
        ("huge tensor count", "runs past the end"),
    ],
)
def test_corrupt_gguf_header_is_named(tmp_path, what, words):
    hf_config, model = tiny_llama()
    file = write_llama_gguf(tmp_path / "x.gguf", hf_config, state_dict(model))
    data = bytearray(file.read_bytes())
    corrupt_header(data, what)
    file.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=str(file)) as e:
        load_gguf(file)
    assert words in str(e.value) and "download it again" in str(e.value)


@pytest.mark.parametrize("qtype, step", [(Q.Q8_0, 1 / 127), (Q.Q4_0, 1 / 7), (Q.Q4_1, 1 / 15)])
def test_quantize_round_trip(qtype, step):
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    back = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    blocks = x.reshape(-1, 32)
    spread = np.abs(blocks).max(1) if qtype != Q.Q4_1 else np.ptp(blocks, 1)
    error = np.abs(back.reshape(-1, 32) - blocks).max(1)
    assert np.all(error <= spread * step * 1.01)
    assert np.abs(back - x).mean() < 0.2 * np.abs(x).mean()


# ---------------------------------------------------------------- GGUF tokenizers vs transformers


def auto_tokenizer(file: Path):
    return transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


def assert_same_tokenizer(ours, theirs, texts: list[str]) -> None:
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours.tokenizer.encode(text).ids == ids, text
        for skip in (False, True):
            assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)


SP_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "t",
    "a",
    "n",
    "s",
    "i",
    "he",
    "ll",
    "llo",
    "hello",
    "▁hello",
    "▁w",
    "or",
    "▁wor",
    "ld",
    "▁world",
    "▁t",
    "he",
    "▁the",
    "in",
    "an",
    "▁an",
    "st",
    "▁s",
    "ing",
    "th",
    "▁th",
]


def sentencepiece_metadata(writer: gguf.GGUFWriter) -> list[str]:
    pieces = list(dict.fromkeys(SP_PIECES))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    return tokens


def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path):
    hf_config, model = tiny_llama(vocab_size=3 + 256 + len(dict.fromkeys(SP_PIECES)))
    file = write_llama_gguf(
        tmp_path / "sp.gguf", hf_config, state_dict(model), metadata=sentencepiece_metadata
    )
    _, _, ours = load_gguf(file)
    assert ours.add_bos_token and not ours.add_eos_token
    assert (ours.bos_token, ours.eos_token, ours.bos_token_id, ours.eos_token_id) == (
        "<s>",
        "</s>",
        1,
        2,
    )
    assert_same_tokenizer(
        ours,
        auto_tokenizer(file),
        [
            "hello world",
            "the hello in the world",
            "  two leading spaces",
            "Hello World!",
            "héllo wörld 🙂",
            "<s>hello</s> world",
            "tab\tand\nnewline",
        ],
    )


BL_MERGES = [
    "Ġ t",
    "h e",
    "Ġt he",
    "i n",
    "Ġ w",
    "o r",
    "Ġw or",
    "l d",
    "Ġwor ld",
    "l l",
    "he ll",
    "hell o",
]


def byte_level_metadata(writer: gguf.GGUFWriter, pre: str = "smollm", merges=BL_MERGES) -> None:
    from nanovllm.weights.gguf_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + merged + ["<think>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 4) + [4])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{{ messages }}")


def test_gguf_byte_level_tokenizer_matches_transformers(tmp_path):
    hf_config, model = tiny_llama(vocab_size=3 + 256 + len(BL_MERGES) + 1)
    file = write_llama_gguf(
        tmp_path / "bl.gguf", hf_config, state_dict(model), metadata=byte_level_metadata
    )
    _, _, ours = load_gguf(file)
    assert not ours.add_bos_token and ours.chat_template == "{{ messages }}"
    assert_same_tokenizer(
        ours,
        auto_tokenizer(file),
        [
            "the world",
            "hello the world",
            "héllo wörld 🙂",
            "<|im_start|>user\nhi<|im_end|>",
            "x <think> y",
            "12 123 a1",
            "  spaces\n\n\ttabs",
        ],
    )


@pytest.mark.parametrize(
    "pre, expected", [("smollm", ["1", "2", "Ġ", "1", "2"]), ("gpt2", ["12", "Ġ12"])]
)
def test_gguf_byte_level_digits(tmp_path, pre, expected):
    """SmolLM/StarCoder vocabularies split digits one by one, as llama.cpp and their own
    tokenizer.json do (transformers' GGUF converter does not, which only matters for a
    vocabulary that has digit merges; SmolLM2's has none)."""
    merges = ["1 2", "Ġ 12", "Ġ 1"]
    hf_config, model = tiny_llama(vocab_size=3 + 256 + len(merges) + 1)
    file = write_llama_gguf(
        tmp_path / "d.gguf",
        hf_config,
        state_dict(model),
        metadata=lambda w: byte_level_metadata(w, pre, merges),
    )
    _, _, ours = load_gguf(file)
    assert ours.tokenizer.encode("12 12").tokens == expected


# ---------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def real_gguf(default_gguf):
    return load_gguf(default_gguf)


@pytest.fixture(scope="module")
def real_transformers(default_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(REAL_GGUF.parent), gguf_file=REAL_GGUF.name, dtype=torch.float32
    )
    return model.config, {k: v.numpy() for k, v in model.state_dict().items()}


@needs_real_gguf
@pytest.mark.slow
def test_real_gguf_tensors_match_transformers(real_gguf, real_transformers):
    _, tensors, _ = real_gguf
    hf_config, expected = real_transformers
    assert hf_config.tie_word_embeddings
    assert tensors.keys() == expected.keys() - {"lm_head.weight"}
    for name, value in tensors.items():
        assert value.dtype == np.float32 and value.shape == expected[name].shape, name
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-6, err_msg=name)


@needs_real_gguf
@pytest.mark.slow
def test_real_gguf_config_matches_transformers(real_gguf, real_transformers):
    config, _, _ = real_gguf
    hf_config, _ = real_transformers
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_bias",
        "mlp_bias",
        "rms_norm_eps",
        "hidden_act",
    ):
        assert config[key] == getattr(hf_config, key), key
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )


@needs_real_gguf
@pytest.mark.slow
def test_real_gguf_tokenizer_matches_transformers(real_gguf):
    _, _, ours = real_gguf
    theirs = transformers.AutoTokenizer.from_pretrained(
        str(REAL_GGUF.parent), gguf_file=REAL_GGUF.name
    )
    assert ours.chat_template == theirs.chat_template and "<|im_start|>" in ours.chat_template
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert not ours.add_bos_token and not ours.add_eos_token
    assert_same_tokenizer(
        ours,
        theirs,
        [
            "The capital of France is",
            "héllo wörld 🙂",
            "<|im_start|>user\nhi<|im_end|>",
            "In 2024, 3.14159 people ate 1,000,000 apples.",
            "  leading\n\n\ttabs  and   spaces ",
            "def f(x):\n    return x**2  # comment",
            "日本語のテキスト",
            "<|endoftext|><empty_output>",
        ],
    )
    assert ours.tokenizer.decode([1, 4093, 198, 6004, 2], skip_special_tokens=True) == "user\nhi"


@needs_real_gguf
def test_real_gguf_truncated(tmp_path):
    file = tmp_path / "truncated.gguf"
    with open(REAL_GGUF, "rb") as f:
        file.write_bytes(f.read(1 << 20))
    with pytest.raises(WeightsError, match=str(file)):
        load_gguf(file)


@needs_real_gguf
@pytest.mark.slow
def test_real_gguf_truncated_in_tensor_data(tmp_path):
    file = tmp_path / "truncated.gguf"
    with open(REAL_GGUF, "rb") as f:
        file.write_bytes(f.read(REAL_GGUF.stat().st_size - 1000))
    with pytest.raises(WeightsError, match=str(file)):
        load_gguf(file)


@needs_real_gguf
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_real_gguf_peak_memory_near_twice_the_weights(real_gguf):
    weights = sum(v.nbytes for v in real_gguf[1].values())
    # VmHWM belongs to the child's own address space (ru_maxrss would inherit this process's)
    script = (
        f"from nanovllm.weights import load_gguf; load_gguf({str(REAL_GGUF)!r}); "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    peak = int(out.stdout.split()[-1]) * 1024
    assert peak < 2 * weights, (peak, weights)


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError)


# ---------------------------------------------------------------- converted-weights cache


def host_params(loaded, backend) -> list[np.ndarray]:
    """Every array of a loaded model's params on the host, in the tree's order."""
    from nanovllm.bench import param_arrays

    return [backend.to_host(a) for a in param_arrays(loaded.model.params)]


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.safetensors"))


def test_a_second_load_maps_the_converted_weights_and_matches_the_first(
    tmp_path, backend, monkeypatch
):
    from nanovllm.backend import get_backend
    from nanovllm.loader import load_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("NANOVLLM_WEIGHTS_CACHE", str(cache))
    hf_config, model = tiny_llama()
    file = write_llama_gguf(tmp_path / "tiny.gguf", hf_config, state_dict(model))
    b = get_backend(backend)
    first = load_model(str(file), b)
    (entry,) = entries(cache)
    assert entry.name.startswith("tiny-")
    second = load_model(str(file), b)
    monkeypatch.setenv("NANOVLLM_WEIGHTS_CACHE", "off")
    uncached = load_model(str(file), b)
    assert entries(cache) == [entry]
    for loaded in (first, second):
        assert loaded.hf_config == uncached.hf_config
        pairs = zip(host_params(loaded, b), host_params(uncached, b), strict=True)
        for i, (values, expected) in enumerate(pairs):
            np.testing.assert_array_equal(values, expected, err_msg=f"param {i}")
    if backend == "numpy":  # joined q|k|v and gate|up join as views of the file, not copies
        from nanovllm.backend.base import _root

        layer = second.model.params["layers"][0]
        for name in ("qkv", "gate_up", "down"):
            w = layer[name]  # a wide one is copied into C order, and keeps the file's view
            view = w.mapped if w.flags.c_contiguous else np.asarray(w)
            assert isinstance(_root(view).base, mmap.mmap), name


def test_a_changed_gguf_is_converted_again_and_its_old_entry_removed(tmp_path, monkeypatch):
    from nanovllm.backend import get_backend
    from nanovllm.loader import load_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("NANOVLLM_WEIGHTS_CACHE", str(cache))
    b = get_backend("numpy")
    file = tmp_path / "tiny.gguf"
    hf_config, model = tiny_llama()
    write_llama_gguf(file, hf_config, state_dict(model))
    load_model(str(file), b)
    (old,) = entries(cache)
    weights = state_dict(model)
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1  # same size, new values
    write_llama_gguf(file, hf_config, weights)
    loaded = load_model(str(file), b)
    (new,) = entries(cache)
    assert new != old
    np.testing.assert_array_equal(loaded.model.params["norm"], weights["model.norm.weight"])


def test_a_corrupt_entry_is_converted_again_with_a_warning(tmp_path, monkeypatch):
    from nanovllm.backend import get_backend
    from nanovllm.loader import load_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("NANOVLLM_WEIGHTS_CACHE", str(cache))
    hf_config, model = tiny_llama()
    weights = state_dict(model)
    file = write_llama_gguf(tmp_path / "tiny.gguf", hf_config, weights)
    b = get_backend("numpy")
    load_model(str(file), b)
    (entry,) = entries(cache)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # cut short
    with pytest.warns(UserWarning, match=f"{entry}.*unreadable converted weights.*again"):
        loaded = load_model(str(file), b)
    np.testing.assert_array_equal(loaded.model.params["norm"], weights["model.norm.weight"])
    assert entries(cache) == [entry] and entry.stat().st_size > 0
    load_model(str(file), b)  # the rewritten entry reads back


@pytest.mark.parametrize("setting", ["unwritable", "off"])
def test_without_a_writable_cache_the_gguf_loads_as_before(tmp_path, monkeypatch, setting):
    from nanovllm.backend import get_backend
    from nanovllm.loader import load_model

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(
        "NANOVLLM_WEIGHTS_CACHE", str(blocker / "cache") if setting != "off" else "off"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # where "off" must not write
    hf_config, model = tiny_llama()
    weights = state_dict(model)
    file = write_llama_gguf(tmp_path / "tiny.gguf", hf_config, weights)
    if setting == "off":
        loaded = load_model(str(file), get_backend("numpy"))
    else:
        with pytest.warns(UserWarning, match="cannot store converted weights"):
            loaded = load_model(str(file), get_backend("numpy"))
    np.testing.assert_array_equal(loaded.model.params["norm"], weights["model.norm.weight"])
    assert not (tmp_path / "xdg").exists()


def test_the_cache_keeps_a_gib_of_disk_free_and_removes_stale_temporaries(tmp_path, monkeypatch):
    from nanovllm.backend import get_backend
    from nanovllm.loader import load_model
    from nanovllm.weights import converted_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("NANOVLLM_WEIGHTS_CACHE", str(cache))
    hf_config, model = tiny_llama()
    file = write_llama_gguf(tmp_path / "tiny.gguf", hf_config, state_dict(model))
    b = get_backend("numpy")
    free = converted_cache.shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(converted_cache, "KEEP_FREE", free)  # what is free now is too little
    with pytest.warns(UserWarning, match="would leave less than .* GiB .* free"):
        load_model(str(file), b)
    assert entries(cache) == []
    monkeypatch.setattr(converted_cache, "KEEP_FREE", 0)
    prefix = converted_cache.entry_path(file).name.rsplit("-", 1)[0]
    stale, fresh = cache / f".{prefix}-x.1.tmp", cache / f".{prefix}-y.2.tmp"
    for tmp in (stale, fresh):
        tmp.write_bytes(b"left by a killed process")
    os.utime(stale, (time.time() - 2 * converted_cache.STALE,) * 2)
    load_model(str(file), b)
    assert len(entries(cache)) == 1 and not stale.exists() and fresh.exists()


LOAD_AT_ONCE = """
import sys, time
from pathlib import Path
import numpy as np
from nanovllm.backend import get_backend
from nanovllm.loader import load_model
start = Path(sys.argv[2])
while not start.exists():
    time.sleep(0.001)
for _ in range(4):
    loaded = load_model(sys.argv[1], get_backend("numpy"))
print(float(np.asarray(loaded.model.params["layers"][0]["gate_up"], np.float64).sum()))
"""


def test_processes_filling_the_cache_at_once_each_load_whole_weights(tmp_path, monkeypatch):
    """Four processes start together on a GGUF whose conversion takes a while to write; each
    loads it four times (after the first, from whatever entry is there), gets the same weights and
    never reads a partly written entry."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NANOVLLM_WEIGHTS_CACHE", str(cache))
    hf_config, model = tiny_llama(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=4096
    )
    file = write_llama_gguf(tmp_path / "bigger.gguf", hf_config, state_dict(model))
    start = tmp_path / "start"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_AT_ONCE, str(file), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(2.0)  # every interpreter is up and waiting
    start.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "converted weights" not in err, err  # none saw a partly written entry
    sums = {out.split()[-1] for out, _ in results}
    expected = np.concatenate(
        [state_dict(model)[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up")]
    )
    assert sums == {repr(float(expected.astype(np.float64).sum()))}
    assert len(entries(cache)) == 1 and not list(cache.glob(".*.tmp"))
