"""The library API (LLM.generate / chat / stream, LLMEngine add_request / step / abort).

Checked on a tiny random Llama saved by transformers, with a tiny byte-level BPE tokenizer and
a ChatML template saved next to it by transformers; greedy tokens and logprobs are compared
with transformers' own forward pass on the same prefix.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm import LLM, RequestOutput, SamplingParams
from nanovllm.outputs import CompletionOutput, Logprob

TOL = 1e-4
TEXTS = ["The capital of France is", "Hello world, hello", "the cat sat on the mat and"]


@pytest.fixture(scope="module")
def hf_tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.path)


@pytest.fixture(scope="module")
def llm(tiny, backend):
    return LLM(str(tiny.path), backend=backend, verbose=False)


@pytest.fixture(autouse=True)
def engine_left_idle(request):
    """After every test that used the module's LLM: nothing queued, no KV block held."""
    yield
    if "llm" in request.fixturenames:
        assert_idle(request.getfixturevalue("llm"))


def assert_idle(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.requests, f"requests left in the engine: {list(eng.requests)}"
    assert not eng.scheduler.waiting and not eng.scheduler.running
    assert eng.scheduler.block_manager.num_free_blocks == llm.config.num_kv_blocks - 1


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def generate(llm: LLM, prompts, params=None) -> list[RequestOutput]:
    return llm.generate(prompts, params, use_tqdm=False)


# ---- generate: prompt forms, parameters, output fields --------------------------------------


def test_generate_accepts_string_list_of_strings_and_token_ids(llm, tiny, hf_tok):
    p = greedy(8)
    ids = [hf_tok.encode(t) for t in TEXTS]
    want = [tiny.greedy(i, 8)[0] for i in ids]
    one = generate(llm, TEXTS[0], p)
    assert len(one) == 1 and one[0].outputs[0].token_ids == want[0]
    many = generate(llm, TEXTS, p)
    assert [o.outputs[0].token_ids for o in many] == want
    as_ids = generate(llm, ids, p)
    assert [o.outputs[0].token_ids for o in as_ids] == want
    single_ids = generate(llm, ids[1], p)
    assert len(single_ids) == 1 and single_ids[0].outputs[0].token_ids == want[1]
    assert [o.prompt_token_ids for o in many] == ids
    assert [o.prompt for o in many] == TEXTS
    assert all(o.prompt is None for o in as_ids)


def test_generate_returns_outputs_in_input_order(llm, tiny):
    # lengths that finish in a different order from the input order
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40], [60, 61]]
    params = [greedy(9), greedy(2), greedy(5)]
    outs = generate(llm, prompts, params)
    assert [o.prompt_token_ids for o in outs] == prompts
    for o, prompt, p in zip(outs, prompts, params, strict=True):
        assert o.outputs[0].token_ids == tiny.greedy(prompt, p.max_tokens)[0]
    assert len({o.request_id for o in outs}) == 3


