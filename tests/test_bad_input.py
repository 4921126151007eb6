"""Bad input gets a clear error (naming the value, the limit and the fix), and the LLM that saw
it still serves a good request correctly afterwards with no KV block leaked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams

MAX_MODEL_LEN = 64
GOOD = [20, 21, 22, 23, 24]


@pytest.fixture(scope="module")
def vocab(tiny) -> int:
    return tiny.model.config.vocab_size


@pytest.fixture(scope="module")
def want(tiny) -> list[int]:
    return tiny.greedy(GOOD, 8)[0]


@pytest.fixture(scope="module")
def llm(tiny, backend):
    return LLM(
        str(tiny.path), backend=backend, verbose=False, max_model_len=MAX_MODEL_LEN, block_size=8
    )


def copy_model(src: Path, dst: Path, tokenizer: bool = True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if tokenizer or f.name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def no_tokenizer_dir(tiny, tmp_path_factory) -> Path:
    return copy_model(tiny.path, tmp_path_factory.mktemp("no_tokenizer"), tokenizer=False)


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def assert_still_serves(llm: LLM, want: list[int]) -> None:
    """Nothing queued or held, and a good request after the bad one is served correctly."""
    eng = llm.engine
    assert not eng.requests, f"left in the engine: {list(eng.requests)}"
    assert not eng.scheduler.waiting and not eng.scheduler.running
    free = eng.scheduler.block_manager.num_free_blocks
    assert free == llm.config.num_kv_blocks - 1, "KV blocks leaked"
    out = llm.generate([GOOD], greedy(8), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert eng.scheduler.block_manager.num_free_blocks == free


def message(exc_info) -> str:
    return str(exc_info.value)


# ---- bad prompts ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-text", "empty-ids"])
def test_empty_prompt(llm, want, prompt):
    with pytest.raises(ValueError) as e:
        llm.generate([prompt], greedy(), use_tqdm=False)
    assert "empty" in message(e) and "at least one" in message(e)
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request(prompt, greedy())
    with pytest.raises(ValueError, match="empty"):
        list(llm.stream(prompt, greedy()))
    assert_still_serves(llm, want)


def test_empty_text_prompt_alone(llm, want):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", greedy(), use_tqdm=False)
    assert_still_serves(llm, want)


def test_prompt_longer_than_max_model_len(llm, want):
    too_long = [5] * MAX_MODEL_LEN
    with pytest.raises(ValueError) as e:
        llm.generate([too_long], greedy(), use_tqdm=False)
    msg = message(e)
    assert str(MAX_MODEL_LEN) in msg and "max_model_len" in msg
    assert "shorten" in msg or "raise max_model_len" in msg
    with pytest.raises(ValueError, match=str(5 * MAX_MODEL_LEN)):
        llm.generate([[5] * (5 * MAX_MODEL_LEN)], greedy(), use_tqdm=False)
    assert_still_serves(llm, want)


def test_prompt_one_below_max_model_len_still_runs(llm, want):
    out = llm.generate([[5] * (MAX_MODEL_LEN - 1)], greedy(8), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert_still_serves(llm, want)


def test_text_prompt_longer_than_max_model_len(llm, want):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("Hello world, hello there! " * 40, greedy(), use_tqdm=False)
    assert_still_serves(llm, want)


@pytest.mark.parametrize("bad", ["vocab", "vocab+1000", -1], ids=["=vocab", ">vocab", "negative"])
def test_token_id_outside_the_vocabulary(llm, want, vocab, bad):
    token = {"vocab": vocab, "vocab+1000": vocab + 1000}.get(bad, bad)
    with pytest.raises(ValueError) as e:
        llm.generate([[3, 4, token, 5]], greedy(), use_tqdm=False)
    msg = message(e)
    assert str(token) in msg and str(vocab) in msg, msg
    assert_still_serves(llm, want)


@pytest.mark.parametrize("bad", [1.5, "7", None, True], ids=["float", "str", "None", "bool"])
def test_token_id_of_the_wrong_type(llm, want, bad):
    with pytest.raises((ValueError, TypeError)) as e:
        llm.generate([[3, 4, bad]], greedy(), use_tqdm=False)
    assert "int" in message(e)
    assert_still_serves(llm, want)


def test_batch_with_one_bad_prompt_runs_nothing(llm, want, vocab):
    eng = llm.engine
    free = eng.scheduler.block_manager.num_free_blocks
    batch = [GOOD, [6, 7, 8], [9, vocab + 5], [10, 11]]
    with pytest.raises(ValueError, match=str(vocab + 5)):
        llm.generate(batch, greedy(), use_tqdm=False)
    assert not eng.requests and not eng.scheduler.waiting and not eng.scheduler.running
    assert eng.scheduler.block_manager.num_free_blocks == free
    assert eng.step() == []  # nothing of the batch runs later either
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["hello", ""], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([GOOD, [5] * 500], greedy(), use_tqdm=False)
    assert_still_serves(llm, want)


# ---- bad sampling parameters ---------------------------------------------------------------


def test_invalid_sampling_params_rejected_before_anything_runs(llm, want):
    for kw in (
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-3),
        dict(min_p=2.0),
        dict(n=0),
        dict(max_tokens=0),
        dict(logprobs=21),
        dict(stop=""),
    ):
        with pytest.raises(ValueError) as e:
            llm.generate([GOOD], SamplingParams(**kw), use_tqdm=False)
        name = next(iter(kw))
        assert f"SamplingParams.{name}=" in message(e) and "allowed" in message(e)
    assert_still_serves(llm, want)


def test_sampling_params_of_the_wrong_type(llm, want):
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([GOOD], [dict(temperature=0.0)], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([GOOD, GOOD], [greedy(), {"max_tokens": 3}], use_tqdm=False)
    assert_still_serves(llm, want)


@pytest.mark.parametrize(
    "field,value",
    [("n", 0), ("temperature", -1.0), ("top_k", -5), ("logprobs", 100), ("max_tokens", 0)],
)
def test_sampling_params_made_invalid_after_construction(llm, want, field, value):
    """A SamplingParams is a mutable dataclass; the engine must validate what it receives."""
    p = greedy()
    setattr(p, field, value)
    with pytest.raises(ValueError) as e:
        llm.generate([GOOD], p, use_tqdm=False)
    assert f"SamplingParams.{field}=" in message(e), message(e)
    assert_still_serves(llm, want)


def test_stop_token_id_outside_the_vocabulary(llm, want, vocab):
    """A stop id the model can never produce: a clear error, or simply never matched."""
    bad = vocab + 10
    for p in (greedy(4, stop_token_ids=[bad]), greedy(4, stop_token_ids=[bad], min_tokens=2)):
        try:
            out = llm.generate([GOOD], p, use_tqdm=False)[0]
        except ValueError as e:
            assert str(bad) in str(e) and str(vocab) in str(e), str(e)
        else:
            assert out.outputs[0].token_ids == want[:4]
            assert out.outputs[0].finish_reason == "length"
    assert_still_serves(llm, want)


# ---- bad models, backends and paths ----------------------------------------------------------


def test_unknown_backend_lists_the_known_ones(tiny, llm, want):
    with pytest.raises(ValueError) as e:
        LLM(str(tiny.path), backend="tensorflow", verbose=False)
    msg = message(e)
    assert "'tensorflow'" in msg and "numpy" in msg and "array_api_strict" in msg
    assert_still_serves(llm, want)


def test_nonexistent_model_path(tmp_path, llm, want):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ValueError) as e:
        LLM(str(missing), verbose=False)
    assert str(missing) in message(e) and "does not exist" in message(e)
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nothing.gguf"), verbose=False)
    assert_still_serves(llm, want)


def test_directory_without_config(tmp_path, llm, want):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path), verbose=False)
    assert_still_serves(llm, want)


def test_unsupported_architecture_lists_the_supported_ones(tiny, tmp_path, backend, llm, want):
    d = copy_model(tiny.path, tmp_path / "foo")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        LLM(str(d), backend=backend, verbose=False)
    msg = message(e)
    assert "FooForCausalLM" in msg and "LlamaForCausalLM" in msg and "supported" in msg
    assert_still_serves(llm, want)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4], ids=["half", "last-bytes", "header-only"])
def test_truncated_safetensors(tiny, tmp_path, backend, llm, want, keep):
    d = copy_model(tiny.path, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ValueError) as e:
        LLM(str(d), backend=backend, verbose=False)
    msg = message(e)
    assert "model.safetensors" in msg and ("truncated" in msg or "corrupt" in msg), msg
    assert_still_serves(llm, want)


def test_random_bytes_named_gguf(tmp_path, backend, llm, want):
    f = tmp_path / "random.gguf"
    f.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError) as e:
        LLM(str(f), backend=backend, verbose=False)
    assert "random.gguf" in message(e) and "GGUF" in message(e)
    assert_still_serves(llm, want)


def test_gguf_magic_then_garbage(tmp_path, backend, llm, want):
    f = tmp_path / "garbage.gguf"
    f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + os.urandom(2048))
    with pytest.raises(ValueError, match="garbage.gguf"):
        LLM(str(f), backend=backend, verbose=False)
    assert_still_serves(llm, want)


def test_truncated_real_gguf(tmp_path, backend, llm, want, default_gguf):
    f = tmp_path / "smol-truncated.gguf"
    with open(default_gguf, "rb") as src:
        f.write_bytes(src.read(1 << 20))
    with pytest.raises(ValueError) as e:
        LLM(str(f), backend=backend, verbose=False)
    msg = message(e)
    assert "smol-truncated.gguf" in msg and ("truncated" in msg or "corrupt" in msg), msg
    assert_still_serves(llm, want)


def test_non_gguf_file(tmp_path, llm, want):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"\.gguf"):
        LLM(str(f), verbose=False)
    assert_still_serves(llm, want)


# ---- a model without a tokenizer ---------------------------------------------------------


def test_text_prompt_to_a_model_without_tokenizer(no_tokenizer_dir, backend, want):
    llm = LLM(str(no_tokenizer_dir), backend=backend, verbose=False, max_model_len=MAX_MODEL_LEN)
    assert llm.get_tokenizer() is None
    with pytest.raises(ValueError) as e:
        llm.generate("Hello world", greedy(), use_tqdm=False)
    assert "tokenizer" in message(e) and "token ids" in message(e)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate([GOOD, "Hello"], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}], greedy(), use_tqdm=False)
    out = llm.generate([GOOD], greedy(8), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want and out.outputs[0].text == ""
    assert_still_serves(llm, want)


def test_chat_with_bad_messages(llm, want):
    with pytest.raises(ValueError, match="empty conversation"):
        llm.chat([[]], greedy(), use_tqdm=False)
    assert_still_serves(llm, want)


# ---- typed, bounded inputs (one LLM, the hostile-but-realistic caller) ------------------------


@pytest.mark.parametrize(
    "prompt",
    [b"hello", None, 7.5, {"ids": [1]}, [3, 4, b"x"]],
    ids=["bytes", "None", "float", "dict", "list-with-bytes"],
)
def test_a_prompt_must_be_text_or_token_ids(llm, want, prompt):
    from nanovllm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        llm.generate([prompt], greedy(), use_tqdm=False)
    assert "a prompt must be a str or a list of int token ids" in message(e)
    assert type(prompt).__name__ in message(e)
    assert_still_serves(llm, want)


def test_text_that_is_not_utf8_encodable_is_an_invalid_request(llm, want):
    from nanovllm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["Paris \ud800 is"], greedy(), use_tqdm=False)
    assert "lone surrogate" in message(e) and "index 6" in message(e)
    assert_still_serves(llm, want)


@pytest.mark.parametrize(
    "kw,field_name",
    [
        (dict(temperature="0.5"), "temperature"),
        (dict(top_p=None), "top_p"),
        (dict(n=10**6), "n"),
        (dict(n=4097), "n"),
        (dict(seed=2**70), "seed"),
        (dict(seed=-(2**64)), "seed"),
        (dict(seed="1"), "seed"),
        (dict(max_tokens=2.0), "max_tokens"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=7), "stop_token_ids"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(presence_penalty="1"), "presence_penalty"),
    ],
)
def test_every_sampling_field_is_type_checked(llm, want, kw, field_name):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert f"SamplingParams.{field_name}=" in message(e) and "allowed" in message(e)
    assert_still_serves(llm, want)


def test_seed_bounds_are_the_signed_64_bit_range():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)


def test_a_field_changed_after_construction_is_honoured(llm, want):
    text = llm.generate([GOOD], greedy(8), use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and text.find(stop) > 0
    params = greedy(8)
    params.stop = [stop]  # set after construction: add_request re-derives it
    out = llm.generate([GOOD], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]
    params.n = 0
    with pytest.raises(ValueError, match="SamplingParams.n="):
        llm.generate([GOOD], params, use_tqdm=False)
    assert_still_serves(llm, want)


@pytest.mark.parametrize(
    "messages,words",
    [
        ([{"content": "hi"}], "messages[0] has no str 'role'"),
        ([{"role": "user", "content": 5}], "messages[0]['content'] must be a str"),
        (["hello"], "a conversation must be a list of message dicts, not str"),
        ([[{"role": "user", "content": "hi"}, 3]], "messages[1] must be a dict"),
        ([{"role": "user", "content": "hi"}, {"role": None, "content": "x"}], "messages[1]"),
    ],
)
def test_chat_messages_are_validated_before_rendering(llm, want, messages, words):
    from nanovllm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        llm.chat(messages, greedy(), use_tqdm=False)
    assert words in message(e)
    assert_still_serves(llm, want)


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_num_seqs=0),
        dict(max_num_batched_tokens=-4),
        dict(kv_cache_memory=0),
        dict(max_model_len=1.5),
    ],
)
def test_engine_sizes_are_checked_by_name_before_loading(tiny, kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"^{name}=.* must be a positive integer"):
        LLM(str(tiny.path), verbose=False, **kw)


def test_cli_replaces_text_that_is_not_utf8(tiny, tmp_path):
    import subprocess
    import sys

    run = dict(capture_output=True, timeout=120)
    base = [sys.executable, "-m", "nanovllm", "--model", str(tiny.path), "--max-tokens", "3"]
    piped = subprocess.run([*base, "-"], input=b"caf\xe9 \xff\xfe\nhello\n", **run)
    assert piped.returncode == 0, piped.stderr.decode()
    assert "\ufffd" in piped.stdout.decode()
    argv = subprocess.run([*base, "caf\udce9 au lait"], **run)  # the byte 0xe9 in argv
    assert argv.returncode == 0, argv.stderr.decode()
    assert "caf\ufffd au lait" in argv.stdout.decode()


# ---- a hostile chat template in the model files -------------------------------------------------

HOSTILE_TEMPLATES = {
    "repeat": ("{{ 'a' * 10**10 }}", "10,000,000,000 characters"),
    "power": ("{{ 3 ** 100000000 }}", "exponents above 64"),
    "concat": ("{% set s = 'a' * 1000000 %}{{ s + s + s }}", "concatenation"),
    "join": ("{% set s = 'a' * 900000 %}{{ [s, s] | join }}", "join filter"),
    "ljust": ("{{ 'a'.ljust(10**10) }}", "str.ljust"),
    "format": ("{{ '{:>9999999999}'.format(1) }}", "formatted string"),
    "output": (
        "{% set s = 'a' * 1000000 %}{% for i in range(99) %}{{ s }}{% endfor %}",
        "rendered more than",
    ),
    "slow": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "took more than 2.0s",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_fails_clearly_and_the_llm_goes_on(
    tiny, tmp_path, backend, want, name
):
    from nanovllm.chat_template import TemplateLimitError

    template, words = HOSTILE_TEMPLATES[name]
    path = copy_model(tiny.path, tmp_path / "hostile")
    (path / "chat_template.jinja").write_text(template)  # where transformers 5 saves it
    hostile = LLM(
        str(path), backend=backend, verbose=False, max_model_len=MAX_MODEL_LEN, block_size=8
    )
    with pytest.raises(TemplateLimitError) as e:
        hostile.chat([{"role": "user", "content": "hi"}], greedy(), use_tqdm=False)
    assert words in message(e) and "pass another" in message(e)
    assert_still_serves(hostile, want)


def test_a_normal_template_renders_as_before_under_the_bounds(llm):
    text = llm.chat_text([{"role": "user", "content": "hi " * 1000}])
    assert text == ("<|im_start|>user\n" + "hi " * 1000 + "<|im_end|>\n<|im_start|>assistant\n")


# ---- model files whose sizes or values cannot be right: fail fast, by name ---------------------


def with_config(tiny, tmp_path, **changes) -> Path:
    d = copy_model(tiny.path, tmp_path / "changed")
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(num_hidden_layers=10**9), "num_hidden_layers=1000000000 is out of range"),
        (dict(num_hidden_layers=64), "num_hidden_layers=64, but the checkpoint holds only"),
        (dict(num_hidden_layers="2"), "num_hidden_layers='2' is a str"),
        (dict(num_attention_heads=0), "num_attention_heads=0 is out of range"),
        (dict(num_key_value_heads=3), "not a multiple of the 3 key/value heads"),
        (dict(hidden_size=65, head_dim=None), "hidden_size=65 is not a multiple"),
        (dict(max_position_embeddings=10**12), "max_position_embeddings=1000000000000 is out of"),
        (dict(vocab_size=True), "vocab_size=True is a bool"),
    ],
)
def test_a_config_with_impossible_sizes_fails_naming_the_field(
    tiny, tmp_path, backend, llm, want, changes, words
):
    from nanovllm.errors import ConfigError

    d = with_config(tiny, tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        LLM(str(d), backend=backend, verbose=False)
    assert words in message(e) and "config.json" not in words
    assert str(d) in message(e)
    assert_still_serves(llm, want)


def test_position_tables_are_sized_by_max_model_len(tiny, tmp_path, backend, want):
    # a 10**9-position rotary table would take 256 GB; the KV pool caps max_model_len far lower
    d = with_config(tiny, tmp_path, max_position_embeddings=10**9)
    big = LLM(str(d), backend=backend, verbose=False, kv_cache_memory=1 << 20)
    assert big.config.max_model_len < 10**6
    assert big.model.max_positions == big.config.max_model_len
    assert_still_serves(big, want)


def test_nan_in_one_safetensors_weight_is_named(tiny, tmp_path, backend, llm, want):
    from safetensors.numpy import load_file, save_file

    d = copy_model(tiny.path, tmp_path / "nan")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.input_layernorm.weight"
    tensors[name][[3, 7]] = [np.nan, np.inf]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        LLM(str(d), backend=backend, verbose=False)
    assert name in message(e) and "2 non-finite value(s)" in message(e)
    assert_still_serves(llm, want)


def real_gguf_copy(tmp_path, default_gguf) -> Path:
    f = tmp_path / "smol-changed.gguf"
    shutil.copy(default_gguf, f)
    return f


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("llama.block_count", 10**9, "num_hidden_layers=1000000000 is out of range"),
        ("llama.attention.head_count", 0, "num_attention_heads=0 is out of range"),
    ],
)
def test_gguf_metadata_with_impossible_sizes_fails_naming_the_field(
    tmp_path, backend, llm, want, key, value, words, default_gguf
):
    import gguf

    f = real_gguf_copy(tmp_path, default_gguf)
    reader = gguf.GGUFReader(f, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    del reader
    with pytest.raises(ValueError) as e:
        LLM(str(f), backend=backend, verbose=False)
    assert words in message(e) and "smol-changed.gguf" in message(e)
    assert_still_serves(llm, want)


def test_random_bytes_over_gguf_tensor_data_are_caught(tmp_path, backend, llm, want, default_gguf):
    import gguf

    f = real_gguf_copy(tmp_path, default_gguf)
    tensor = next(t for t in gguf.GGUFReader(f).tensors if t.name == "blk.3.ffn_down.weight")
    with open(f, "r+b") as out:
        out.seek(tensor.data_offset + 4096)
        out.write(np.random.default_rng(0).bytes(1 << 16))
    with pytest.raises(ValueError) as e:
        LLM(str(f), backend=backend, verbose=False)
    assert "model.layers.3.mlp.down_proj.weight" in message(e), message(e)
    assert "non-finite" in message(e)
    assert_still_serves(llm, want)


def poison(llm: LLM, token: int) -> None:
    """Set one embedding row to NaN after loading: any sequence holding `token` computes NaN."""
    b = llm.backend
    embed = b.to_host(llm.model.params["embed"]).copy()
    embed[token] = np.nan
    llm.model.params["embed"] = b.weight(embed)


def test_non_finite_logits_fail_that_request_and_the_engine_goes_on(tiny, backend, want):
    sick = LLM(
        str(tiny.path), backend=backend, verbose=False, max_model_len=MAX_MODEL_LEN, block_size=8
    )
    token = next(t for t in range(5, 100) if t not in want and t not in GOOD)
    poison(sick, token)
    outs = sick.generate([GOOD, [3, token, 5], GOOD], greedy(8), use_tqdm=False)
    bad = outs[1].outputs[0]
    assert bad.finish_reason == "error" and bad.token_ids == []
    assert "non-finite logits" in bad.error and "position 2" in bad.error
    assert outs[0].outputs[0].token_ids == want == outs[2].outputs[0].token_ids
    n = sick.generate([[token, 4]], SamplingParams(n=2, max_tokens=3), use_tqdm=False)[0]
    assert [c.finish_reason for c in n.outputs] == ["error", "error"]
    assert_still_serves(sick, want)


def test_a_kv_cache_larger_than_the_machine_fails_with_the_numbers(
    backend, llm, want, default_gguf
):
    from nanovllm.errors import OutOfMemoryError
    from nanovllm.memory import available_bytes

    if available_bytes() is None:
        pytest.skip("this system does not report its available memory (/proc/meminfo)")
    # 4096 full-length SmolLM2 sequences: 8192 tokens x 46 KB each, about 1.4 TiB
    with pytest.raises(OutOfMemoryError) as e:
        LLM(
            str(default_gguf),
            backend=backend,
            verbose=False,
            max_num_seqs=4096,
            max_num_batched_tokens=4096,
            kv_cache_memory=1 << 50,
        )
    msg = message(e)
    assert "a KV cache of" in msg and "GiB of memory is available" in msg
    assert "lower kv_cache_memory" in msg
    assert_still_serves(llm, want)


def test_weights_larger_than_the_machine_fail_before_loading(tiny, tmp_path, backend, llm, want):
    import struct

    from nanovllm.errors import OutOfMemoryError
    from nanovllm.memory import available_bytes

    have = available_bytes()
    if have is None:
        pytest.skip("this system does not report its available memory (/proc/meminfo)")
    d = copy_model(tiny.path, tmp_path / "huge")
    n = (have + (4 << 30)) // 4  # one float32 tensor 4 GiB larger than what is free
    header = json.dumps(
        {"huge.weight": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    ).encode()
    with open(d / "model.safetensors", "wb") as f:  # sparse: it takes no disk
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    with pytest.raises(OutOfMemoryError) as e:
        LLM(str(d), backend=backend, verbose=False)
    msg = message(e)
    assert "model.safetensors: its weights widened to float32 would take" in msg
    assert "GiB of memory is available" in msg
    assert_still_serves(llm, want)
