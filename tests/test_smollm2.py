"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) through our loader, against
transformers loading the same file (dequantized to float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

TOL = 2e-3
MAX_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Größe, café und naïve Fußgänger: 東京は日本の首都です 😀",
]
# greedy continuations whose top-2 logit gaps stay above 0.07 in transformers (no near-ties)
GREEDY_PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "import numpy as np\n\n",
    "My favourite fruit is",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """transformers on one thread: under a loaded CPU, more threads run ~10x slower."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gguf(default_gguf) -> Path:
    return default_gguf


@pytest.fixture(scope="module")
def hf_tokenizer(gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def hf_model(gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def llm(gguf, backend) -> LLM:
    return LLM(None, backend=backend, max_model_len=512, num_kv_blocks=80, verbose=False)


def hf_log_softmax(hf_model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def hf_greedy(hf_model, ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens through transformers' KV cache, ignoring EOS, with each step's top-2
    logit gap."""
    import torch

    tokens, gaps = [], []
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), use_cache=True)
        for _ in range(max_tokens):
            logits = out.logits[0, -1]
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(torch.argmax(logits)))
            # transformers >= 5.2x names the cache `cache`; earlier, `past_key_values`
            name = "cache" if "cache" in out else "past_key_values"
            out = hf_model(torch.tensor([tokens[-1:]]), use_cache=True, **{name: out[name]})
    return tokens, gaps


def test_tokenization_matches_transformers(llm, hf_tokenizer):
    for text in [*PROMPTS, "", "  two  spaces\nnew line\ttab", "<|im_start|>user\nhi<|im_end|>"]:
        assert llm.tokenizer.encode(text) == hf_tokenizer(text)["input_ids"], repr(text)
    ours = llm.chat_prompt(CHAT)
    theirs = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
    assert ours == list(theirs)


def test_prompt_logprobs(llm, hf_model, hf_tokenizer, check_logprobs):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for text, out in zip(PROMPTS, outs, strict=True):
        ids = out.prompt_token_ids
        assert ids == hf_tokenizer(text)["input_ids"]
        ref = hf_log_softmax(hf_model, ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for p in range(1, len(ids)):
            check_logprobs(
                out.prompt_logprobs[p], ref[p - 1], 5, ids[p], f"{text!r} position {p}", TOL
            )


def test_greedy_matches_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(GREEDY_PROMPTS, params, use_tqdm=False)
    for text, out in zip(GREEDY_PROMPTS, outs, strict=True):
        want, gaps = hf_greedy(hf_model, out.prompt_token_ids, MAX_TOKENS)
        got = out.outputs[0].token_ids
        if got != want:
            i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            detail = (
                f"first difference at step {i}: ours {got[i]}, transformers {want[i]} "
                f"(transformers' top-2 logit gap there {gaps[i]:.2e})"
            )
            assert gaps[i] < 2 * TOL, f"{text!r}: {got} != {want}; {detail}"
            pytest.fail(f"{text!r}: a near-tie within tolerance; choose another prompt. {detail}")


def test_chat_knows_paris(llm):
    out = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
