"""Sampling: greedy, seeds, n, top-k / top-p / min-p, the sampled distribution, penalties,
stop conditions, and SamplingParams validation.

References come from transformers' logits on the same prefix (a tiny random Llama saved by
transformers) with vLLM's formulas applied on the host.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams

PROMPT = [7, 30, 55, 80, 101]
OTHER_PROMPTS = [
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [99],
    [140, 141, 142],
]


@pytest.fixture(scope="module")
def llm(tiny, backend):
    return LLM(
        str(tiny.path),
        backend=backend,
        verbose=False,
        max_num_seqs=128,
        max_num_batched_tokens=1024,
    )


@pytest.fixture(autouse=True)
def engine_left_idle(request):
    yield
    if "llm" in request.fixturenames:
        llm = request.getfixturevalue("llm")
        assert not llm.engine.requests
        assert not llm.engine.scheduler.waiting and not llm.engine.scheduler.running
        assert llm.engine.scheduler.block_manager.num_free_blocks == llm.config.num_kv_blocks - 1


def generate(llm: LLM, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def tokens(llm: LLM, prompt: list[int], **kw) -> list[int]:
    return generate(llm, [prompt], SamplingParams(**kw))[0].outputs[0].token_ids


# ---- greedy and seeds ------------------------------------------------------------------------


def test_temperature_zero_is_greedy_argmax_of_transformers(llm, tiny):
    for prompt in [PROMPT, *OTHER_PROMPTS]:
        assert tokens(llm, prompt, temperature=0.0, max_tokens=12) == tiny.greedy(prompt, 12)[0]


def test_temperature_zero_ignores_seed_and_filters(llm, tiny):
    want = tiny.greedy(PROMPT, 8)[0]
    assert tokens(llm, PROMPT, temperature=0.0, seed=5, top_k=3, top_p=0.5, max_tokens=8) == want


def test_seeded_sampling_is_reproducible(llm):
    a = tokens(llm, PROMPT, temperature=1.0, seed=42, max_tokens=16)
    b = tokens(llm, PROMPT, temperature=1.0, seed=42, max_tokens=16)
    assert a == b


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    alone = tokens(llm, PROMPT, temperature=0.9, seed=42, max_tokens=16)
    noise = SamplingParams(temperature=1.0, max_tokens=20)  # unseeded: draws from the LLM's rng
    batch = [[1, 2, 3], PROMPT, *OTHER_PROMPTS]
    params = [
        noise,
        SamplingParams(temperature=0.9, seed=42, max_tokens=16),
        *[SamplingParams(temperature=1.0, max_tokens=m) for m in (3, 30, 7)],
    ]
    outs = generate(llm, batch, params)
    assert outs[1].outputs[0].token_ids == alone
    # and queued behind other running requests rather than first in the batch
    outs = generate(
        llm,
        [*OTHER_PROMPTS, PROMPT],
        [noise] * 3 + [SamplingParams(temperature=0.9, seed=42, max_tokens=16)],
    )
    assert outs[-1].outputs[0].token_ids == alone


def test_seeded_sampling_is_not_greedy(llm, tiny):
    sampled = tokens(llm, PROMPT, temperature=1.0, seed=42, max_tokens=16)
    assert sampled != tiny.greedy(PROMPT, 16)[0]


def test_different_seeds_give_different_tokens(llm):
    runs = {tuple(tokens(llm, PROMPT, temperature=1.0, seed=s, max_tokens=10)) for s in range(6)}
    assert len(runs) == 6


CDF_MARGIN = 1e-5  # backends round probabilities differently by ~1e-6


def test_seeded_sampling_same_tokens_as_numpy_backend(llm, tiny, backend):
    """The same seed gives the same tokens on every backend, near-ties aside.

    A token is picked where the host-drawn uniform u falls in the CDF of the filtered
    probabilities, so rounding differences between backends can change a pick only when u
    lies within CDF_MARGIN of a CDF boundary. Such a step (found from transformers' logits)
    is a near-tie: the comparison stops there. Before it, the tokens must be identical.
    """
    if backend == "numpy":
        pytest.skip("compares another backend with numpy")
    ref = LLM(str(tiny.path), backend="numpy", verbose=False)
    filt = dict(temperature=0.8, top_k=40)
    compared = 0
    for seed in (7, 8, 9):
        p = dict(seed=seed, max_tokens=12, **filt)
        got, want = tokens(llm, PROMPT, **p), tokens(ref, PROMPT, **p)
        for i in range(len(want)):
            probs = expected_probs(tiny.log_softmax(PROMPT + want[:i])[-1], **filt)
            cdf = np.cumsum(np.sort(probs)[::-1])  # the sampler's order under top-k
            u = np.random.default_rng([seed, 0, i]).random()
            if np.min(np.abs(cdf - u)) < CDF_MARGIN:
                break
            assert got[i] == want[i], f"seed {seed}, step {i}: {got} != {want}"
            compared += 1
    assert compared >= 24, "too many near-ties: choose other seeds"


def test_n_returns_n_outputs_indexed_in_order(llm):
    out = generate(llm, [PROMPT], SamplingParams(n=4, temperature=1.0, max_tokens=6))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)


def test_seeded_n_samples_differ_and_are_reproducible(llm):
    p = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10)
    first = [tuple(c.token_ids) for c in generate(llm, [PROMPT], p)[0].outputs]
    assert len(set(first)) == 4
    again = generate(llm, [OTHER_PROMPTS[0], PROMPT], [SamplingParams(max_tokens=4), p])[1]
    assert [tuple(c.token_ids) for c in again.outputs] == first


def test_greedy_n_samples_are_identical(llm, tiny):
    out = generate(llm, [PROMPT], SamplingParams(n=3, temperature=0.0, max_tokens=8))[0]
    assert [c.token_ids for c in out.outputs] == [tiny.greedy(PROMPT, 8)[0]] * 3


# ---- filters that collapse to greedy ----------------------------------------------------------


@pytest.mark.parametrize(
    "filt",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)],
    ids=["top_k=1", "top_p=1e-6", "min_p=1"],
)
def test_filter_that_keeps_one_token_equals_greedy(llm, tiny, filt):
    for seed in (1, 2):
        got = tokens(llm, PROMPT, temperature=1.0, seed=seed, max_tokens=12, **filt)
        assert got == tiny.greedy(PROMPT, 12)[0]


# ---- the sampled distribution --------------------------------------------------------------


def expected_probs(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """vLLM's order: temperature, min-p, then top-k and top-p on the sorted probabilities."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    sp = p[order]
    before = np.cumsum(sp) - sp
    kept = (np.arange(len(p)) < (top_k or len(p))) & (before < top_p * sp.sum())
    keep[order[kept]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over tokens expected >= 5 times, the rest pooled into one bin."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_bins = list(counts[big]) + [counts[~big].sum()]
    exp_bins = list(exp[big]) + [exp[~big].sum()]
    if exp_bins[-1] < 5:  # fold a tiny pooled bin into the smallest one
        obs_bins[-2] += obs_bins.pop()
        exp_bins[-2] += exp_bins.pop()
    o, e = np.array(obs_bins, float), np.array(exp_bins, float)
    return float(((o - e) ** 2 / e).sum()), len(e) - 1


DRAWS = 1500
CASES = {
    "plain": dict(temperature=1.0),
    "temp0.6": dict(temperature=0.6),
    "top_k5": dict(temperature=1.0, top_k=5),
    "top_p0.6": dict(temperature=1.0, top_p=0.6),
    "min_p0.1": dict(temperature=1.0, min_p=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_frequencies_follow_the_softmax(llm, tiny, case):
    kw = CASES[case]
    logits = tiny.log_softmax(PROMPT)[-1]  # log-softmax is logits up to a constant
    probs = expected_probs(logits, **kw)
    out = generate(llm, [PROMPT], SamplingParams(n=DRAWS, seed=2024, max_tokens=1, **kw))[0]
    drawn = np.array([c.token_ids[0] for c in out.outputs])
    counts = np.bincount(drawn, minlength=len(probs)).astype(float)
    outside = np.flatnonzero((probs == 0) & (counts > 0))
    assert outside.size == 0, f"sampled tokens {outside.tolist()} that {kw} excludes"
    tv = 0.5 * np.abs(counts / DRAWS - probs).sum()
    stat, df = chi_square(counts, probs)
    # ~1e-6 false alarm rate; always-argmax, an off-by-one token or a wrong temperature
    # give statistics in the hundreds or thousands
    limit = df + 7 * np.sqrt(2 * df) + 10
    assert stat < limit, f"chi-square {stat:.1f} >= {limit:.1f} (df={df}, TV={tv:.3f})"
    assert tv < 0.12
    if case == "plain":  # the test can tell a broken sampler apart
        greedy_counts = np.zeros_like(counts)
        greedy_counts[np.argmax(probs)] = DRAWS
        assert chi_square(greedy_counts, probs)[0] > limit


def test_unseeded_draws_vary(llm):
    out = generate(llm, [PROMPT], SamplingParams(n=40, max_tokens=3))[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 20


# ---- penalties ----------------------------------------------------------------------------


def penalised_greedy(tiny, prompt, steps, presence=0.0, frequency=0.0, repetition=1.0):
    """vLLM's formulas on transformers' logits: repetition over prompt + output tokens,
    frequency and presence over output tokens; then the argmax."""
    ids = list(prompt)
    for _ in range(steps):
        logits = raw_logits(tiny, ids)  # raw: the repetition penalty depends on the sign
        out = ids[len(prompt) :]
        seen = np.zeros(len(logits), bool)
        seen[ids] = True
        logits = np.where(
            seen, np.where(logits > 0, logits / repetition, logits * repetition), logits
        )
        counts = np.bincount(np.array(out, dtype=np.int64), minlength=len(logits))
        logits = logits - frequency * counts - presence * (counts > 0)
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt) :]


def raw_logits(tiny, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return tiny.model(torch.tensor([ids])).logits[0, -1].double().numpy()


PENALTIES = {
    "presence+": dict(presence_penalty=1.5),
    "presence-": dict(presence_penalty=-2.0),
    "frequency+": dict(frequency_penalty=2.0),
    "frequency-": dict(frequency_penalty=-1.0),
    "repetition1.5": dict(repetition_penalty=1.5),
    "repetition0.7": dict(repetition_penalty=0.7),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3),
}


@pytest.mark.parametrize("case", list(PENALTIES))
def test_penalties_match_the_vllm_formula(llm, tiny, case):
    kw = PENALTIES[case]
    ref = {
        "presence_penalty": "presence",
        "frequency_penalty": "frequency",
        "repetition_penalty": "repetition",
    }
    prompt = [40, 41, 40, 41, 40]
    want = penalised_greedy(tiny, prompt, 14, **{ref[k]: v for k, v in kw.items()})
    assert tokens(llm, prompt, temperature=0.0, max_tokens=14, ignore_eos=True, **kw) == want


def test_penalties_change_greedy_in_the_right_direction(llm, tiny):
    prompt = [40, 41, 40, 41, 40]
    plain = tokens(llm, prompt, temperature=0.0, max_tokens=24, ignore_eos=True)
    assert len(set(plain)) < len(plain), "the unpenalised greedy output should repeat"
    for kw in (
        dict(presence_penalty=2.0),
        dict(frequency_penalty=2.0),
        dict(repetition_penalty=3.0),
    ):
        pen = tokens(llm, prompt, temperature=0.0, max_tokens=24, ignore_eos=True, **kw)
        assert len(set(pen)) > len(set(plain)), kw
    for kw in (dict(presence_penalty=-2.0), dict(frequency_penalty=-2.0)):
        pen = tokens(llm, prompt, temperature=0.0, max_tokens=24, ignore_eos=True, **kw)
        assert len(set(pen)) <= len(set(plain)), kw


def test_huge_repetition_penalty_never_repeats_a_token(llm, tiny):
    prompt = [40, 41, 40, 41, 40, 60, 61]
    got = tokens(
        llm, prompt, temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=100.0
    )
    assert len(got) == 30
    assert len(set(got)) == len(got), got
    assert not set(got) & set(prompt)
    assert got == penalised_greedy(tiny, prompt, 30, repetition=100.0)


def test_penalties_apply_when_sampling(llm):
    # with repetition 100 every token already present is all but excluded, sampled or not
    prompt = [40, 41, 40, 41, 40, 60, 61]
    got = tokens(
        llm,
        prompt,
        temperature=1.0,
        seed=9,
        max_tokens=25,
        ignore_eos=True,
        repetition_penalty=100.0,
    )
    assert len(set(got)) == len(got) and not set(got) & set(prompt)


def test_logit_bias_is_added_to_the_logits_before_sampling(llm, tiny):
    plain = tokens(llm, PROMPT, temperature=0.0, max_tokens=6, ignore_eos=True)
    forced = tokens(
        llm, PROMPT, temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={17: 100.0}
    )
    assert forced == [17] * 6 and plain != forced
    # a -100 bias on the greedy choice makes the runner-up the greedy choice
    row = tiny.log_softmax(PROMPT)[-1]
    first, second = np.argsort(row)[::-1][:2].tolist()
    got = tokens(llm, PROMPT, temperature=0.0, max_tokens=1, logit_bias={first: -100.0})
    assert got == [second]
    # sampling sees it too
    got = tokens(
        llm, PROMPT, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True, logit_bias={23: 100.0}
    )
    assert got == [23] * 5


def test_logit_bias_token_outside_vocabulary_is_rejected(llm, tiny):
    from nanovllm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="logit_bias holds 100000"):
        llm.generate([PROMPT], SamplingParams(logit_bias={100000: 1.0}), use_tqdm=False)
    assert tokens(llm, PROMPT, temperature=0.0, max_tokens=2) == tiny.greedy(PROMPT, 2)[0]


# ---- stop conditions --------------------------------------------------------------------

TEXT = "The capital of France is"


def greedy_text(llm, max_tokens=30):
    out = generate(llm, TEXT, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]
    return out.outputs[0]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_ends_and_is_cut_from_text(llm, include, pick_stop):
    full = greedy_text(llm)
    stop = pick_stop(full.text)
    cut = full.text.find(stop)
    c = generate(
        llm,
        TEXT,
        SamplingParams(
            temperature=0.0, max_tokens=30, stop=stop, include_stop_str_in_output=include
        ),
    )[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full.text[: cut + (len(stop) if include else 0)]
    # the tokens run up to the one that completed the stop string
    assert full.token_ids[: len(c.token_ids)] == c.token_ids
    assert len(c.token_ids) < len(full.token_ids)


def test_first_of_several_stop_strings(llm, pick_stop):
    full = greedy_text(llm)
    late, early = pick_stop(full.text[20:]), full.text[4:6]
    if full.text.find(late) < full.text.find(early) + 2:
        pytest.fail("pick other stop strings")
    c = generate(
        llm, TEXT, SamplingParams(temperature=0.0, max_tokens=30, stop=[late, "#nope#", early])
    )[0].outputs[0]
    assert c.stop_reason == early and c.text == full.text[: full.text.find(early)]


def test_stop_token_id_ends_with_the_id(llm):
    full = greedy_text(llm, 12)
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    c = generate(
        llm, TEXT, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id, 3])
    )[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == full.token_ids[: first + 1]


def test_max_tokens_ends_with_length(llm):
    for m in (1, 5):
        c = greedy_text(llm, m)
        assert len(c.token_ids) == m and c.finish_reason == "length" and c.stop_reason is None


def test_max_tokens_none_runs_to_max_model_len(tiny, backend):
    llm = LLM(str(tiny.path), backend=backend, verbose=False, max_model_len=32)
    prompt = list(range(3, 13))
    c = generate(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(prompt) + len(c.token_ids) == 32 and c.finish_reason == "length"
    assert c.token_ids == tiny.greedy(prompt, 22)[0]


def first_new_token(tokens: list[int], start: int) -> int:
    """The first index >= start whose token does not occur before it."""
    return next(j for j in range(start, len(tokens)) if tokens[j] not in tokens[:j])


def test_min_tokens_defers_a_stop_token_id(llm, tiny):
    prompt = [12, 44, 90]
    want = tiny.greedy(prompt, 12)[0]
    j = first_new_token(want, 1)
    stop_id = want[j]
    early = tokens(llm, prompt, temperature=0.0, max_tokens=12, stop_token_ids=[stop_id])
    assert early == want[: j + 1]
    got = generate(
        llm,
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=12, min_tokens=j + 3, stop_token_ids=[stop_id]),
    )[0].outputs[0]
    assert got.token_ids[:j] == want[:j]
    assert stop_id not in got.token_ids[: j + 3]
    assert len(got.token_ids) >= j + 3
    if got.finish_reason == "stop":
        assert got.token_ids[-1] == stop_id and got.stop_reason == stop_id


@pytest.fixture(scope="module")
def eos_model(tiny, tmp_path_factory):
    """The same checkpoint with the greedy continuation's third token declared EOS."""
    prompt = [12, 44, 90]
    want = tiny.greedy(prompt, 10)[0]
    j = first_new_token(want, 2)
    eos = want[j]
    d = tmp_path_factory.mktemp("eos_llama")
    for f in tiny.path.iterdir():
        shutil.copy(f, d / f.name)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, eos]
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d, prompt, want, eos


def test_eos_ends_with_stop_and_no_stop_reason(eos_model, backend):
    d, prompt, want, eos = eos_model
    j = want.index(eos)
    llm = LLM(str(d), backend=backend, verbose=False)
    c = generate(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=10))[0].outputs[0]
    assert c.token_ids == want[: j + 1] and c.finish_reason == "stop" and c.stop_reason is None
    ig = generate(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[
        0
    ].outputs[0]
    assert ig.token_ids == want and ig.finish_reason == "length"
    mt = generate(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=j + 3))[
        0
    ].outputs[0]
    assert mt.token_ids[:j] == want[:j]
    assert eos not in mt.token_ids[: j + 3] and len(mt.token_ids) >= j + 3


