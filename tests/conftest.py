"""Shared fixtures: the backend under test and tiny random checkpoints built with transformers.

The backend comes from `--backend` or the NANOVLLM_BACKEND environment variable (default
numpy); nox sets the variable once per session. A backend whose library is not installed
skips the tests that need it, naming the package.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from nanovllm.backend import ALIASES, BACKENDS, BackendError, get_backend

NEAR_TIE = 1e-4  # a greedy step whose top-2 logit gap is below this is a coin flip


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        action="store",
        default=None,
        help="array backend for nanovllm (numpy, array_api_strict, jax, torch); "
        "default: $NANOVLLM_BACKEND or numpy",
    )


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory):
    """Converted GGUF weights go to this session's own directory, not the user's cache (a test's
    GGUF files are new each run); subprocesses (the CLI, the server) inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("converted-weights")
        mp.setenv("NANOVLLM_WEIGHTS_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def backend(request) -> str:
    name = request.config.getoption("--backend") or os.environ.get("NANOVLLM_BACKEND") or "numpy"
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise pytest.UsageError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    _, library, extra = BACKENDS[name]
    try:
        importlib.import_module(library)
    except ImportError:
        hint = f" (pip install 'nanovllm[{extra}]')" if extra else ""
        pytest.skip(f"backend {name!r} needs the {library!r} package, which is not installed{hint}")
    try:
        get_backend(name)
    except BackendError as e:  # installed but unusable here, e.g. cupy without a GPU
        pytest.skip(f"backend {name!r} cannot run here: {e}")
    return name


@pytest.fixture(scope="session")
def check_logprobs():
    """check(entries, row, k, actual, where, tol): one position of vLLM-shaped logprobs.

    `entries` maps token id -> Logprob and must hold the top k by rank plus the actual token;
    `row` is the reference log-softmax. Values must match within tol, and each rank must
    point at a reference value within tol (so near-ties may swap order but not values).
    """

    def check(entries: dict, row: np.ndarray, k: int, actual: int, where: str, tol: float) -> None:
        assert actual in entries, f"{where}: token {actual} missing from {sorted(entries)}"
        desc = np.sort(row)[::-1]
        for t, lp in entries.items():
            assert abs(lp.logprob - row[t]) < tol, (
                f"{where}: token {t} logprob {lp.logprob:.6f}, reference {row[t]:.6f}"
            )
            assert 1 <= lp.rank <= len(row) and abs(desc[lp.rank - 1] - lp.logprob) < tol, (
                f"{where}: token {t} has rank {lp.rank}, but the reference rank-{lp.rank} "
                f"logprob is {desc[min(lp.rank, len(row)) - 1]:.6f}, not {lp.logprob:.6f}"
            )
        top = [t for t, lp in entries.items() if lp.rank <= k]
        assert len(top) == k, f"{where}: {len(top)} entries of rank <= {k}: {entries}"
        if k:
            must = np.flatnonzero(row > desc[k - 1] + tol)  # clearly inside the top k
            assert set(must.tolist()) <= set(top), f"{where}: top {k} {top} lacks {must}"

    return check


# ---- tiny random Llama checkpoints ------------------------------------------------------------

TINY_LLAMA = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass
class TinyModel:
    """A checkpoint directory and the transformers model it was saved from (float32, eval)."""

    path: Path
    model: object
    _greedy: dict = field(default_factory=dict)

    def log_softmax(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] log-probabilities of the next token at every position."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: threads only add contention
        try:
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].double()
        finally:
            torch.set_num_threads(threads)
        return torch.log_softmax(logits, dim=-1).numpy()

    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], np.ndarray]:
        """Greedy tokens by full recomputation (no KV cache), and each step's log-softmax row.

        Fails when a step is a near-tie (top-2 gap below NEAR_TIE): that is a bad seed, not a
        bug, and the test should be given another seed.
        """
        tie = self.near_tie(prompt, max_tokens)
        if tie is not None:
            pytest.fail(f"reference {tie}; choose another seed or prompt")
        return self._greedy[(tuple(prompt), max_tokens)]

    def near_tie(self, prompt: list[int], max_tokens: int) -> str | None:
        """Where greedy decoding of `prompt` meets a near-tie, or None (and greedy() is safe)."""
        key = (tuple(prompt), max_tokens)
        if key not in self._greedy:
            ids, rows = list(prompt), []
            for step in range(max_tokens):
                row = self.log_softmax(ids)[-1]
                top2 = np.sort(row)[-2:]
                if top2[1] - top2[0] < NEAR_TIE:
                    return (
                        f"near-tie at step {step} of prompt {prompt}: top-2 gap "
                        f"{top2[1] - top2[0]:.2e}"
                    )
                ids.append(int(np.argmax(row)))
                rows.append(row)
            self._greedy[key] = (ids[len(prompt) :], np.stack(rows))
        return None


