"""The OpenAI-compatible server as its users drive it: a real `python -m nanovllm serve`
process with the real default model (SmolLM2-135M-Instruct) on a free loopback port, talked to
with the official `openai` client (sync and async), httpx and raw bytes.

Answers are checked against the same model run offline through `LLM.generate` in this process.
The server is backend-independent (the engine loop only calls LLMEngine), so these tests run in
the numpy session.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from conftest import start_server

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai", reason="the server tests drive it with the openai client")

KEY = "test-key"
MAX_MODEL_LEN = 2048
KV_MEMORY = 256 << 20
# greedy continuations whose top-2 logit gaps stay above 0.07 (tests/test_smollm2.py)
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "import numpy as np\n\n",
    "My favourite fruit is",
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def numpy_session(backend):
    if backend != "numpy":
        pytest.skip("the server is backend-independent; its tests run in the numpy session")


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    srv = start_server(
        [
            "--model",
            str(default_gguf),
            "--served-model-name",
            "smol",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--kv-cache-memory",
            str(KV_MEMORY),
            "--no-access-log",
        ],
        tmp_path_factory.mktemp("server") / "server.log",
        api_key=KEY,
    )
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def offline(default_gguf):
    return LLM(
        str(default_gguf), max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_MEMORY, verbose=False
    )


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def greedy(offline: LLM, prompt, max_tokens: int, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return offline.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("nanovllm:"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def gauge(server, name: str) -> float:
    m = metrics(server)
    return next(v for k, v in m.items() if k.startswith(f"nanovllm:{name}{{"))


def wait_drained(server, timeout: float = 20.0) -> None:
    """Nothing running or waiting and no KV block held, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = {
            n: gauge(server, n)
            for n in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        }
        if not any(state.values()):
            return
        assert time.monotonic() < deadline, f"not drained after {timeout}s: {state}"
        time.sleep(0.1)


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kw)
    return httpx.post(
        f"{server.url}{path}",
        content=body,
        timeout=60,
        headers={**headers, "Content-Type": "application/json"},
        **kw,
    )


# ---- endpoints -------------------------------------------------------------------------------


def test_health_version_and_metrics_answer_without_a_key(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "num_preemptions_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "spec_decode_num_draft_tokens_total",
        "spec_decode_num_accepted_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
    ):
        assert f"nanovllm:{name}{{" in text, name
    assert 'model_name="smol"' in text and 'engine="0"' in text


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_about_france_answers_paris(client):
    # the README's example as a new user types it: the default model answers greedily
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=FRANCE)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens >= 1


