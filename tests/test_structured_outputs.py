"""Structured outputs on the real default model (SmolLM2-135M), on the backend under test:
the constraint holds in every sample, the mask touches only constrained rows, and bad
constraints are refused without leaving anything behind."""

from __future__ import annotations

import json
import re

import pytest

from nanovllm import LLM, SamplingParams, StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK_PERSON = [{"role": "user", "content": "Invent a person. Answer in JSON."}]
ASK_CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
DATE = r"\d{4}-\d{2}-\d{2}"


@pytest.fixture(scope="module")
def llm(default_gguf, backend) -> LLM:
    return LLM(None, backend=backend, max_model_len=512, num_kv_blocks=120, verbose=False)


def chat(llm, messages, **params):
    return llm.chat(messages, SamplingParams(**params), use_tqdm=False)[0].outputs


def constrained(**kind) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kind)


def assert_nothing_held(llm) -> None:
    bm = llm.engine.scheduler.block_manager
    assert not llm.engine.requests and bm.num_free_blocks == llm.config.num_kv_blocks - 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_always_parse_and_validate(llm, temperature):
    outs = chat(llm, ASK_PERSON, n=1 if temperature == 0 else 6, temperature=temperature,
                seed=7, max_tokens=60, structured_outputs=constrained(json=PERSON))  # fmt: skip
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert_nothing_held(llm)


def test_json_schema_given_as_a_string_and_json_object(llm):
    (out,) = chat(llm, ASK_PERSON, temperature=0, max_tokens=60,
                  structured_outputs=constrained(json=json.dumps(PERSON)))  # fmt: skip
    jsonschema.validate(json.loads(out.text), PERSON)
    outs = chat(llm, ASK_PERSON, n=4, temperature=1.0, seed=3, max_tokens=120,
                structured_outputs=constrained(json_object=True))  # fmt: skip
    for out in outs:
        if out.finish_reason == "stop":  # (a sample may run out of tokens mid-object)
            assert isinstance(json.loads(out.text), dict), out.text
        else:
            assert out.finish_reason == "length" and out.text.lstrip().startswith("{")


def test_regex_matches_in_full_in_every_sample(llm):
    outs = chat(llm, ASK_CAPITAL, n=6, temperature=1.0, seed=1, max_tokens=20,
                structured_outputs=constrained(regex=DATE))  # fmt: skip
    for out in outs:
        assert re.fullmatch(DATE, out.text) and out.finish_reason == "stop", out.text


def test_choice_is_always_one_of_the_options(llm):
    options = ["Paris", "London", "Rome"]
    outs = chat(llm, ASK_CAPITAL, n=8, temperature=1.0, seed=2, max_tokens=10,
                structured_outputs=constrained(choice=options))  # fmt: skip
    assert all(out.text in options and out.finish_reason == "stop" for out in outs)
    assert len({out.text for out in outs}) > 1, "eight samples, one answer: no sampling?"


def test_lark_grammar(llm):
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | "maybe"'
    outs = chat(llm, ASK_CAPITAL, n=4, temperature=1.0, seed=4, max_tokens=20,
                structured_outputs=constrained(grammar=grammar))  # fmt: skip
    for out in outs:
        assert re.fullmatch(r"The answer is (yes|no|maybe)\.", out.text), out.text


def test_greedy_constrained_token_is_the_best_allowed_token(llm):
    """The mask only removes tokens: greedy picks the allowed token with the highest logit."""
    options = ["Paris", "London", "Rome"]
    (free,) = chat(llm, ASK_CAPITAL, temperature=0, max_tokens=1, logprobs=20)
    (out,) = chat(llm, ASK_CAPITAL, temperature=0, max_tokens=1, logprobs=20,
                  structured_outputs=constrained(choice=options))  # fmt: skip
    token = out.token_ids[0]
    text = llm.tokenizer.decode([token])
    assert any(o.startswith(text) for o in options), text
    # every top-20 token of the free run that ranks above the chosen one is not a prefix
    ranked = sorted(free.logprobs[0].items(), key=lambda item: -item[1].logprob)
    for t, lp in ranked:
        if t == token:
            break
        assert not any(o.startswith(llm.tokenizer.decode([t])) for o in options), lp


def test_min_tokens_yields_to_the_grammar(llm):
    (out,) = chat(llm, ASK_CAPITAL, temperature=0, max_tokens=10, min_tokens=8,
                  structured_outputs=constrained(choice=["Paris", "Rome"]))  # fmt: skip
    assert out.text in ("Paris", "Rome") and out.finish_reason == "stop"


def test_a_stop_string_cuts_a_constrained_answer(llm):
    (out,) = chat(llm, ASK_CAPITAL, temperature=0, max_tokens=20, stop=["world"],
                  structured_outputs=constrained(regex="hello world and more"))  # fmt: skip
    assert out.text == "hello " and out.finish_reason == "stop" and out.stop_reason == "world"


def test_streaming_gives_the_same_constrained_text(llm):
    params = SamplingParams(
        temperature=0, max_tokens=60, structured_outputs=constrained(json=PERSON)
    )
    prompt = llm.chat_prompt(ASK_PERSON)
    streamed = "".join(llm.stream(prompt, params))
    (out,) = llm.generate(prompt, params, use_tqdm=False)[0].outputs
    assert streamed == out.text
    jsonschema.validate(json.loads(streamed), PERSON)


