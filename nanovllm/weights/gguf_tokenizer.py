"""A tokenizers.Tokenizer rebuilt from the vocabulary a GGUF file stores in its metadata."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import WeightsError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before byte-level BPE ("gpt2": GPT-2's own regex)
BYTE_LEVEL_SPLITS: dict[str, str] = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


@dataclass(slots=True)
class GGUFTokenizerData:
    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


def build_tokenizer(meta: Callable[[str], Any], file: str) -> GGUFTokenizerData | None:
    """The tokenizer described by `tokenizer.ggml.*` metadata; `meta(key)` is None when absent."""
    model = meta("tokenizer.ggml.model")
    if model is None:
        return None
    tokens: list[str] = list(meta("tokenizer.ggml.tokens") or [])
    types = [int(t) for t in meta("tokenizer.ggml.token_type") or [1] * len(tokens)]
    scores = meta("tokenizer.ggml.scores")
    if not tokens or len(types) != len(tokens) or len(scores or tokens) != len(tokens):
        raise WeightsError(
            f"{file}: tokenizer.ggml.tokens/token_type/scores are missing or differ "
            f"in length; the file's metadata is corrupt, download it again"
        )
    ids = {
        name: _token_id(meta, f"tokenizer.ggml.{name}_token_id", len(tokens), file)
        for name in ("bos", "eos", "unknown", "padding")
    }
    if model == "gpt2":
        tokenizer, spelled = _byte_level(tokens, meta, file)
        add_bos = bool(meta("tokenizer.ggml.add_bos_token") or False)
    elif model == "llama":
        tokenizer, spelled = _sentencepiece(tokens, meta, ids["unknown"], file)
        add_bos = bool(meta("tokenizer.ggml.add_bos_token") in (None, True))
    else:
        raise WeightsError(
            f"{file}: tokenizer.ggml.model={model!r} is not supported (supported: "
            f"'gpt2', 'llama'); pass a Hugging Face tokenizer directory instead"
        )
    add_eos = bool(meta("tokenizer.ggml.add_eos_token") or False)
    special = {i for i, t in enumerate(types) if t == CONTROL}
    special |= {i for i in ids.values() if i is not None}
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i in sorted(special)
            if spelled(tokens[i])
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == USER_DEFINED and spelled(tokens[i])
        ]
    )
    bos, eos = ids["bos"], ids["eos"]
    _add_bos_eos(tokenizer, tokens, bos if add_bos else None, eos if add_eos else None)
    template = meta("tokenizer.chat_template")
    return GGUFTokenizerData(
        tokenizer=tokenizer,
        bos_token_id=bos,
        eos_token_id=eos,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=str(template) if template is not None else None,
        bos_token=tokens[bos] if bos is not None else None,
        eos_token=tokens[eos] if eos is not None else None,
    )


def _token_id(meta: Callable[[str], Any], key: str, vocab: int, file: str) -> int | None:
    value = meta(key)
    if value is None:
        return None
    if not 0 <= int(value) < vocab:
        raise WeightsError(
            f"{file}: {key}={value} is outside the vocabulary of {vocab} tokens; "
            f"the file's metadata is corrupt"
        )
    return int(value)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(
    tokens: list[str], meta: Callable[[str], Any], file: str
) -> tuple[Tokenizer, Callable[[str], bool]]:
    table = bytes_to_unicode()
    alphabet = set(table.values())

    def spelled(token: str) -> bool:
        return set(token) <= alphabet

    def respell(token: str) -> str:
        return token if spelled(token) else "".join(table[b] for b in token.encode("utf-8"))

    vocab = {respell(t): i for i, t in enumerate(tokens)}
    merges = meta("tokenizer.ggml.merges")
    if merges is None:
        raise WeightsError(
            f"{file}: a 'gpt2' tokenizer needs tokenizer.ggml.merges, which is "
            f"missing; reconvert the model with llama.cpp's convert_hf_to_gguf.py"
        )
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(BPE(vocab, pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(meta("tokenizer.ggml.pre"), file)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, spelled


def _byte_level_pre_tokenizer(pre: object, file: str) -> pre_tokenizers.PreTokenizer:
    split = BYTE_LEVEL_SPLITS.get(str(pre), "gpt2") if pre is not None else "gpt2"
    if pre is not None and str(pre) not in BYTE_LEVEL_SPLITS:
        warnings.warn(
            f"{file}: tokenizer.ggml.pre={pre!r} is unknown; splitting text like GPT-2",
            stacklevel=3,
        )
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split == "digits":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece(
    tokens: list[str], meta: Callable[[str], Any], unk: int | None, file: str
) -> tuple[Tokenizer, Callable[[str], bool]]:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta("tokenizer.ggml.scores")
        if scores is None:
            raise WeightsError(
                f"{file}: a 'llama' tokenizer needs tokenizer.ggml.scores or "
                f"tokenizer.ggml.merges; reconvert the model with llama.cpp"
            )
        pairs = merges_from_scores(tokens, [float(s) for s in scores])
    tokenizer = Tokenizer(
        BPE(
            vocab,
            pairs,
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = meta("tokenizer.ggml.add_space_prefix") in (None, True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * prefix)
    return tokenizer, lambda token: True


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: the best-scoring merged token first,
    then the longer left part; equal ones in vocabulary order. (One sort of flat tuples: a
    262,144-token vocabulary takes ~1 s.)"""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for index, (token, score) in enumerate(zip(tokens, scores, strict=True)):
        n = len(token)
        for k in range(1, n):
            left = ids.get(token[:k])
            if left is not None and (right := ids.get(token[k:])) is not None:
                ranked.append((-score, -k, k - n, index, left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for *_, left, right in ranked]


def _add_bos_eos(tokenizer: Tokenizer, tokens: list[str], bos: int | None, eos: int | None) -> None:
    if bos is None and eos is None:
        return
    ends = [(tokens[i], i) for i in (bos, eos) if i is not None]
    first = [tokens[bos]] if bos is not None else []
    last = [tokens[eos]] if eos is not None else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*first, "$A", *last],
        pair=[*first, "$A", *last, *first, "$B", *last],
        special_tokens=list(dict.fromkeys(ends)),
    )