def test_generate_one_sampling_params_per_prompt(llm):
    outs = generate(llm, TEXTS, [greedy(1), greedy(4), greedy(7)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 4, 7]


def test_generate_sampling_params_length_mismatch_raises(llm):
    with pytest.raises(ValueError, match=r"2 SamplingParams for 3 prompts"):
        generate(llm, TEXTS, [greedy(), greedy()])
    with pytest.raises(ValueError, match=r"4 SamplingParams for 3 prompts"):
        generate(llm, TEXTS, [greedy()] * 4)


def test_generate_default_sampling_params(llm):
    out = generate(llm, TEXTS[0])[0]
    assert len(out.outputs[0].token_ids) == SamplingParams().max_tokens == 16
    assert out.outputs[0].finish_reason == "length"


def test_request_output_fields(llm, tiny, hf_tok):
    out = generate(llm, TEXTS[0], greedy(6))[0]
    assert isinstance(out, RequestOutput)
    assert isinstance(out.request_id, str)
    assert out.prompt == TEXTS[0]
    assert out.prompt_token_ids == hf_tok.encode(TEXTS[0])
    assert out.prompt_logprobs is None
    assert out.finished is True
    assert len(out.outputs) == 1
    c = out.outputs[0]
    assert isinstance(c, CompletionOutput)
    assert c.index == 0
    assert c.token_ids == tiny.greedy(out.prompt_token_ids, 6)[0]
    assert c.text == hf_tok.decode(c.token_ids, skip_special_tokens=True)
    assert c.logprobs is None
    assert c.finish_reason == "length" and c.stop_reason is None
    assert c.finished()


def test_request_ids_are_unique_across_calls(llm):
    a = generate(llm, [[3, 4], [5, 6]], greedy(1))
    b = generate(llm, [[3, 4]], greedy(1))
    ids = [o.request_id for o in a + b]
    assert len(set(ids)) == 3


def test_generate_empty_prompt_list_returns_nothing(llm):
    assert generate(llm, [], greedy()) == []


# ---- logprobs ----------------------------------------------------------------------------


def check_entries(entries: dict, row: np.ndarray, k: int, actual: int, where: str) -> None:
    """vLLM's shape: the top k with ranks 1..k, plus the actual token; values as in row."""
    assert actual in entries, f"{where}: token {actual} missing from {sorted(entries)}"
    assert all(isinstance(v, Logprob) for v in entries.values())
    order = np.argsort(-row, kind="stable")
    top = {t: lp for t, lp in entries.items() if lp.rank <= k}
    assert sorted(lp.rank for lp in top.values()) == list(range(1, k + 1)), f"{where}: {entries}"
    assert len(entries) == k + (actual not in top)
    for t, lp in entries.items():
        assert abs(lp.logprob - row[t]) < TOL, f"{where}: token {t}: {lp.logprob} vs {row[t]}"
        lo, hi = (1 + int(np.count_nonzero(row > row[t] + d)) for d in (TOL, -TOL))
        assert lo <= lp.rank <= hi, f"{where}: token {t} rank {lp.rank}, expected {lo}..{hi}"
    for t, lp in top.items():  # the top k are transformers' top k, in order
        assert abs(row[order[lp.rank - 1]] - row[t]) < TOL, f"{where}: rank {lp.rank}"


@pytest.mark.parametrize("k", [0, 1, 3])
def test_sample_logprobs_hold_top_k_and_sampled_token(llm, tiny, k):
    prompt = [7, 30, 55, 80, 101]
    params = SamplingParams(temperature=1.0, seed=123, max_tokens=10, logprobs=k)
    c = generate(llm, [prompt], params)[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 10
    ref = tiny.log_softmax(prompt + c.token_ids)
    for j, (tok, entries) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        check_entries(entries, ref[len(prompt) + j - 1], k, tok, f"output {j}")
        if k == 0:
            assert list(entries) == [tok]
    want = sum(ref[len(prompt) + j - 1][t] for j, t in enumerate(c.token_ids))
    assert c.cumulative_logprob == pytest.approx(want, abs=1e-3)
    # a seeded sample, not the argmax everywhere: the sampled token's rank is not always 1
    assert any(e[t].rank > 1 for t, e in zip(c.token_ids, c.logprobs, strict=True))


def test_greedy_logprobs_rank_one_is_the_chosen_token(llm, tiny):
    prompt = [12, 44, 90]
    c = generate(llm, [prompt], greedy(8, logprobs=2))[0].outputs[0]
    _, rows = tiny.greedy(prompt, 8)
    for j, (tok, entries) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        assert entries[tok].rank == 1
        check_entries(entries, rows[j], 2, tok, f"greedy output {j}")


@pytest.mark.parametrize("k", [0, 2])
def test_prompt_logprobs_match_transformers(llm, tiny, k):
    prompt = list(range(3, 43))  # more than two blocks of 16
    out = generate(llm, [prompt], greedy(2, prompt_logprobs=k))[0]
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt)
    assert plp[0] is None
    ref = tiny.log_softmax(prompt)
    for p in range(1, len(prompt)):
        check_entries(plp[p], ref[p - 1], k, prompt[p], f"prompt position {p}")
    assert out.outputs[0].token_ids == tiny.greedy(prompt, 2)[0]


def test_prompt_logprobs_despite_prefix_cache_hit(llm, tiny):
    prompt = list(range(50, 90))
    generate(llm, [prompt], greedy(1))  # fills the prefix cache
    out = generate(llm, [prompt], greedy(1, prompt_logprobs=1))[0]
    assert len(out.prompt_logprobs) == len(prompt)
    ref = tiny.log_softmax(prompt)
    for p in range(1, len(prompt)):
        check_entries(out.prompt_logprobs[p], ref[p - 1], 1, prompt[p], f"position {p}")


def test_prompt_logprobs_of_one_token_prompt(llm):
    out = generate(llm, [[17]], greedy(1, prompt_logprobs=3))[0]
    assert out.prompt_logprobs == [None]


def test_prompt_logprobs_with_chunked_prefill(tiny, backend):
    llm = LLM(
        str(tiny.path),
        backend=backend,
        verbose=False,
        max_num_seqs=2,
        max_num_batched_tokens=8,
        block_size=4,
    )
    prompt = list(range(100, 130))
    out = llm.generate([prompt, [5, 6, 7]], greedy(3, prompt_logprobs=2), use_tqdm=False)
    ref = tiny.log_softmax(prompt)
    assert len(out[0].prompt_logprobs) == len(prompt) and out[0].prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        check_entries(out[0].prompt_logprobs[p], ref[p - 1], 2, prompt[p], f"position {p}")
    assert out[0].outputs[0].token_ids == tiny.greedy(prompt, 3)[0]
    assert len(out[1].prompt_logprobs) == 3
    assert_idle(llm)


# ---- chat ----------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And 42?"},
    ],
]