# ---- SamplingParams validation ------------------------------------------------------------

INVALID = [
    (dict(temperature=-0.5), "temperature", "0 (greedy)"),
    (dict(temperature=float("nan")), "temperature", "(0, 1e4]"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(top_k=-2), "top_k", ">= 1"),
    (dict(top_k=2.5), "top_k", ">= 1"),
    (dict(min_p=1.5), "min_p", "[0, 1]"),
    (dict(min_p=-0.1), "min_p", "[0, 1]"),
    (dict(n=0), "n", ">= 1"),
    (dict(n=True), "n", ">= 1"),
    (dict(max_tokens=0), "max_tokens", ">= 1"),
    (dict(max_tokens=-3), "max_tokens", ">= 1"),
    (dict(min_tokens=-1), "min_tokens", "[0, max_tokens]"),
    (dict(min_tokens=9, max_tokens=4), "min_tokens", "[0, max_tokens]"),
    (dict(logprobs=21), "logprobs", "[0, 20]"),
    (dict(logprobs=-1), "logprobs", "[0, 20]"),
    (dict(prompt_logprobs=21), "prompt_logprobs", "[0, 20]"),
    (dict(stop=""), "stop", "non-empty"),
    (dict(stop=["ok", ""]), "stop", "non-empty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids", "non-negative"),
    (dict(presence_penalty=2.5), "presence_penalty", "[-2, 2]"),
    (dict(frequency_penalty=-3.0), "frequency_penalty", "[-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "(0, 100]"),
    (dict(repetition_penalty=101.0), "repetition_penalty", "(0, 100]"),
    (dict(seed=1.5), "seed", "integer"),
    (dict(logit_bias={3: 101.0}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias", "non-negative token ids"),
    (dict(logit_bias=[1, 2]), "logit_bias", "a dict"),
]


@pytest.mark.parametrize(
    "kw,field_name,allowed",
    INVALID,
    ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _, _ in INVALID],
)
def test_invalid_sampling_params_raise_value_error_naming_field_and_range(kw, field_name, allowed):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kw)
    msg = str(info.value)
    assert f"SamplingParams.{field_name}=" in msg, msg
    assert allowed in msg, msg


def test_valid_edge_sampling_params_accepted():
    p = SamplingParams(
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        min_p=1.0,
        n=1,
        max_tokens=1,
        logprobs=20,
        prompt_logprobs=0,
        stop="x",
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=100.0,
        min_tokens=1,
        seed=0,
    )
    assert p.top_k == 0 and p.stop_strings == ["x"] and p.greedy
    assert SamplingParams(max_tokens=None, min_tokens=50).max_tokens is None
