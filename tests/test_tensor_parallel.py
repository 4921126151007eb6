"""Tensor parallelism on the jax backend: the model split across N host devices.

Needs jax with 4 CPU devices, which `nox -s distributed` gives it
(XLA_FLAGS=--xla_force_host_platform_device_count=4). Greedy outputs through the paged engine
at tensor_parallel_size 2 and 4 equal those on one device and transformers' own; each device
holds 1/N of every layer weight that splits, read from the arrays' addressable shards.
"""

from __future__ import annotations

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.backend import BackendError, get_backend

jax = pytest.importorskip("jax", reason="tensor parallelism needs jax: pip install '.[jax]'")
if jax.device_count() < 4:
    pytest.skip(
        f"jax sees {jax.device_count()} device(s); these tests need 4: run them with "
        "`nox -s distributed` (XLA_FLAGS=--xla_force_host_platform_device_count=4)",
        allow_module_level=True,
    )

# 8 query heads over 4 KV heads, widths that divide by 4: every weight and pool splits
SPLITS_BY_4 = dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=112)
PROMPTS = [[1, 5, 9, 3, 7], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1, 100, 7]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_tp(tiny_llama):
    return tiny_llama("tp_llama", seed=3, **SPLITS_BY_4)


def tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def small_llm(path, tp: int) -> LLM:
    # blocks of 4 and a 16-token budget: chunked prefill, several sequences a step
    return LLM(
        str(path),
        backend="jax",
        tensor_parallel_size=tp,
        block_size=4,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        verbose=False,
    )


@pytest.mark.parametrize("tp", [2, 4])
def test_greedy_at_every_split_equals_one_device_and_transformers(tiny_tp, tp):
    expected = [tiny_tp.greedy(p, GREEDY.max_tokens)[0] for p in PROMPTS]
    assert tokens(small_llm(tiny_tp.path, 1)) == expected
    assert tokens(small_llm(tiny_tp.path, tp)) == expected


def shard_shapes(array) -> list[tuple[int, ...]]:
    return sorted(tuple(s.data.shape) for s in array.addressable_shards)


@pytest.mark.parametrize("tp", [2, 4])
def test_each_device_holds_a_tp_th_of_the_layer_weights(tiny_tp, tp):
    llm = small_llm(tiny_tp.path, tp)
    layer = llm.model.params["layers"][0]
    for name, axis in (("qkv", 1), ("gate_up", 1), ("o", 0), ("down", 0)):
        w = layer[name]
        cut = list(w.shape)
        cut[axis] //= tp
        assert shard_shapes(w) == [tuple(cut)] * tp, name
        assert {s.device for s in w.addressable_shards} == set(llm.backend.mesh.devices.flat)
    # over every layer weight: each device holds 1/tp of the bytes (the norms are whole)
    per_device: dict = {}
    total = 0
    for layer in llm.model.params["layers"]:
        for w in jax.tree_util.tree_leaves(layer):
            total += w.nbytes
            for s in w.addressable_shards:
                per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    norms = sum(w.nbytes for layer in llm.model.params["layers"] for w in
                (layer["attn_norm"], layer["mlp_norm"]))  # fmt: skip
    for held in per_device.values():
        assert held == (total - norms) // tp + norms
    # the vocabulary: the embedding by rows, the head by columns; the K/V pools by KV head
    assert shard_shapes(llm.model.params["embed"]) == [(160 // tp, 64)] * tp
    k_pool = llm.engine.runner.kv_caches[0][0]
    kv_heads, slots, head_dim = k_pool.shape
    assert shard_shapes(k_pool) == [(kv_heads // tp, slots, head_dim)] * tp


def test_the_pools_stay_split_after_steps(tiny_tp):
    llm = small_llm(tiny_tp.path, 2)
    tokens(llm)
    k_pool = llm.engine.runner.kv_caches[1][1]
    assert shard_shapes(k_pool) == [(2, k_pool.shape[1], k_pool.shape[2])] * 2
    assert llm.backend.compilations() > 0


def test_kv_heads_that_do_not_divide_keep_the_pools_whole_and_say_so(tiny_llama, capsys):
    # the conftest Llama has 2 KV heads: at 4 devices its K/V pools are whole on each device
    tm = tiny_llama("tp_llama_kv2", seed=5)
    llm = LLM(str(tm.path), backend="jax", tensor_parallel_size=4, block_size=4)
    assert "whole on every device, as they do not divide by 4" in capsys.readouterr().err
    k_pool = llm.engine.runner.kv_caches[0][0]
    assert shard_shapes(k_pool) == [tuple(k_pool.shape)] * 4
    assert shard_shapes(llm.model.params["layers"][0]["down"]) == [(112 // 4, 64)] * 4
    expected = [tm.greedy(p, GREEDY.max_tokens)[0] for p in PROMPTS]
    assert tokens(llm) == expected


def test_smollm2_greedy_at_two_devices_equals_one(default_gguf, capsys):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=24)
    one = tokens(LLM(str(default_gguf), backend="jax", verbose=False), prompts, params)
    llm = LLM(str(default_gguf), backend="jax", tensor_parallel_size=2)
    # 9 query heads over 3 KV heads: the weights split (widths 960, 576, 3072, 1536 and the
    # vocabulary divide by 2), the K/V pools do not and are whole on both devices
    err = capsys.readouterr().err
    assert "tensor_parallel_size=2" in err and "K/V pools of 3 KV heads" in err
    assert tokens(llm, prompts, params) == one
    assert "Paris" in llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].text


def test_bad_sizes_are_refused_with_the_fix():
    with pytest.raises(BackendError, match=r"needs the jax backend.*backend='jax'"):
        get_backend("numpy", tensor_parallel_size=2)
    with pytest.raises(BackendError, match=r"tensor_parallel_size=8, but jax sees 4 cpu"):
        get_backend("jax", tensor_parallel_size=8)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0 must be a positive integer"):
        get_backend("jax", tensor_parallel_size=0)


def test_cli_splits_the_default_model(default_gguf):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "nanovllm", "--backend", "jax", "--tensor-parallel-size", "2",
         "--model", str(default_gguf), "--max-tokens", "8", "The capital of France is"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    assert "tensor_parallel_size=2" in run.stderr
