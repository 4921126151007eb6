"""nanovllm.tokenizer against transformers on small tokenizers saved by transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from nanovllm.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The capital of France is Paris.",
    "Hello world, hello there!",
    "the cat sat on the mat",
    "Größe, café, naïve façade",
    "東京は日本の首都です。",
    "Emoji time 😀🎉 done",
    "x = 1 + 2 * 3",
    "You are a helpful assistant.",
    "What is the answer? It is 42.",
]
TEXTS = [
    "Hello world",
    " leading space",
    "The capital of France is",
    "café naïve Größe",
    "東京は首都",
    "emoji 😀 and 🎉!",
    "mixed 日本 😀 é",
    "",
    "  two  spaces\nnewline\t tab",
    "<|im_start|>user\nhi<|im_end|>",
    "<s>literal bos</s>",
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Today is " + strftime_now("%Y") + "." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}
{%- if tools is not none %}{{- tools | tojson(indent=2) }}{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "東京は?"},
    ],
]


def train_byte_level(special_tokens: list[str], vocab_size: int = 400) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def train_sentencepiece_like() -> HFTokenizer:
    """A Llama-2-style tokenizer: Metaspace pieces, byte fallback for unknown characters."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS[:4] + CORPUS[6:],
        trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    data = json.loads(tok.to_str())
    trained = data["model"]["vocab"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in sorted(trained, key=trained.get):
        vocab.setdefault(piece, len(vocab))
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]
    ]
    out = HFTokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    out.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    out.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return out


