"""One LLM shared by many callers: threads calling generate, interleaved streams, and requests
added straight to the engine, each getting exactly its own outputs (greedy, checked against
transformers' greedy tokens for the same tiny checkpoint; with batch_invariant=True, random
requests from threads equal themselves run alone, bit for bit)."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm import LLM, SamplingParams

PROMPTS = [
    [7, 30, 55, 80, 101],
    [3, 4, 5, 6, 7, 8, 9],
    [99],
    [140, 141, 142],
    [20, 21, 22],
    [60, 61, 62, 63],
    [11, 12],
    [90, 80, 70, 60, 50, 40],
]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny, backend):
    return LLM(
        str(tiny.path), backend=backend, verbose=False, max_num_seqs=4, max_num_batched_tokens=64
    )


@pytest.fixture(autouse=True)
def engine_left_idle(llm):
    yield
    assert not llm.engine.requests and not llm._outputs
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.config.num_kv_blocks - 1


def tokens(out) -> list[int]:
    return out.outputs[0].token_ids


def test_generate_beside_a_request_added_to_the_engine(llm, tiny):
    rid = llm.engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=1))
    out = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
    assert tokens(out[0]) == tiny.greedy(PROMPTS[0], 10)[0]
    other = llm.take_output(rid)  # its output was kept for it
    assert other.finished and tokens(other) == tiny.greedy([5, 6, 7], 1)[0]
    again = llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)  # and the LLM still works
    assert tokens(again[0]) == tiny.greedy(PROMPTS[1], 10)[0]


def test_a_thread_pool_of_8_gets_what_each_request_gets_alone(llm, tiny):
    def one(prompt):
        return tokens(llm.generate([prompt], GREEDY, use_tqdm=False)[0])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, PROMPTS * 3))
    assert results == [tiny.greedy(p, 10)[0] for p in PROMPTS * 3]


def test_threads_mixing_generate_chat_and_stream(llm, tiny):
    def work(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 3 == 0:
            return "".join(llm.stream(prompt, GREEDY)), prompt
        return llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].text, prompt

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(work, range(12)))
    for text, prompt in results:
        assert text == llm.tokenizer.decode(tiny.greedy(prompt, 10)[0])


def test_two_interleaved_streams_both_finish_with_their_own_text(llm, tiny):
    a = llm.stream(PROMPTS[0], GREEDY)
    b = llm.stream(PROMPTS[3], GREEDY)
    texts = {"a": "", "b": ""}
    for da, db in itertools.zip_longest(a, b, fillvalue=""):
        texts["a"] += da
        texts["b"] += db
    assert texts["a"] == llm.tokenizer.decode(tiny.greedy(PROMPTS[0], 10)[0])
    assert texts["b"] == llm.tokenizer.decode(tiny.greedy(PROMPTS[3], 10)[0])


def test_a_stream_dropped_half_way_leaves_the_others_whole(llm, tiny):
    a = llm.stream(PROMPTS[1], GREEDY)
    b = llm.stream(PROMPTS[2], GREEDY)
    next(a)
    next(b)
    a.close()  # aborts its request
    rest = "".join(b)
    full = llm.tokenizer.decode(tiny.greedy(PROMPTS[2], 10)[0])
    assert full.endswith(rest) and rest


@pytest.fixture(scope="module")
def invariant_llm(tiny, backend):
    return LLM(
        str(tiny.path),
        backend=backend,
        verbose=False,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        batch_invariant=True,
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(3, 150), min_size=1, max_size=9),
            st.integers(1, 8),
            st.sampled_from([None, 0, 1]),
            st.booleans(),
        ),
        min_size=2,
        max_size=8,
    )
)
def test_threads_with_random_requests_and_aborts_each_get_what_they_get_alone(
    invariant_llm, requests
):
    """batch_invariant=True: each thread's result equals the same request run alone afterwards,
    bit for bit, whatever ran beside it (greedy, or sampling with a seed)."""
    llm = invariant_llm

    def params(max_tokens, seed):
        if seed is None:
            return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
        return SamplingParams(
            temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True, logprobs=1
        )

    def result(out):
        steps = out.outputs[0].logprobs
        return tokens(out), [sorted((t, lp.logprob) for t, lp in s.items()) for s in steps]

    def one(request):
        prompt, max_tokens, seed, abort = request
        if abort:  # a caller that gives up after its first piece of text
            stream = llm.stream(prompt, params(max_tokens, seed))
            next(stream, None)
            stream.close()
            return None
        return result(llm.generate([prompt], params(max_tokens, seed), use_tqdm=False)[0])

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(one, requests))
    for (prompt, max_tokens, seed, abort), got in zip(requests, results):
        if not abort:
            alone = llm.generate([prompt], params(max_tokens, seed), use_tqdm=False)[0]
            assert got == result(alone)
    assert not llm.engine.requests and not llm._outputs
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.config.num_kv_blocks - 1