def chat_ids(hf_tok, conversation) -> list[int]:
    text = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return hf_tok.encode(text, add_special_tokens=False)


def test_chat_one_conversation(llm, tiny, hf_tok):
    outs = llm.chat(CONVERSATIONS[0], greedy(6), use_tqdm=False)
    assert len(outs) == 1
    ids = chat_ids(hf_tok, CONVERSATIONS[0])
    assert outs[0].prompt_token_ids == ids
    assert ids[0] == hf_tok.convert_tokens_to_ids("<|im_start|>")
    assert outs[0].outputs[0].token_ids == tiny.greedy(ids, 6)[0]


def test_chat_list_of_conversations(llm, tiny, hf_tok):
    outs = llm.chat(CONVERSATIONS, greedy(5), use_tqdm=False)
    assert len(outs) == 2
    for out, conv in zip(outs, CONVERSATIONS, strict=True):
        ids = chat_ids(hf_tok, conv)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == tiny.greedy(ids, 5)[0]


def test_chat_per_conversation_params(llm):
    outs = llm.chat(CONVERSATIONS, [greedy(2), greedy(3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3]


def test_chat_without_generation_prompt(llm, hf_tok):
    out = llm.chat(CONVERSATIONS[0], greedy(1), use_tqdm=False, add_generation_prompt=False)[0]
    text = hf_tok.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=False)
    assert out.prompt_token_ids == hf_tok.encode(text, add_special_tokens=False)


# ---- LLM.stream ----------------------------------------------------------------------------


def test_stream_deltas_concatenate_to_generate_text(llm):
    p = greedy(24)
    full = generate(llm, TEXTS[1], p)[0].outputs[0].text
    deltas = list(llm.stream(TEXTS[1], p))
    assert "".join(deltas) == full
    assert len(deltas) > 1 and all(deltas)


def test_stream_accepts_token_ids(llm):
    p = greedy(10)
    full = generate(llm, [[9, 8, 7]], p)[0].outputs[0].text
    assert "".join(llm.stream([9, 8, 7], p)) == full


@pytest.mark.parametrize("include", [False, True])
def test_stream_never_yields_part_of_a_stop_string(llm, include, pick_stop):
    full = generate(llm, TEXTS[2], greedy(30))[0].outputs[0].text
    stop = pick_stop(full, 3)
    p = greedy(30, stop=[stop, "@@@@@"], include_stop_str_in_output=include)
    want = generate(llm, TEXTS[2], p)[0].outputs[0].text
    cut = full.find(stop)
    assert want == full[: cut + (len(stop) if include else 0)]
    deltas = list(llm.stream(TEXTS[2], p))
    assert "".join(deltas) == want
    sent = ""
    for d in deltas:  # everything yielded is final text: nothing is taken back later
        sent += d
        assert want.startswith(sent), (sent, want)


def test_stream_closed_early_aborts_the_request(llm):
    stream = llm.stream(list(range(3, 40)), greedy(50))
    assert next(stream)
    assert llm.engine.requests
    stream.close()
    assert_idle(llm)


# ---- engine-level streaming: add_request / step / abort_request ---------------------------


def test_engine_add_request_and_step_until_done(llm, tiny):
    eng = llm.engine
    prompts = {"a": [20, 21, 22, 23], "b": list(range(60, 80))}
    for rid, prompt in prompts.items():
        assert eng.add_request(prompt, greedy(6), request_id=rid) == rid
    seen: dict[str, list[list[int]]] = {rid: [] for rid in prompts}
    final: dict[str, RequestOutput] = {}
    steps = 0
    while eng.has_unfinished_requests():
        steps += 1
        assert steps < 50
        for out in eng.step():
            seen[out.request_id].append(list(out.outputs[0].token_ids))
            if out.finished:
                assert out.request_id not in final
                final[out.request_id] = out
    assert eng.step() == []
    for rid, prompt in prompts.items():
        want = tiny.greedy(prompt, 6)[0]
        assert final[rid].outputs[0].token_ids == want
        assert final[rid].outputs[0].finish_reason == "length"
        assert seen[rid] == [want[:i] for i in range(1, 7)]  # one more token per step


def test_engine_add_request_duplicate_id_rejected(llm):
    eng = llm.engine
    eng.add_request([3, 4, 5], greedy(2), request_id="dup")
    with pytest.raises(ValueError, match="dup"):
        eng.add_request([3, 4, 5], greedy(2), request_id="dup")
    while eng.has_unfinished_requests():
        eng.step()


def test_abort_running_request_frees_every_block(llm, tiny):
    eng = llm.engine
    bm = eng.scheduler.block_manager
    start = bm.num_free_blocks
    a = eng.add_request(list(range(3, 50)), greedy(60))
    b = eng.add_request(list(range(50, 90)), SamplingParams(n=3, seed=1, max_tokens=60))
    for _ in range(4):
        eng.step()
    assert bm.num_free_blocks < start
    assert eng.scheduler.running
    out = eng.abort_request(a)
    assert out is not None and out.finished
    assert out.outputs[0].finish_reason == "abort"
    assert len(out.outputs[0].token_ids) >= 1
    eng.step()
    out_b = eng.abort_request(b)
    assert [c.finish_reason for c in out_b.outputs] == ["abort"] * 3
    assert eng.abort_request(b) is None  # already gone
    assert bm.num_free_blocks == start
    assert not eng.has_unfinished_requests() and eng.step() == []
    good = generate(llm, [[33, 34, 35]], greedy(8))[0]
    assert good.outputs[0].token_ids == tiny.greedy([33, 34, 35], 8)[0]


def test_abort_waiting_request(llm):
    eng = llm.engine
    rid = eng.add_request([3, 4, 5, 6], greedy(4))
    out = eng.abort_request(rid)
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
    assert eng.step() == []
