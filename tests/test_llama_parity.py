"""Llama family against transformers on tiny random checkpoints saved by transformers itself.

Each case varies one architecture knob (GQA, MQA, rope scaling, tied embeddings, biases, an
explicit head_dim). For each, prompt logprobs at every position match transformers'
log_softmax(logits) within 1e-4, and greedy continuations through the paged, batched engine
(small blocks, chunked prefill, prefix-cache hits, preemption) equal transformers' greedy
tokens computed by full recomputation without a KV cache.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams

TOL = 1e-4
VOCAB = 160  # conftest.TINY_LLAMA

CASES = {
    "gqa": dict(seed=0),
    "mha": dict(seed=1, num_key_value_heads=4),
    "mqa_tied": dict(seed=2, num_key_value_heads=1, tie_word_embeddings=True),
    "llama3_rope": dict(
        seed=3,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "linear_rope": dict(
        seed=4, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
    ),
    "bias_tied": dict(seed=5, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "head_dim": dict(seed=6, head_dim=24, num_attention_heads=4, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_llama):
    return tiny_llama(request.param, **CASES[request.param])


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def make_llm(case, backend: str, **kwargs) -> LLM:
    return LLM(str(case.path), backend=backend, verbose=False, **kwargs)


def check_prompt_logprobs(check, case, out, k: int) -> None:
    ids = out.prompt_token_ids
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids), (len(plp or []), len(ids))
    assert plp[0] is None
    ref = case.log_softmax(ids)
    for p in range(1, len(ids)):
        check(plp[p], ref[p - 1], k, ids[p], f"prompt of {len(ids)}, position {p}", TOL)


def check_greedy(case, out, max_tokens: int, check=None, k: int | None = None) -> None:
    prompt = out.prompt_token_ids
    want, rows = case.greedy(prompt, max_tokens)
    got = out.outputs[0]
    assert got.token_ids == want, f"prompt of {len(prompt)} tokens {prompt}"
    assert got.finish_reason == "length"
    if k is not None:
        assert len(got.logprobs) == max_tokens
        for i, (entries, token) in enumerate(zip(got.logprobs, want)):
            check(entries, rows[i], k, token, f"prompt of {len(prompt)}, output {i}", TOL)
            assert entries[token].rank == 1


def test_prompt_logprobs(case, backend, check_logprobs):
    """Chunked prefill (16 tokens a step, blocks of 4), several prompts in one batch."""
    llm = make_llm(case, backend, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    batch = prompts(10, [1, 2, 7, 16, 33, 21])
    ks = [5, 5, 0, 5, 3, 20]
    params = [
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k, ignore_eos=True) for k in ks
    ]
    outs = llm.generate(batch, params, use_tqdm=False)
    for out, k, prompt in zip(outs, ks, batch, strict=True):
        assert out.prompt_token_ids == prompt
        check_prompt_logprobs(check_logprobs, case, out, k)


def test_prompt_logprobs_of_a_chunk_cut_into_causal_query_blocks(
    case, backend, check_logprobs, monkeypatch
):
    """A prefill chunk longer than PREFILL_QUERY_BLOCK attends in query blocks, each over the
    keys up to its last query (the eager backends' layout): every position still matches."""
    from nanovllm.runner import model_runner

    monkeypatch.setattr(model_runner, "PREFILL_QUERY_BLOCK", 16)
    llm = make_llm(case, backend, block_size=4)
    batch = prompts(11, [100, 37])  # one chunk each: 7 and 3 query blocks
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5, ignore_eos=True)
    for out in llm.generate(batch, params, use_tqdm=False):
        check_prompt_logprobs(check_logprobs, case, out, 5)


def test_greedy_default_engine(case, backend, check_logprobs):
    llm = make_llm(case, backend)
    batch = prompts(20, [1, 6, 19, 40])
    outs = llm.generate(
        batch,
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
        use_tqdm=False,
    )
    for out in outs:
        check_greedy(case, out, 12, check_logprobs, k=3)


def test_greedy_chunked_prefix_cache(case, backend):
    """Blocks of 4, 16 tokens a step, prompts sharing a 3-block prefix with earlier ones."""
    llm = make_llm(case, backend, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    bm = llm.engine.scheduler.block_manager
    shared, tail_a, tail_b, tail_c, other, one = prompts(30, [14, 6, 9, 3, 7, 1])
    a, b, c = shared + tail_a, shared + tail_b, shared[:12] + tail_c
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    first = llm.generate([a, other, one], params, use_tqdm=False)
    hits = bm.prefix_cache_hits
    second = llm.generate([b, c, a, other], params, use_tqdm=False)
    assert bm.prefix_cache_hits - hits >= 6, (  # b and c reuse a's first 3 blocks at least
        f"prefix cache hits went {hits} -> {bm.prefix_cache_hits}"
    )
    # within one call too: d follows e's sealed blocks while e still runs
    shared2, tail_d, tail_e = prompts(31, [17, 5, 8])
    hits = bm.prefix_cache_hits
    third = llm.generate([shared2 + tail_e, shared2 + tail_d], params, use_tqdm=False)
    assert bm.prefix_cache_hits > hits, "no prefix-cache hit between requests of one batch"
    for out in first + second + third:
        check_greedy(case, out, 10)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "nocache"])
def test_greedy_preemption(case, backend, check_logprobs, prefix_caching):
    """12 usable blocks of 4 for 4 requests that need ~29 together: some must be preempted."""
    llm = make_llm(
        case,
        backend,
        block_size=4,
        num_kv_blocks=13,
        max_model_len=48,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        enable_prefix_caching=prefix_caching,
    )
    batch = prompts(40, [9, 14, 20, 25, 3])
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) for _ in batch]
    params[2] = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2, logprobs=2
    )
    outs = llm.generate(batch, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the tiny KV pool forced no preemption"
    for i, out in enumerate(outs):
        check_greedy(case, out, 12, check_logprobs, k=2 if i == 2 else None)
    check_prompt_logprobs(check_logprobs, case, outs[2], 2)
    # every block is back in the pool once all requests finished
    assert llm.engine.scheduler.block_manager.num_free_blocks == 12


def test_greedy_n_samples_share_the_prompt(case, backend):
    """n=3 greedy samples: siblings reuse sample 0's prompt blocks and all equal the reference."""
    llm = make_llm(case, backend, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    bm = llm.engine.scheduler.block_manager
    batch = prompts(60, [18, 5])
    outs = llm.generate(
        batch, SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert bm.prefix_cache_hits >= 2 * (17 // 4), "siblings did not reuse the prompt's blocks"
    for out in outs:
        want, _ = case.greedy(out.prompt_token_ids, 8)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == want for c in out.outputs), [c.token_ids for c in out.outputs]


def test_rope_scaling_is_exercised(tiny_llama):
    """The rope cases would be vacuous if scaling did not change the logits at these positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = prompts(50, [40])[0]
    for name in ("llama3_rope", "linear_rope"):
        scaled = tiny_llama(name, **CASES[name])
        base_cfg = scaled.model.config.to_dict()
        base_cfg["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": base_cfg["rope_parameters"]["rope_theta"],
        }
        plain = LlamaForCausalLM(LlamaConfig(**base_cfg)).float().eval()
        plain.load_state_dict(scaled.model.state_dict())
        with torch.no_grad():
            diff = plain(torch.tensor([ids])).logits - scaled.model(torch.tensor([ids])).logits
        assert diff.abs().max().item() > 1e-2, name
