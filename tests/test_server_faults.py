"""The server under faults: a model step that raises, an engine that cannot go on, a full
waiting queue, a model still loading or failing to load, and SIGTERM / Ctrl-C.

Step faults are injected into a real engine (the tiny Llama with a tokenizer, served by uvicorn
in a thread of this process) by wrapping its runner's `execute`; everything else is real.
Signals go to real `python -m nanovllm serve` processes with the default model.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import free_port, start_server

from nanovllm import LLM

pytestmark = pytest.mark.slow
PROMPT = [20, 21, 22, 23, 24]


@pytest.fixture(scope="module", autouse=True)
def numpy_session(backend):
    if backend != "numpy":
        pytest.skip("the server is backend-independent; its tests run in the numpy session")


class Faults:
    """Wraps runner.execute: an optional delay per step, and the next `fail` steps raise."""

    def __init__(self, runner):
        self.real, self.delay, self.fail = runner.execute, 0.0, 0
        runner.execute = self

    def __call__(self, batch):
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("injected fault: the device fell over")
        return self.real(batch)


class InProcessServer:
    def __init__(self, llm: LLM | None, max_waiting: int | None = None):
        import uvicorn

        from nanovllm.server.app import ServerState, build_app
        from nanovllm.server.metrics import Metrics

        self.llm = llm
        self.state = ServerState("tiny", Metrics("tiny"))
        if llm is not None:
            self.state.attach(llm, max_waiting)
            self.faults = Faults(llm.engine.runner)
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(build_app(self.state), port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def complete(self, **body) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", json={"prompt": PROMPT, **body}, timeout=30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.state.loop is not None:
            self.state.loop.stop()


@pytest.fixture
def serve(tiny):
    servers = []

    def make(max_waiting: int | None = None, load: bool = True, **llm_kw) -> InProcessServer:
        llm = LLM(str(tiny.path), verbose=False, **llm_kw) if load else None
        servers.append(InProcessServer(llm, max_waiting))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def kv_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("nanovllm:kv_cache_usage_perc{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no kv_cache_usage_perc sample")


def test_a_failing_step_fails_its_requests_with_500_and_the_server_goes_on(serve, tiny):
    srv = serve()
    want = tiny.greedy(PROMPT, 6)[0]
    srv.faults.fail = 1
    r = srv.complete(max_tokens=6, temperature=0)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert "injected fault: the device fell over" in error["message"]
    assert error["type"] == "server_error" and error["code"] == 500
    good = srv.complete(max_tokens=6, temperature=0, ignore_eos=True)
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] == srv.llm.tokenizer.decode(want)
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert kv_usage(srv.url) == 0


def test_non_finite_logits_fail_that_request_with_500_and_the_others_go_on(serve, tiny):
    srv = serve()
    want = tiny.greedy(PROMPT, 6)[0]
    token = next(t for t in range(5, 100) if t not in want and t not in PROMPT)
    b = srv.llm.backend
    embed = b.to_host(srv.llm.model.params["embed"]).copy()
    embed[token] = np.nan  # any sequence holding this token computes NaN
    srv.llm.model.params["embed"] = b.weight(embed)
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [3, token, 5]}, timeout=30)
    assert r.status_code == 500 and "non-finite logits" in r.json()["error"]["message"]
    good = srv.complete(max_tokens=6, temperature=0, ignore_eos=True)
    assert good.json()["choices"][0]["text"] == srv.llm.tokenizer.decode(want)
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'finished_reason="error",model_name="tiny"} 1.0' in metrics
    assert kv_usage(srv.url) == 0


def test_an_error_mid_stream_is_a_final_sse_error_event(serve):
    srv = serve()
    srv.faults.delay = 0.02
    events = []
    with httpx.stream(
        "POST",
        f"{srv.url}/v1/completions",
        timeout=30,
        json={"prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "stream": True},
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    srv.faults.fail = 1
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "injected fault" in error["message"] and error["code"] == 500
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert srv.complete(max_tokens=3).status_code == 200


def test_an_engine_that_keeps_failing_turns_health_503(serve):
    srv = serve()
    srv.faults.fail = 100
    for _ in range(3):  # each request fails one step; the third failure in a row is fatal
        assert srv.complete(max_tokens=4).status_code == 500
    health = httpx.get(f"{srv.url}/health")
    assert health.status_code == 503 and "3 steps in a row" in health.json()["reason"]
    r = srv.complete(max_tokens=4)
    assert r.status_code == 503 and "3 steps in a row" in r.json()["error"]["message"]


def test_past_max_waiting_requests_is_503_with_retry_after(serve):
    srv = serve(max_waiting=2, max_num_seqs=1, max_num_batched_tokens=64)
    srv.faults.delay = 0.01

    async def fire():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        f"{srv.url}/v1/completions",
                        json={"prompt": PROMPT, "max_tokens": 10, "ignore_eos": True},
                    )
                    for _ in range(12)
                )
            )

    replies = asyncio.run(fire())
    refused = [r for r in replies if r.status_code == 503]
    served = [r for r in replies if r.status_code == 200]
    assert len(refused) + len(served) == 12 and refused and served
    for r in refused:
        assert (
            r.headers["retry-after"] and "--max-waiting-requests=2" in r.json()["error"]["message"]
        )
    for r in served:
        assert r.json()["usage"]["completion_tokens"] == 10
    assert srv.complete(max_tokens=3).status_code == 200


def next_event(lines) -> str:
    return next(line for line in lines if line.startswith("data: "))


def test_a_waiting_request_whose_client_leaves_frees_its_place(serve):
    srv = serve(max_waiting=1, max_num_seqs=1, max_num_batched_tokens=64)
    srv.faults.delay = 0.05
    quick = httpx.Timeout(30, read=0.5)
    with httpx.stream(
        "POST",
        f"{srv.url}/v1/completions",
        timeout=30,
        json={"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True},
    ) as running:
        lines = running.iter_lines()  # kept open: closing it would disconnect
        assert next_event(lines)
        for _ in range(3):  # each waits behind the running one, then its client leaves
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{srv.url}/v1/completions", json={"prompt": PROMPT}, timeout=quick)
            time.sleep(0.2)  # the engine loop takes the abort
        assert "choices" in next_event(lines)  # still running
    assert srv.complete(max_tokens=3).status_code == 200


def test_while_the_model_loads_health_and_routes_answer_503(serve):
    srv = serve(load=False)
    assert httpx.get(f"{srv.url}/health").status_code == 503
    r = srv.complete(max_tokens=3)
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    assert r.headers["retry-after"]
    assert httpx.get(f"{srv.url}/version").status_code == 200


def test_a_model_that_cannot_load_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nope.gguf"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanovllm",
            "serve",
            "--model",
            str(missing),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "nanovllm: error:" in result.stderr and str(missing) in result.stderr


def test_bad_serve_options_exit_2():
    for args in (
        ["--port", "70000"],
        ["--max-waiting-requests", "-1"],
        ["--override-generation-config", '{"temprature": 1}'],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "nanovllm", "serve", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert args[0] in result.stderr, result.stderr
    # a bad speculative config is refused before the port is opened
    result = subprocess.run(
        [sys.executable, "-m", "nanovllm", "serve", "--speculative-config", '{"method": "x"}'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "speculative_config method='x'" in result.stderr
    assert "Uvicorn running" not in result.stderr + result.stdout


def test_data_parallel_without_ray_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed here; tests/test_ray.py covers data parallelism")
    result = subprocess.run(
        [sys.executable, "-m", "nanovllm", "serve", "--data-parallel-size", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'nanovllm[ray]'" in result.stderr
    assert "Uvicorn running" not in result.stderr + result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_aborts_what_runs_and_exits_0_within_seconds(default_gguf, tmp_path, sig):
    srv = start_server(
        [
            "--model",
            str(default_gguf),
            "--max-model-len",
            "4096",
            "--kv-cache-memory",
            str(256 << 20),
        ],
        tmp_path / "server.log",
    )
    events, sent_at = [], None
    with httpx.stream(
        "POST",
        f"{srv.url}/v1/completions",
        timeout=30,
        json={"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    srv.proc.send_signal(sig)
                    sent_at = time.monotonic()
    assert srv.proc.wait(timeout=15) == 0, srv.output()
    assert time.monotonic() - sent_at < 10
    assert events[-1] == "[DONE]"
    assert "shutting down" in json.loads(events[-2])["error"]["message"]
    assert len(events) < 100