def build_tiny_llama(path: Path, seed: int = 0, std: float = 0.25, **overrides) -> TinyModel:
    """A random LlamaForCausalLM saved with save_pretrained (the real safetensors layout).

    Every parameter is redrawn (biases and norm weights too, which transformers initialises
    to 0 and 1) so that each one affects the output and greedy steps are rarely near-ties.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.save_pretrained(path)
    return TinyModel(path, model)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Factory: tiny_llama(name, seed=..., **LlamaConfig overrides) -> TinyModel, built once."""
    pytest.importorskip("torch", reason="building reference checkpoints needs torch")
    pytest.importorskip("transformers", reason="building reference checkpoints needs transformers")
    built: dict[str, TinyModel] = {}

    def make(name: str, seed: int = 0, **overrides) -> TinyModel:
        if name not in built:
            built[name] = build_tiny_llama(tmp_path_factory.mktemp(name), seed, **overrides)
        return built[name]

    return make


# ---- a tiny Llama that takes text: trained byte-level BPE + ChatML template ---------------
CORPUS = [
    "The capital of France is Paris.",
    "Hello world, hello there!",
    "the cat sat on the mat",
    "You are a helpful assistant.",
    "What is the answer? It is 42.",
    "x = 1 + 2 * 3; y = [4, 5]",
    "Quick brown foxes jump over lazy dogs.",
    "ZEBRAS QUIETLY VEX JUMPING KOALAS",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n'}}{% endif %}"
)


def train_tokenizer():
    """Byte-level BPE whose alphabet is the corpus' ASCII characters: every token is text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS * 3, trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIALS)
    )
    return tok


def with_tokenizer(tiny_llama, name: str = "chat_llama", seed: int = 11, **overrides):
    """The conftest tiny Llama (vocab = the tokenizer's) with tokenizer + ChatML saved beside."""
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer()
    tm = tiny_llama(name, seed=seed, vocab_size=tok.get_vocab_size(), **overrides)
    if not (tm.path / "tokenizer.json").is_file():
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        fast.chat_template = CHATML
        fast.save_pretrained(tm.path)
    return tm


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """The tiny Llama with a trained tokenizer and a ChatML template (tests/test_api.py,
    test_sampling.py, test_bad_input.py).

    One torch thread while it lives: on 2 shared cores torch's default of one thread per
    core makes a tiny forward pass ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield with_tokenizer(tiny_llama)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pick_stop():
    """pick_stop(text, length=3): a stop string that first occurs in the middle of text."""

    def pick(text: str, length: int = 3) -> str:
        for i in range(len(text) // 3, len(text) - length):
            stop = text[i : i + length]
            if text.find(stop) >= 3 and stop.strip():
                return stop
        pytest.fail(f"no usable stop string in {text!r}")

    return pick


# ---- a real server process on a free loopback port ------------------------------------------


@dataclass
class ServerProcess:
    """`python -m nanovllm serve ...` running on 127.0.0.1:port; its output goes to `log`."""

    proc: object
    port: int
    log: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 15.0) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: list[str], log: Path, api_key: str | None = None, timeout: float = 180.0
) -> ServerProcess:
    """Start a server and wait until /health says 200; fail with its output if it does not."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    command = [sys.executable, "-m", "nanovllm", "serve", "--port", str(port), *args]
    if api_key:
        command += ["--api-key", api_key]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.stop()
    pytest.fail(f"the server was not healthy within {timeout:.0f}s:\n{server.output()}")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default SmolLM2 GGUF, fetched into the cache once (skips when it cannot be)."""
    from nanovllm.errors import DefaultModelError
    from nanovllm.weights.default_model import default_model_path

    try:
        return default_model_path()
    except (DefaultModelError, OSError) as e:
        pytest.skip(f"the default SmolLM2 GGUF is not cached and could not be fetched: {e}")
