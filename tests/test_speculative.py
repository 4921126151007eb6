"""Speculative decoding by n-gram prompt lookup: the same outputs as decoding one token a step.

Proposals are checked in one forward pass, sampled at every proposed position as if the tokens
had come one by one, so greedy text equals transformers' and plain decoding's, a seeded request
gives the same tokens, an unseeded one the same distribution, and penalties, min_tokens, stop
strings, max_tokens, logprobs and grammars act at the position they would have. The tiny Llama
(a trained tokenizer, random weights saved by transformers) repeats itself, so its proposals
are often right and sometimes wrong: both paths run.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig, SpeculativeConfig

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}  # fmt: skip
PROMPTS = [
    [7, 30, 55, 80, 101, 7, 30, 55],
    [3, 4, 5, 6, 7, 8, 9, 10, 3, 4, 5, 6, 7],
    [99],
    [140, 141, 142, 140, 141],
    [12, 13, 12, 13, 12, 13, 12],
    [50, 60, 70, 80, 90, 100, 110, 120, 130, 50, 60, 70],
]


def make_llm(tiny, backend, spec=None, **kw) -> LLM:
    kw = {"max_num_seqs": 64, "max_num_batched_tokens": 256, **kw}
    return LLM(str(tiny.path), backend=backend, verbose=False, speculative_config=spec, **kw)


@pytest.fixture(scope="module")
def plain(tiny, backend):
    return make_llm(tiny, backend)


@pytest.fixture(scope="module")
def spec(tiny, backend):
    return make_llm(tiny, backend, SPEC)


@pytest.fixture(autouse=True)
def engines_left_idle(request):
    """Whatever a test did, every block is free again and nothing is left running."""
    yield
    for name in ("plain", "spec"):
        if name in request.fixturenames:
            llm = request.getfixturevalue(name)
            sched = llm.engine.scheduler
            assert not llm.engine.requests and not sched.running and not sched.waiting
            assert sched.block_manager.num_free_blocks == llm.config.num_kv_blocks - 1


def run(llm: LLM, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def counts(llm: LLM) -> tuple[int, int]:
    s = llm.engine.scheduler
    return s.num_draft_tokens, s.num_accepted_tokens


def test_greedy_equals_transformers_with_proposals_accepted_and_rejected(spec, tiny):
    drafted, accepted = counts(spec)
    outs = run(spec, PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == tiny.greedy(prompt, 24)[0], prompt
    drafted, accepted = counts(spec)[0] - drafted, counts(spec)[1] - accepted
    assert 0 < accepted < drafted, (drafted, accepted)  # both paths ran


def mixed_params() -> list[SamplingParams]:
    """Eight requests that each use something applied per position."""
    return [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=20),
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=1.0, top_k=5, seed=7, max_tokens=16, n=2),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),  # fewer than k + 1
        SamplingParams(temperature=0, max_tokens=20, logprobs=3),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=10, stop_token_ids=[5, 9]),
        SamplingParams(temperature=0.7, min_p=0.1, seed=3, max_tokens=18, logprobs=2),
    ]  # fmt: skip


def test_a_mixed_batch_gives_the_same_outputs_as_plain_decoding(plain, spec):
    params = mixed_params()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    drafted = counts(spec)[0]
    want, got = run(plain, prompts, params), run(spec, prompts, params)
    assert counts(spec)[0] > drafted
    for w, g in zip(want, got):
        for a, b in zip(w.outputs, g.outputs, strict=True):
            assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (
                a.token_ids, a.text, a.finish_reason, a.stop_reason
            ), w.request_id  # fmt: skip
            if a.logprobs is not None:
                assert len(b.logprobs) == len(a.logprobs)
                for pa, pb in zip(a.logprobs, b.logprobs):
                    assert pa.keys() == pb.keys()
                    for t in pa:
                        assert pb[t].rank == pa[t].rank
                        assert abs(pb[t].logprob - pa[t].logprob) < 1e-4
                assert abs(b.cumulative_logprob - a.cumulative_logprob) < 1e-3


def test_each_request_of_the_batch_alone_gives_its_batched_output(spec):
    params = mixed_params()[:4]
    prompts = PROMPTS[:4]
    together = run(spec, prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        alone = run(spec, [prompt], p)[0]
        assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in out.outputs]


def test_stop_strings_and_max_tokens_cut_an_accepted_run(plain, spec, pick_stop):
    prompt = PROMPTS[4]
    free = run(plain, [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    stop = pick_stop(free[0].outputs[0].text)
    for params in (
        SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
        *(SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 5, 6)),
    ):
        want, got = run(plain, [prompt], params)[0], run(spec, [prompt], params)[0]
        assert (got.outputs[0].text, got.outputs[0].token_ids, got.outputs[0].finish_reason) == (
            want.outputs[0].text, want.outputs[0].token_ids, want.outputs[0].finish_reason
        )  # fmt: skip
        if params.max_tokens < 24:
            assert len(got.outputs[0].token_ids) == params.max_tokens


@pytest.mark.parametrize("max_len", [16, 21])
def test_a_fully_accepted_run_up_to_max_model_len_keeps_every_token(
    tiny, backend, monkeypatch, max_len
):
    """An oracle proposes plain decoding's own continuation, so every proposal is accepted and
    runs end exactly where max_model_len is reached: all their tokens are kept."""
    import nanovllm.engine.scheduler as scheduler

    prompt, params = PROMPTS[0], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    want = run(make_llm(tiny, backend, max_model_len=max_len), [prompt], params)[0]
    full = prompt + want.outputs[0].token_ids
    assert len(full) == max_len

    def oracle(ids, k, n_min, n_max):
        assert ids == full[: len(ids)]
        return full[len(ids) : len(ids) + k]

    monkeypatch.setattr(scheduler, "propose", oracle)
    llm = make_llm(tiny, backend, SPEC, max_model_len=max_len)
    got = run(llm, [prompt], params)[0].outputs[0]
    assert (got.token_ids, got.finish_reason) == (want.outputs[0].token_ids, "length")
    drafted, accepted = counts(llm)
    assert drafted == accepted > 0


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value that df degrees of freedom exceed with probability ~0.001
    (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_unseeded_samples_follow_the_same_distribution(plain, spec):
    """Two-sample chi-square over the 2nd and 3rd sampled tokens of 300 unseeded samples
    each: speculation changes how a token is reached, never which tokens and how often. The
    prompt holds half the vocabulary, so a sampled token is often found in it."""
    prompt = list(range(0, 160, 2))
    params = SamplingParams(temperature=1.0, top_k=8, max_tokens=4, n=300, ignore_eos=True)
    drafted = counts(spec)[0]
    samples = {}
    for name, llm in (("plain", plain), ("spec", spec)):
        outs = run(llm, [prompt], params)[0].outputs
        samples[name] = [tuple(o.token_ids[1:]) for o in outs]
    assert counts(spec)[0] - drafted > 300, "the samples were meant to be proposed for"
    for position in (0, 1):
        a = Counter(s[position] for s in samples["plain"])
        b = Counter(s[position] for s in samples["spec"])
        # tokens seen fewer than 10 times in all go into one bin
        common = [t for t in a.keys() | b.keys() if a[t] + b[t] >= 10]
        rare = [t for t in a.keys() | b.keys() if a[t] + b[t] < 10]
        rows = [(a[t], b[t]) for t in common] + [(sum(a[t] for t in rare), sum(b[t] for t in rare))]
        rows = [r for r in rows if sum(r) > 0]
        stat = sum((x - y) ** 2 / (x + y) for x, y in rows)  # equal sample sizes
        assert len(rows) >= 3, rows
        assert stat < chi_square_critical(len(rows) - 1), (position, stat, rows)


def test_seeded_samples_are_the_same_tokens_with_and_without_speculation(plain, spec):
    params = SamplingParams(temperature=1.0, seed=42, n=4, max_tokens=20, ignore_eos=True)
    want, got = run(plain, PROMPTS[:3], params), run(spec, PROMPTS[:3], params)
    for w, g in zip(want, got):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs]


def test_preemption_and_the_prefix_cache_keep_outputs(tiny, backend, plain):
    """A pool of 12 blocks of 4 tokens for 8 samples of 20-30 tokens: sequences are
    preempted and recomputed, and repeated prompts hit the prefix cache, while proposals are
    reserved and given back."""
    small = make_llm(tiny, backend, SPEC, block_size=4, num_kv_blocks=12, max_model_len=40)
    prompts = [PROMPTS[1], PROMPTS[5], PROMPTS[1], PROMPTS[5]] * 2
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = run(small, prompts, params)
    want = run(plain, prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    sched = small.engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_accepted_tokens > 0
    assert sched.block_manager.prefix_cache_hits > 0
    assert sched.block_manager.num_free_blocks == small.config.num_kv_blocks - 1


def test_a_constrained_answer_is_the_same_with_speculation(plain, spec):
    from nanovllm.sampling_params import StructuredOutputsParams

    params = SamplingParams(
        temperature=0,
        max_tokens=30,
        structured_outputs=StructuredOutputsParams(regex=r"(the cat|on the mat|sat ){2,8}"),
    )
    prompt = "the cat sat on the mat the cat sat on the mat the cat"
    drafted = counts(spec)[0]
    want, got = run(plain, [prompt], params)[0], run(spec, [prompt], params)[0]
    assert got.outputs[0].text == want.outputs[0].text
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert counts(spec)[0] > drafted


def test_proposals_are_counted_and_printed_at_start_up(tiny, backend, capsys):
    LLM(str(tiny.path), backend=backend, speculative_config=SPEC)
    assert "ngram speculation: 4 tokens, lookup 1-3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, words",
    [
        ({"method": "eagle"}, "method='eagle' is not supported"),
        ({"model": "small.gguf"}, "a draft model is not supported"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens=0 must be an integer in [1, 16]"),
        ({"num_speculative_tokens": 99}, "num_speculative_tokens=99"),
        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min=4 is above"),
        ({"k": 4}, "unknown keys ['k']"),
        ("not json", "is not JSON"),
        ([4], "must be a dict, not list"),
    ],
)
def test_a_bad_speculative_config_is_refused_before_loading(value, words):
    with pytest.raises(ValueError) as e:
        LLM("/no/such/model", speculative_config=value)
    assert words in str(e.value)


def test_speculation_is_refused_where_it_cannot_be_exact():
    with pytest.raises(ValueError, match="not supported with batch_invariant=True"):
        LLM("/no/such/model", speculative_config=SPEC, batch_invariant=True)
    with pytest.raises(ValueError, match="not supported for models with Mamba layers"):
        EngineConfig(num_state_slots=2, enable_prefix_caching=False,
                     speculative=SpeculativeConfig())  # fmt: skip


def test_one_lookup_size_given_alone_sets_the_other():
    assert SpeculativeConfig.parse({"prompt_lookup_max": 1}).prompt_lookup_min == 1
    assert SpeculativeConfig.parse({"prompt_lookup_min": 6}).prompt_lookup_max == 6
    assert SpeculativeConfig.parse('{"method": "ngram"}') == SpeculativeConfig(4, 4, 2)


def test_ngram_proposals():
    from nanovllm.engine.ngram import propose

    # the latest earlier occurrence of the longest suffix wins
    assert propose([1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3], 2, 1, 3) == [8, 1]
    assert propose([1, 2, 3, 4, 5, 1, 2], 10, 2, 2) == [3, 4, 5, 1, 2]
    assert propose([1, 2, 3], 4, 1, 3) == []  # nothing repeats
    assert propose([5, 5], 4, 1, 1) == [5]
    assert propose([1, 2, 1, 2], 0, 1, 2) == []
    # a byte pattern across two tokens is no match: 65536, 0 hold 1's bytes at an odd offset
    assert propose([1, 9, 65536, 0, 1], 3, 1, 1) == [9, 65536, 0]
    rng = np.random.default_rng(0)
    for _ in range(200):  # against a direct search
        ids = rng.integers(0, 4, rng.integers(1, 30)).tolist()
        want: list[int] = []
        for n in range(3, 0, -1):
            starts = [i for i in range(len(ids) - n) if ids[i : i + n] == ids[len(ids) - n :]]
            if n < len(ids) and starts:
                want = ids[starts[-1] + n : starts[-1] + n + 3]
                break
        assert propose(ids, 3, 1, 3) == want, ids