def test_preempted_constrained_sequences_stay_valid(default_gguf, backend):
    small = LLM(None, backend=backend, max_model_len=128, num_kv_blocks=10, max_num_seqs=4,
                max_num_batched_tokens=128, verbose=False)  # fmt: skip
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=60,
                            structured_outputs=constrained(json=PERSON))  # fmt: skip
    outs = small.chat(ASK_PERSON, params, use_tqdm=False)[0].outputs
    assert small.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for out in outs:
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), PERSON)
    assert any(out.finish_reason == "stop" for out in outs)
    assert_nothing_held(small)


@pytest.fixture(scope="module")
def invariant(default_gguf, backend) -> LLM:
    return LLM(None, backend=backend, max_model_len=256, num_kv_blocks=60, batch_invariant=True,
               verbose=False)  # fmt: skip


def test_mixed_batch_leaves_free_and_seeded_outputs_as_alone(invariant):
    """In batch-invariant mode a row's numbers do not depend on the batch, so a free request
    next to constrained ones must give exactly its output alone (the mask reaches only the
    constrained rows), and a seeded constrained one its output alone."""
    llm = invariant
    free = SamplingParams(temperature=0, max_tokens=12)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=20,
                            structured_outputs=constrained(regex=DATE))  # fmt: skip
    greedy = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=constrained(json=PERSON))  # fmt: skip
    prompts = [
        llm.chat_prompt(ASK_CAPITAL),
        llm.chat_prompt(ASK_PERSON),
        llm.chat_prompt(ASK_CAPITAL),
    ]
    params = [free, seeded, greedy]
    together = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [
        llm.generate(p, sp, use_tqdm=False)[0].outputs[0].text for p, sp in zip(prompts, params)
    ]
    assert together == alone
    assert re.fullmatch(DATE, together[1])


@pytest.mark.parametrize(
    "kind, words",
    [
        (dict(json={"type": "foo"}), "structured_outputs.json cannot be used: Invalid type: foo"),
        (dict(json="{not json"), "structured_outputs.json is not valid"),
        (dict(regex="[a-"), "structured_outputs.regex cannot be used"),
        (dict(grammar="start: undefined_rule"), "structured_outputs.grammar cannot be used"),
    ],
)
def test_invalid_constraints_are_refused_by_name(llm, kind, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        chat(llm, ASK_CAPITAL, max_tokens=4, structured_outputs=constrained(**kind))
    assert_nothing_held(llm)
    (out,) = chat(llm, ASK_CAPITAL, temperature=0, max_tokens=4)  # still serves
    assert out.token_ids


@pytest.mark.parametrize(
    "kind, words",
    [
        (dict(json=PERSON, regex=DATE), "exactly one of json, regex, choice, grammar, json_object"),
        (dict(), "got none"),
        (dict(choice=[]), "StructuredOutputsParams.choice=[] is invalid"),
        (dict(choice=["a", 3]), "non-empty list of non-empty strings"),
    ],
)
def test_malformed_constraint_params_are_refused(kind, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        StructuredOutputsParams(**kind)


def test_a_constraint_slower_to_compile_than_the_limit_is_refused(llm, monkeypatch):
    """A schema the compiler cannot check within COMPILE_TIMEOUT_S is refused (here the limit
    is lowered below what a 3,000-property schema takes), and the engine goes on."""
    from nanovllm import structured_outputs

    monkeypatch.setattr(structured_outputs, "COMPILE_TIMEOUT_S", 0.001)
    names = [f"p{i}" for i in range(3000)]
    schema = {"type": "object", "properties": {n: {"type": "string", "pattern": "(a|b)*c{3,9}"}
                                               for n in names}, "required": names}  # fmt: skip
    with pytest.raises(ValueError, match=r"did not compile within 0\.001 s; simplify the json"):
        chat(llm, ASK_CAPITAL, max_tokens=4, structured_outputs=constrained(json=schema))
    assert_nothing_held(llm)
    (out,) = chat(llm, ASK_CAPITAL, temperature=0, max_tokens=4)
    assert out.token_ids


def test_the_compiled_grammar_cache_is_bounded(llm, monkeypatch):
    """A server sees many distinct schemas: only the most recent CACHED_GRAMMARS stay."""
    from nanovllm import structured_outputs

    monkeypatch.setattr(structured_outputs, "CACHED_GRAMMARS", 2)
    compiler = llm.engine.grammars
    for word in ("alpha", "beta", "gamma"):
        compiler.grammar(constrained(regex=word))
    kept = [json.loads(key)[1] for key in compiler._grammars]
    assert kept[-2:] == ["beta", "gamma"] and len(kept) == 2


def test_masks_of_rows_with_and_without_proposals_in_one_step(llm):
    """Speculative decoding: one matcher fills a row after each of its proposals, another
    (no proposal this step) only its own row, in one call; the matchers are left as they were."""
    from nanovllm.structured_outputs import fill_bitmask

    grammars = llm.engine.grammars
    grammar = grammars.grammar(constrained(regex=r"(ab)+c"))
    a, b, z = (llm.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("a", "b", "z"))
    first, second = grammars.matcher(grammar), grammars.matcher(grammar)
    V = llm.model.vocab_size
    mask = fill_bitmask([(first, 0, [a, z]), (second, 3, [])], 4, V)

    def allowed(row: int, token: int) -> bool:
        return bool((int(mask[row, token // 32]) >> (token % 32)) & 1)

    assert [allowed(0, t) for t in (a, b, z)] == [True, False, False]  # first, now
    assert [allowed(1, t) for t in (a, b, z)] == [False, True, False]  # first, after a
    assert [allowed(3, t) for t in (a, b, z)] == [True, False, False]  # second, now
    assert first.consume_token(a) and first.consume_token(b)  # unchanged by the masks