def test_completion_equals_offline_greedy(client, offline):
    for prompt in PROMPTS:
        want = greedy(offline, prompt, 16)
        got = client.completions.create(model="smol", prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_default_max_tokens_is_16(client):
    got = client.completions.create(
        model="smol", prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.usage.completion_tokens == 16 and got.choices[0].finish_reason == "length"


def test_chat_equals_offline_chat(client, offline):
    want = offline.chat(FRANCE, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    got = client.chat.completions.create(
        model="smol", messages=FRANCE, temperature=0, max_tokens=24
    )
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_token_id_prompts_and_a_batch_of_prompts(client, offline):
    ids = offline.tokenizer.encode(PROMPTS[1])
    by_ids = client.completions.create(model="smol", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == greedy(offline, PROMPTS[1], 8).text
    batch = client.completions.create(
        model="smol", prompt=PROMPTS[:3], max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in batch.choices] == list(range(6))
    for c in batch.choices:  # choice i * n + j is sample j of prompt i
        assert c.text == greedy(offline, PROMPTS[c.index // 2], 8).text
    two = client.completions.create(
        model="smol", prompt=[ids, ids[:3]], max_tokens=4, temperature=0
    )
    assert two.usage.prompt_tokens == len(ids) + 3


def test_n_samples_with_a_seed_are_reproducible(client):
    def run():
        return client.completions.create(
            model="smol",
            prompt=PROMPTS[3],
            max_tokens=12,
            n=3,
            temperature=1.0,
            seed=1234,
            extra_body={"ignore_eos": True},
        )

    first, again = run(), run()
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1, texts
    assert first.usage.completion_tokens == 36


# ---- streaming ---------------------------------------------------------------------------------


def test_completion_stream_joins_to_the_non_streamed_text(client):
    kw = dict(model="smol", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is chunks[-2]
    assert finishing[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_starts_with_the_role_and_joins_to_the_message(client):
    kw = dict(model="smol", messages=FRANCE, max_tokens=24, temperature=0, n=2)
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert {c.choices[0].delta.role for c in chunks[:1]} == {"assistant"}
    for i in range(2):
        deltas = [ch for c in chunks for ch in c.choices if ch.index == i]
        assert deltas[0].delta.role == "assistant"
        assert "".join(d.delta.content or "" for d in deltas) == full.choices[i].message.content
        assert sum(1 for d in deltas if d.finish_reason) == 1
        assert deltas[-1].finish_reason == full.choices[i].finish_reason
    assert chunks[-1].usage == full.usage


def test_stream_never_sends_text_a_stop_string_cuts(client, offline):
    text = greedy(offline, PROMPTS[2], 24).text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert stop.strip() and text.find(stop) > 0
    kw = dict(model="smol", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    full = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert full.choices[0].text == text[: text.find(stop)] == streamed
    assert full.choices[0].finish_reason == "stop"
    assert full.choices[0].model_extra["stop_reason"] == stop


# ---- logprobs, echo, logit bias, vLLM's extra fields ---------------------------------------


def test_completion_logprobs_match_offline(client, offline):
    want = greedy(offline, PROMPTS[0], 6, logprobs=3)
    got = (
        client.completions.create(
            model="smol", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3
        )
        .choices[0]
        .logprobs
    )
    assert len(got.tokens) == len(got.token_logprobs) == len(got.top_logprobs) == 6
    for j, (token, entries) in enumerate(zip(want.token_ids, want.logprobs)):
        assert got.tokens[j] == entries[token].decoded_token
        assert got.token_logprobs[j] == pytest.approx(entries[token].logprob, abs=1e-5)
        assert len(got.top_logprobs[j]) == 3
        assert max(got.top_logprobs[j].values()) == pytest.approx(got.token_logprobs[j])
    assert got.text_offset[0] == 0
    assert got.text_offset[1] == len(got.tokens[0])


def test_chat_logprobs_and_top_logprobs(client):
    got = client.chat.completions.create(
        model="smol", messages=FRANCE, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == 5
    assert "".join(e.token for e in content) == got.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token


def test_echo_returns_prompt_then_completion(client, offline):
    got = client.completions.create(
        model="smol", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    c = got.choices[0]
    assert c.text == PROMPTS[0] + greedy(offline, PROMPTS[0], 4).text
    n_prompt = got.usage.prompt_tokens
    assert len(c.logprobs.tokens) == n_prompt + 4
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.token_logprobs[1] < 0


def test_logit_bias_forces_a_token(client, offline):
    token = offline.tokenizer.encode(" banana")[0]
    got = client.completions.create(
        model="smol", prompt=PROMPTS[0], max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert got.choices[0].text == offline.tokenizer.decode([token] * 3)


def test_vllm_extra_sampling_fields(client, offline):
    eos = offline.tokenizer.eos_token_id
    got = client.completions.create(
        model="smol",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={
            "ignore_eos": True,
            "min_tokens": 12,
            "top_k": 1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "stop_token_ids": [eos],
            "skip_special_tokens": True,
            "prompt_logprobs": 1,
        },
    )
    c = got.choices[0]
    assert got.usage.completion_tokens == 12 and c.finish_reason == "length"
    assert c.text == greedy(offline, PROMPTS[0], 12, ignore_eos=True).text
    plp = c.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == got.usage.prompt_tokens
    first = offline.tokenizer.encode(PROMPTS[0])[1]
    assert str(first) in plp[1]
    stop_id = offline.tokenizer.encode(greedy(offline, PROMPTS[0], 3).text)[1]
    cut = client.completions.create(
        model="smol",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": [stop_id]},
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop_id


def test_tokenize_and_detokenize(server, offline):
    got = post(server, "/tokenize", {"prompt": PROMPTS[0]}).json()
    assert got["tokens"] == offline.tokenizer.encode(PROMPTS[0])
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == MAX_MODEL_LEN
    chat = post(server, "/tokenize", {"messages": FRANCE}).json()
    assert chat["tokens"] == offline.chat_prompt(FRANCE)
    back = post(server, "/detokenize", {"tokens": got["tokens"]}).json()
    assert back == {"prompt": PROMPTS[0]}


# ---- bad input: OpenAI's error shape, the right status, and the server goes on --------------

BAD = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature", "greedy"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    (
        "/v1/chat/completions",
        {"messages": FRANCE, "logprobs": True, "top_logprobs": 21},
        400,
        "logprobs",
        "[0, 20]",
    ),
    (
        "/v1/chat/completions",
        {"messages": FRANCE, "top_logprobs": 2},
        400,
        "top_logprobs",
        "logprobs=true",
    ),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 2, 999999]}, 400, "prompt", "outside the vocabulary"),
    (
        "/v1/completions",
        {"prompt": "hi", "max_tokens": MAX_MODEL_LEN},
        400,
        "max_tokens",
        "too many",
    ),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed", "integer"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, None, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, 400, "temperature", "number"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("/v1/completions", b'{"prompt": "hi",', 400, None, "not valid JSON"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", "Field required"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "valid list"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/tokenize", {"prompt": "hi", "messages": FRANCE}, 400, "prompt", "exactly one"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "outside the vocabulary"),
    (
        "/v1/chat/completions",
        {
            "messages": FRANCE,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "foo"}},
            },
        },
        400,
        "structured_outputs",
        "Invalid type: foo",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": FRANCE,
            "response_format": {"type": "json_object"},
            "structured_outputs": {"regex": "a+"},
        },
        400,
        "response_format",
        "pass one",
    ),
    (
        "/v1/completions",
        {"prompt": "hi", "structured_outputs": {"regex": "[a-"}},
        400,
        "structured_outputs",
        "structured_outputs.regex cannot be used",
    ),
    (
        "/v1/completions",
        {"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}},
        400,
        "structured_outputs",
        "exactly one of",
    ),
]


@pytest.mark.parametrize(
    "path,body,status,param,words", BAD, ids=[f"{p}:{words}" for p, _, _, _, words in BAD]
)
def test_bad_input_gets_openai_error_and_server_goes_on(
    server, client, offline, path, body, status, param, words
):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    good = client.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert good.choices[0].text == greedy(offline, PROMPTS[0], 4).text


def test_too_long_request_says_by_how_much(server):
    error = post(
        server, "/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN + 5}
    ).json()["error"]
    assert f"maximum context length is {MAX_MODEL_LEN}" in error["message"]
    assert "6 too many" in error["message"]  # "hi" is one token


def test_openai_client_raises_its_error_types(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="smol", prompt="hi", max_tokens=-1)
    assert info.value.status_code == 400 and "max_tokens" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_missing_or_wrong_key_is_401_on_every_guarded_route(server, key):
    for path, body in [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": FRANCE}),
        ("/tokenize", {"prompt": "hi"}),
        ("/detokenize", {"tokens": [1]}),
    ]:
        r = post(server, path, body, key=key)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
    bad_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


def test_unknown_route_is_404_in_openai_shape(server):
    r = httpx.get(f"{server.url}/v1/nothing-here", headers=server.headers())
    assert r.status_code == 404 and "error" in r.json()


# ---- disconnects and load --------------------------------------------------------------------


def test_a_stream_closed_mid_way_aborts_its_request(server):
    before = metrics(server)
    body = {"prompt": PROMPTS[0], "max_tokens": 1000, "stream": True, "ignore_eos": True}
    events = []
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=server.headers(), timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line)
            if len(events) == 3:
                break
    assert len(events) == 3
    wait_drained(server)
    after = metrics(server)
    key = next(k for k in after if "request_success_total" in k and "abort" in k)
    assert after[key] >= before.get(key, 0) + 1
    generated = next(k for k in after if k.startswith("nanovllm:generation_tokens_total"))
    assert after[generated] - before[generated] < 1000


def test_a_non_streamed_request_whose_client_leaves_is_aborted(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            json=body,
            headers=server.headers(),
            timeout=httpx.Timeout(60, read=1.0),
        )
    wait_drained(server)


def test_64_concurrent_streams_some_cancelled_the_rest_exact(server, offline):
    want = {p: greedy(offline, p, 16) for p in PROMPTS}
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

    async def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await aclient.completions.create(
            model="smol",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", [], None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                if chunk.choices[0].finish_reason:
                    finish.append(chunk.choices[0].finish_reason)
            usage = chunk.usage or usage
            if i % 5 == 0 and len(text) > 2:  # every fifth client gives up early
                await stream.close()
                return "cancelled"
        return prompt, text, finish, usage

    async def run():
        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(run())
    done = [r for r in results if r != "cancelled"]
    assert len(done) == 64 - 13
    for prompt, text, finish, usage in done:
        assert text == want[prompt].text
        assert finish == [want[prompt].finish_reason]
        assert usage.completion_tokens == len(want[prompt].token_ids)
    wait_drained(server)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_metrics_count_tokens_and_requests(server, client):
    before = metrics(server)
    got = client.completions.create(
        model="smol",
        prompt=PROMPTS[0],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = metrics(server)

    def delta(prefix: str) -> float:
        key = next(k for k in after if k.startswith(f"nanovllm:{prefix}"))
        return after[key] - before.get(key, 0.0)

    assert delta("prompt_tokens_total") == got.usage.prompt_tokens
    assert delta("generation_tokens_total") == 5
    assert delta('request_success_total{engine="0",finished_reason="length"') == 1
    assert delta("e2e_request_latency_seconds_count") == 1
    assert delta("time_to_first_token_seconds_count") == 1
    assert delta("inter_token_latency_seconds_count") == 4
    # the same prompt again hits the prefix cache
    client.completions.create(model="smol", prompt=PROMPTS[0] * 8, max_tokens=1)
    mid = metrics(server)
    client.completions.create(model="smol", prompt=PROMPTS[0] * 8, max_tokens=1)
    end = metrics(server)
    hits = next(k for k in end if k.startswith("nanovllm:prefix_cache_hits_total"))
    assert end[hits] > mid[hits]


def test_raw_curl_style_request_and_sse_framing(server):
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        headers=server.headers(),
        json={"messages": FRANCE, "max_tokens": 3, "stream": True, "temperature": 0},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


# ---- structured outputs ------------------------------------------------------------------
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_response_format_json_schema_returns_valid_json(client):
    jsonschema = pytest.importorskip("jsonschema")
    reply = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Invent a person."}],
        max_tokens=60,
        temperature=1.0,
        seed=3,
        n=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        },
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_response_format_json_object_and_streaming(client):
    stream = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    assert text.lstrip().startswith("{")


def test_extra_body_structured_outputs_choice_and_regex(client):
    options = ["Paris", "London", "Rome"]
    reply = client.chat.completions.create(
        model="smol", messages=FRANCE, max_tokens=10, temperature=1.0, seed=1, n=4,
        extra_body={"structured_outputs": {"choice": options}},
    )  # fmt: skip
    assert all(c.message.content in options for c in reply.choices)
    reply = client.completions.create(
        model="smol", prompt="Today's date is", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"regex": r"\d{4}-\d{2}-\d{2}"}},
    )  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", reply.choices[0].text), reply.choices[0].text


# ---- speculative decoding ----------------------------------------------------------------------

CODE = (
    "def area(width, height):\n    return width * height\n\n\n"
    "def describe(width, height):\n    print('area:', area(width, height))\n"
)
RENAME = [{"role": "user", "content": f"Rename area to surface in this code:\n\n{CODE}"}]


def test_speculative_serving_gives_the_offline_text_and_counts_proposals(
    default_gguf, tmp_path_factory, offline
):
    """`serve --speculative-config`: the greedy chat answer equals the offline engine's
    without speculation, streamed or not, and /metrics counts what was proposed and taken."""
    srv = start_server(
        [
            "--model", str(default_gguf), "--served-model-name", "smol",
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(KV_MEMORY),
            "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}',
            "--no-access-log",
        ],
        tmp_path_factory.mktemp("spec") / "server.log",
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        want = offline.chat(RENAME, SamplingParams(temperature=0, max_tokens=80), use_tqdm=False)
        reply = client.chat.completions.create(
            model="smol", messages=RENAME, max_tokens=80, temperature=0
        )
        assert reply.choices[0].message.content == want[0].outputs[0].text
        stream = client.chat.completions.create(
            model="smol", messages=RENAME, max_tokens=80, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == want[0].outputs[0].text
        values = metrics(srv)
        drafted = next(v for k, v in values.items() if "spec_decode_num_draft_tokens_total" in k)
        taken = next(v for k, v in values.items() if "spec_decode_num_accepted_tokens_total" in k)
        assert 0 < taken <= drafted
    finally:
        assert srv.stop() == 0, srv.output()
