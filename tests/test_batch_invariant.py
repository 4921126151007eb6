"""LLM(..., batch_invariant=True): a request's tokens and logprobs are the same bits whatever else
runs beside it, however its prompt is chunked, after a prefix-cache hit and after a preemption.

Each check compares sampled tokens (seeded, temperature > 0) and the logprob of every returned
entry for exact equality, which the default mode does not give: there BLAS sums a row in an order
set by how many rows the step has (README.md, "What a seed guarantees").
"""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams

VOCAB = 160
SHARED = list(range(20, 52))  # a 32-token prefix two prompts share (8 blocks of 4)


@pytest.fixture(scope="module", params=["llama", "mistral_window", "gpt2"])
def model(request, tiny_llama, tmp_path_factory):
    if request.param == "llama":
        return str(tiny_llama("gqa", seed=0).path)
    from test_arch_parity import CASES, build  # the same tiny checkpoints as the parity tests

    name = {"mistral_window": "mistral", "gpt2": "gpt2"}[request.param]
    config_cls, model_cls, seed, kwargs = CASES[name]
    if name == "mistral":
        # a window of 48 (across the 64-key tiles): long enough that sequences keep enough
        # blocks for the small pool below to force preemptions (blocks out of the window
        # are freed)
        kwargs = kwargs | {"sliding_window": 48}
    return str(build(tmp_path_factory.mktemp(name), config_cls, model_cls, seed, kwargs).path)


def requests() -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 1 to 90 tokens (key tiles are 64: the long ones span two), two of them
    sharing a prefix; seeded sampling with logprobs, and prompt logprobs on some."""
    rng = np.random.default_rng(7)
    lengths = [3, 17, 90, 40, 1, 66, 25, 70]
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]
    prompts[3], prompts[6] = SHARED + prompts[3][:8], SHARED + prompts[6][:20]
    params = [
        SamplingParams(
            temperature=0.9,
            top_p=0.95,
            seed=100 + i,
            max_tokens=10,
            ignore_eos=True,
            logprobs=2,
            prompt_logprobs=1 if i in (2, 5) else None,
        )
        for i in range(len(prompts))
    ]
    return prompts, params


def results(outs) -> list[tuple]:
    """Per request: its tokens, and (token, logprob, rank) of every sample and prompt entry."""

    def entries(steps):
        return [
            sorted((t, lp.logprob, lp.rank) for t, lp in step.items()) if step else None
            for step in steps or []
        ]

    return [
        (o.outputs[0].token_ids, entries(o.outputs[0].logprobs), entries(o.prompt_logprobs))
        for o in outs
    ]


def make(model: str, backend: str, **options) -> LLM:
    settings = dict(
        batch_invariant=True,
        block_size=4,
        max_model_len=112,
        max_num_seqs=6,
        max_num_batched_tokens=40,
    )
    return LLM(model, backend=backend, verbose=False, **(settings | options))


def test_seeded_requests_are_identical_batched_repeated_alone_and_preempted(model, backend):
    prompts, params = requests()
    llm = make(model, backend)
    bm = llm.engine.scheduler.block_manager
    batched = results(llm.generate(prompts, params, use_tqdm=False))
    assert bm.prefix_cache_hits > 0  # the shared prefix
    hits = bm.prefix_cache_hits
    # again on the same engine: now prompts start with a prefix-cache hit
    assert results(llm.generate(prompts, params, use_tqdm=False)) == batched
    assert bm.prefix_cache_hits > hits + 8
    # one at a time, each prompt in a single chunk, nothing cached
    alone = make(model, backend, enable_prefix_caching=False, max_num_batched_tokens=112)
    for i in range(len(prompts)):
        assert results(alone.generate([prompts[i]], [params[i]], use_tqdm=False)) == [batched[i]], (
            f"request {i} alone differs from the same request batched"
        )
    # a KV pool too small for the batch: sequences are preempted and recomputed
    small = make(model, backend, num_kv_blocks=40, max_num_batched_tokens=24)
    assert results(small.generate(prompts, params, use_tqdm=False)) == batched
    assert small.engine.scheduler.num_preemptions > 0, "the small KV pool forced no preemption"


@pytest.mark.parametrize("model", ["llama", "mistral_window"], indirect=True)
def test_greedy_matches_the_default_mode_tokens(model, backend):
    """The mode changes how sums are ordered, not what is computed: greedy tokens agree with
    the default engine wherever the top two logprobs are not within float error (the attention
    layout is what the mode changes most: a full and a windowed model)."""
    prompts, _ = requests()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    invariant = make(model, backend).generate(prompts, params, use_tqdm=False)
    default = make(model, backend, batch_invariant=False).generate(prompts, params, use_tqdm=False)
    for a, b in zip(invariant, default):
        for step, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)):
            lp_a, lp_b = a.outputs[0].logprobs[step], b.outputs[0].logprobs[step]
            assert abs(lp_a[x].logprob - lp_b[x].logprob) < 1e-4
            if x != y:  # a near-tie: both choices are within float error of each other
                assert abs(lp_b[x].logprob - lp_b[y].logprob) < 1e-4
                break


def test_the_flag_must_be_a_bool(model, backend):
    with pytest.raises(TypeError, match=r"batch_invariant='yes' must be True or False"):
        make(model, backend, batch_invariant="yes")