def save(tok: HFTokenizer, path: Path, **kwargs) -> Path:
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(path)
    return path


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    tok = train_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return save(
        tok,
        tmp_path_factory.mktemp("chatml"),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    path = save(
        train_byte_level(specials),
        tmp_path_factory.mktemp("llama3"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        chat_template=LLAMA3,
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    return path


def llama2_post_processor() -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """Llama-2-like: tokenizer.json's post-processor adds BOS."""
    tok = train_sentencepiece_like()
    tok.post_processor = llama2_post_processor()
    return save(
        tok, tmp_path_factory.mktemp("spm"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def both(path: Path) -> tuple[Tokenizer, object]:
    ours = Tokenizer.from_dir(path)
    assert ours is not None
    return ours, transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", ["chatml_dir", "llama3_dir", "spm_dir"])
def test_encode_decode_match_transformers(name, request):
    ours, theirs = both(request.getfixturevalue(name))
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip
                ), (text, skip)


def test_bos_from_post_processor(spm_dir):
    ours, theirs = both(spm_dir)
    assert ours.add_bos_token and ours.bos_token_id == 1
    assert ours.encode("hello") == theirs.encode("hello")
    assert ours.encode("hello").count(1) == 1 and ours.encode("hello", False)[0] != 1


def test_config_add_bos_token_ignored_with_tokenizer_json(spm_dir, tmp_path):
    """transformers 5 lets tokenizer.json's post-processor decide, whatever the config says."""
    for pp, flag in ((None, True), (llama2_post_processor(), False)):
        tok = train_sentencepiece_like()
        tok.post_processor = pp
        path = save(tok, tmp_path / str(flag), bos_token="<s>", eos_token="</s>")
        edit_config(path, add_bos_token=flag, add_eos_token=flag)
        ours, theirs = both(path)
        assert ours.add_bos_token is not flag
        for text in TEXTS:
            assert ours.encode(text) == theirs.encode(text)


def test_direct_construction_prepends_bos_once():
    tok = train_sentencepiece_like()
    plain = Tokenizer(
        tok, bos_token_id=1, eos_token_ids=[2], add_bos_token=True, chat_template=None
    )
    assert plain.encode("hello")[0] == 1 and plain.encode("hello")[1] != 1
    assert plain.encode("hello", add_special_tokens=False) == plain.encode("hello")[1:]
    tok = train_sentencepiece_like()
    tok.post_processor = llama2_post_processor()
    already = Tokenizer(
        tok, bos_token_id=1, eos_token_ids=[2], add_bos_token=True, chat_template=None
    )
    assert already.encode("hello") == plain.encode("hello")
    assert already.bos_token == "<s>" and already.eos_token == "</s>"


@pytest.mark.parametrize("name", ["chatml_dir", "llama3_dir"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(name, add_generation_prompt, request):
    ours, theirs = both(request.getfixturevalue(name))
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == expected
        ids = theirs.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        assert ours.encode(text, add_special_tokens=False) == list(ids)


def test_chat_template_kwargs_tools_and_raise_exception(llama3_dir):
    ours, theirs = both(llama3_dir)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Wetter ☀",
                "parameters": {"type": "object"},
            },
        }
    ]
    messages = CONVERSATIONS[0]
    assert ours.apply_chat_template(messages, tools=tools) == theirs.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(messages).startswith("<|begin_of_text|>")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        ours.apply_chat_template(bad)


FEATURES = """{%- set ns = namespace(n=0) %}
{%- for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}
{%- if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{% endgeneration %}
{%- else %}{{ m | tojson }}{% endif %}
{% endfor %}{{ ns.n }}{{ pad_token }}{{ flag | default('none') }}"""


def test_chat_template_jinja_features(tmp_path):
    path = save(
        train_byte_level(["<|endoftext|>"]),
        tmp_path,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=FEATURES,
    )
    ours, theirs = both(path)
    for kwargs in ({}, {"flag": "on"}):
        text = ours.apply_chat_template(CONVERSATIONS[2], **kwargs)
        assert text == theirs.apply_chat_template(
            CONVERSATIONS[2], tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert "A: Hello! 😀" in text and "東京" not in text
    with pytest.raises(Exception, match="not allowed"):
        Tokenizer(
            ours.tokenizer,
            bos_token_id=None,
            eos_token_ids=[],
            add_bos_token=False,
            chat_template="{% set ns = namespace(_x=1) %}",
        ).apply_chat_template(CONVERSATIONS[0])


def test_special_tokens_and_eos_ids(llama3_dir, chatml_dir):
    llama = Tokenizer.from_dir(llama3_dir)
    assert llama.bos_token == "<|begin_of_text|>" and llama.bos_token_id == 0
    assert llama.eos_token_ids == [1, 4]
    assert llama.token_text(4) == "<|eot_id|>"
    chatml = Tokenizer.from_dir(chatml_dir)
    assert chatml.eos_token_ids == [chatml.tokenizer.token_to_id("<|im_end|>")]
    assert chatml.template_vars["pad_token"] == "<|endoftext|>"


def test_chat_template_sources(chatml_dir, tmp_path):
    assert (chatml_dir / "chat_template.jinja").is_file()
    path = save(
        train_byte_level(["<|im_start|>", "<|im_end|>"]),
        tmp_path / "legacy",
        eos_token="<|im_end|>",
    )
    assert not (path / "chat_template.jinja").exists()
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(path).apply_chat_template(CONVERSATIONS[0])

    (path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ eos_token }}"}))
    assert Tokenizer.from_dir(path).apply_chat_template(CONVERSATIONS[0]) == "json:<|im_end|>"
    edit_config(
        path,
        chat_template=[
            {"name": "default", "template": "config"},
            {"name": "tool_use", "template": "tools"},
        ],
    )
    assert Tokenizer.from_dir(path).apply_chat_template(CONVERSATIONS[0]) == "config"
    (path / "chat_template.jinja").write_text(CHATML)
    ours, theirs = both(path)
    assert ours.apply_chat_template(CONVERSATIONS[2]) == theirs.apply_chat_template(
        CONVERSATIONS[2], tokenize=False, add_generation_prompt=True
    )


def test_vocab_and_merges_only(tmp_path):
    source = train_byte_level(["<|endoftext|>"])
    source.model.save(str(tmp_path))
    gpt2 = transformers.GPT2Tokenizer(
        vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt")
    )
    path = tmp_path / "gpt2"
    gpt2.save_pretrained(path)
    (path / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        (path / name).write_bytes((tmp_path / name).read_bytes())
    for add_bos in (None, True):
        edit_config(path, add_bos_token=add_bos)
        ours, theirs = both(path)
        assert ours.eos_token == "<|endoftext|>" and ours.eos_token_ids == [0]
        assert ours.add_bos_token is bool(add_bos)
        for text in TEXTS + ["a<|endoftext|>b"]:
            ids = theirs.encode(text)
            assert ours.encode(text) == ids, text
            assert ours.encode(text, False) == theirs.encode(text, add_special_tokens=False)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
            assert ours.decode(ids, False) == theirs.decode(ids)


def test_no_tokenizer(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path) is None
    assert Tokenizer.from_dir(tmp_path / "missing") is None


STREAM_TEXTS = [
    "emoji 😀🎉 and 🦙!",
    "東京は日本の首都です",
    "café naïve Größe façade",
    "mix 日本 😀 é x",
    "The capital of France is Paris. 🇫🇷",
]


@pytest.mark.parametrize("name", ["chatml_dir", "spm_dir"])
def test_incremental_detokenizer(name, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(name))
    split_chars = 0
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        split_chars += sum("\ufffd" in tok.token_text(i) for i in ids)
        for prompt in (None, tok.encode("Hello world", add_special_tokens=True)):
            detok = IncrementalDetokenizer(tok, prompt)
            deltas = [detok.push(i) for i in ids]
            assert all("\ufffd" not in d for d in deltas), deltas
            full = tok.decode((prompt or []) + ids)
            expected = full[len(tok.decode(prompt)) :] if prompt else full
            assert "".join(deltas) == detok.text == expected, (text, deltas)
    assert split_chars > 0  # some tokens really are partial UTF-8 characters


def test_incremental_detokenizer_special_tokens_and_flush(chatml_dir):
    tok = Tokenizer.from_dir(chatml_dir)
    im_end = tok.tokenizer.token_to_id("<|im_end|>")
    ids = tok.encode("Hi 😀", add_special_tokens=False) + [im_end]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(detok.push(i) for i in ids) == tok.decode(ids, skip_special_tokens=skip)
    emoji = tok.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert detok.flush() == tok.decode(emoji[:-1]) and detok.text.endswith("\ufffd")


def test_spm_leading_space_stream(spm_dir):
    tok = Tokenizer.from_dir(spm_dir)
    prompt = tok.encode("The cat")
    ids = tok.encode("The cat sat on the mat", add_special_tokens=True)
    assert ids[: len(prompt)] == prompt
    detok = IncrementalDetokenizer(tok, prompt)
    for i in ids[len(prompt) :]:
        detok.push(i)
    assert detok.text == " sat on the mat"


@pytest.mark.slow
def test_smollm2_tokenizer_from_default_gguf(tmp_path, default_gguf):
    """The default model's real tokenizer, as transformers converts it from the GGUF."""
    gguf = default_gguf
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(
        tmp_path
    )
    ours, theirs = both(tmp_path)
    assert (ours.bos_token, ours.eos_token, ours.add_bos_token) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    for messages in CONVERSATIONS:
        text = ours.apply_chat_template(messages)
        assert text == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        default_system = "You are a helpful AI assistant named SmolLM" in text
        assert default_system is (messages[0]["role"] != "system")
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(
            text, add_special_tokens=False
        )
    for text in TEXTS + STREAM_TEXTS:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids and ours.decode(ids) == theirs.decode(
            ids, skip_special_tokens=True
        )
        detok = IncrementalDetokenizer(ours)
        assert "".join(detok.push(i) for i in ids) == ours.decode(ids)
