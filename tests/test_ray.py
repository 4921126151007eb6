"""Ray: data-parallel serving and Ray Data batch inference, on a real two-node local cluster.

The module starts the cluster itself (`ray start --head` on 127.0.0.1, then a second
`ray start --address=...`, 2 CPUs each), runs every test on it, and stops every Ray process
it started (`ray stop --force`). `nox -s distributed` runs it; without Ray it is skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
from conftest import free_port, start_server, with_tokenizer

from nanovllm import LLM, SamplingParams

ray = pytest.importorskip("ray", reason="needs Ray: pip install '.[ray]'")
pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Hello world",
    "the cat sat",
    "What is the answer?",
    "x = 1 + 2",
    "Quick brown foxes",
]
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
API_GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


def ray_cli() -> str:
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


@pytest.fixture(scope="module")
def cluster():
    """The address of a two-node Ray cluster on this machine (2 CPUs a node)."""
    # token authentication would need a token shared by every node: a loopback test cluster
    # runs without it (for this process, and the server and ray processes it starts)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
              "--object-store-memory=200000000"]  # fmt: skip
    try:
        subprocess.run(
            [ray_cli(), "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            check=True, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [ray_cli(), "start", f"--address={address}", *common],
            check=True, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def chat_model(tiny_llama):
    return with_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def expected(chat_model) -> list[str]:
    llm = LLM(str(chat_model.path), verbose=False)
    outs = llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_the_cluster_has_two_nodes(cluster):
    ray.init(address=cluster)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert ray.cluster_resources()["CPU"] == 4
    finally:
        ray.shutdown()


def test_ray_data_pipeline_gives_the_texts_of_llm_generate(cluster, chat_model, expected):
    from nanovllm.ray import LLMPredictor

    ray.init(address=cluster)
    try:

        def predicted(items: list[dict], concurrency: int, batch_size: int) -> list[dict]:
            """The rows (each with a "row" index) through LLMPredictor, in their order."""
            out = ray.data.from_items(items).map_batches(
                LLMPredictor,
                concurrency=concurrency,
                batch_size=batch_size,
                fn_constructor_kwargs={"model": str(chat_model.path), "sampling_params": GREEDY},
            )
            return sorted(out.take_all(), key=lambda r: r["row"])

        rows = predicted([{"prompt": p, "row": i} for i, p in enumerate(PROMPTS)], 2, 2)
        assert [r["text"] for r in rows] == expected
        assert [r["prompt"] for r in rows] == PROMPTS  # the input columns are kept
        assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 12 for r in rows)

        # chat rows: the same as LLM.chat
        chats = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
        llm = LLM(str(chat_model.path), verbose=False)
        want = [
            o.outputs[0].text for o in llm.chat(chats, SamplingParams(**GREEDY), use_tqdm=False)
        ]
        got = predicted([{"messages": c, "row": i} for i, c in enumerate(chats)], 1, 3)
        assert [r["text"] for r in got] == want

        # a row with neither column is refused, naming what a row needs
        bad = ray.data.from_items([{"text": "x"}]).map_batches(
            LLMPredictor, concurrency=1, fn_constructor_kwargs={"model": str(chat_model.path)}
        )
        with pytest.raises(Exception, match="a row needs a 'prompt'"):
            bad.take_all()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def replicas(cluster, chat_model, tmp_path_factory):
    """A server of 2 replicas on the two-node cluster (2 CPUs each: one replica per node)."""
    log = tmp_path_factory.mktemp("dp") / "server.log"
    srv = start_server(
        ["--model", str(chat_model.path), "--data-parallel-size", "2", "--ray-address", cluster,
         "--num-cpus-per-replica", "2", "--max-num-seqs", "4"],
        log, timeout=240,
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.output()


def test_two_replicas_answer_everything_with_one_engines_texts(replicas, expected, chat_model):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{replicas.url}/v1", api_key="none", max_retries=0)
    name = chat_model.path.name

    async def run():
        outs = await asyncio.gather(
            *(client.completions.create(model=name, prompt=p, **API_GREEDY) for p in PROMPTS * 2)
        )
        stream = await client.completions.create(model=name, prompt=PROMPTS[0], stream=True,
                                                 **API_GREEDY)  # fmt: skip
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        return [o.choices[0].text for o in outs], streamed

    texts, streamed = asyncio.run(run())
    assert texts == expected * 2
    assert streamed == expected[0]
    health = httpx.get(f"{replicas.url}/health").json()
    assert health["status"] == "ok" and [r["engine"] for r in health["replicas"]] == ["0", "1"]
    metrics = httpx.get(f"{replicas.url}/metrics").text
    for engine in ("0", "1"):  # both replicas served some of them, each under its own label
        line = next(
            line for line in metrics.splitlines()
            if line.startswith("nanovllm:request_success_total{") and f'engine="{engine}"' in line
            and 'finished_reason="length"' in line
        )  # fmt: skip
        assert float(line.rsplit(" ", 1)[1]) > 0, line
    assert metrics.count("# TYPE nanovllm:generation_tokens_total counter") == 1
    # a bad request is refused by the front end, in OpenAI's shape
    bad = httpx.post(f"{replicas.url}/v1/completions", json={"prompt": "x", "temperature": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def test_a_killed_replica_fails_its_requests_and_the_other_serves(replicas, expected, chat_model):
    """Runs last on the server: it leaves replica 1 dead."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{replicas.url}/v1", api_key="none", max_retries=0)
    name = chat_model.path.name
    long = {**API_GREEDY, "max_tokens": 100}
    before = httpx.get(f"{replicas.url}/health").json()["replicas"]

    async def one(prompt: str):
        try:
            out = await client.completions.create(model=name, prompt=prompt, **long)
            return out.choices[0].finish_reason
        except openai.APIStatusError as e:
            return e

    async def run():
        tasks = [asyncio.create_task(one(p)) for p in PROMPTS[:2]]
        while (
            sum(r["in_flight"] for r in httpx.get(f"{replicas.url}/health").json()["replicas"]) < 2
        ):
            await asyncio.sleep(0.05)
        os.kill(before[1]["pid"], signal.SIGKILL)
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    failed = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(failed) == 1 and failed[0].status_code == 500, results
    assert "engine replica 1 died" in failed[0].message
    assert "length" in results  # replica 0's request went on to its end
    health = httpx.get(f"{replicas.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    down = health.json()["replicas"][1]
    assert down["status"] == "down" and "died" in down["reason"]
    # every new request goes to the replica that is left
    sync = openai.OpenAI(base_url=f"{replicas.url}/v1", api_key="none", max_retries=0)
    texts = [
        sync.completions.create(model=name, prompt=p, **API_GREEDY).choices[0].text
        for p in PROMPTS[:3]
    ]
    assert texts == expected[:3]
    assert 'engine="1"' not in httpx.get(f"{replicas.url}/metrics").text


def test_serve_refuses_bad_ray_options_with_one_line(cluster, chat_model):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    run = subprocess.run(
        [sys.executable, "-m", "nanovllm", "serve", "--model", str(chat_model.path),
         "--data-parallel-size", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 2 and "--data-parallel-size 0 must be 1 or more" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "nanovllm", "serve", "--model", str(chat_model.path),
         "--data-parallel-size", "2", "--ray-address", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 2 and "no Ray cluster answers there" in run.stderr
    # a replica that cannot load its model: the server exits, naming the replica's error
    run = subprocess.run(
        [sys.executable, "-m", "nanovllm", "serve", "--model", "/no/such/model",
         "--data-parallel-size", "2", "--ray-address", cluster, "--port", str(free_port())],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "an engine replica could not start" in run.stderr and "/no/such/model" in run.stderr
