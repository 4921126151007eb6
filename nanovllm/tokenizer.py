"""Tokenizer, chat template and incremental detokenizer over the `tokenizers` library.

Behaves like transformers' tokenizer for the same directory (transformers is never imported).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .chat_template import render

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos_token: bool,
        chat_template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_token_ids: set[int] | None = None,
        template_vars: dict[str, str] | None = None,
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`; its post-processor is kept as it is.

        `add_bos_token=True` makes `encode(..., add_special_tokens=True)` start with BOS, prepended
        only when the post-processor does not add it already. `template_vars` are extra variables
        for the chat template (e.g. `pad_token`).
        """
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        if bos_token is None and bos_token_id is not None:
            bos_token = tokenizer.id_to_token(bos_token_id)
        if eos_token is None and self.eos_token_id is not None:
            eos_token = tokenizer.id_to_token(self.eos_token_id)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.template_vars = {k: v for k, v in (template_vars or {}).items() if v is not None}
        self.template_vars.update(
            {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
        )
        if special_token_ids is None:
            added = tokenizer.get_added_tokens_decoder().items()
            special_token_ids = {i for i, t in added if t.special}
            special_token_ids.update(self.eos_token_ids)
            if bos_token_id is not None:
                special_token_ids.add(bos_token_id)
        self.special_token_ids = special_token_ids
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # the BOS id encode() puts in front itself (the post-processor does not), or None
        self._bos_to_prepend = (
            bos_token_id
            if add_bos_token
            and bos_token_id is not None
            and not post_processor_adds_bos(tokenizer, bos_token_id)
            else None
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load a Hugging Face tokenizer directory; None when it holds no tokenizer."""
        path = Path(path)
        if not path.is_dir():
            return None
        config = read_json(path / "tokenizer_config.json")
        from_vocab_files = not (path / "tokenizer.json").is_file()
        if not from_vocab_files:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = byte_level_bpe(
                path / "vocab.json",
                path / "merges.txt",
                bool(config.get("add_prefix_space", False)),
            )
            for name in ("bos_token", "eos_token", "unk_token"):
                if name not in config and tok.token_to_id("<|endoftext|>") is not None:
                    config[name] = "<|endoftext|>"
        else:
            return None
        found = {name: token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        specials = {name: text for name, text in found.items() if text is not None}
        add_missing_tokens(tok, config, specials.values())
        bos_token, eos_token = specials.get("bos_token"), specials.get("eos_token")
        if from_vocab_files:  # transformers 5 honours add_bos/eos_token only without tokenizer.json
            set_post_processor(
                tok,
                bos_token,
                eos_token,
                bool(config.get("add_bos_token")),
                bool(config.get("add_eos_token")),
            )
        bos_id = tok.token_to_id(bos_token) if bos_token is not None else None
        eos_ids = [tok.token_to_id(eos_token)] if eos_token is not None else []
        model_config = read_json(path / "config.json")
        for source in (read_json(path / "generation_config.json"), model_config):
            eos_ids += as_list(source.get("eos_token_id"))
        if bos_id is None and isinstance(model_config.get("bos_token_id"), int):
            bos_id = model_config["bos_token_id"]
        add_bos = bos_id is not None and post_processor_adds_bos(tok, bos_id)
        return cls(
            tok,
            bos_token_id=bos_id,
            eos_token_ids=[i for i in eos_ids if i is not None],
            add_bos_token=add_bos,
            chat_template=read_chat_template(path, config),
            bos_token=bos_token,
            eos_token=eos_token,
            template_vars=specials,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Encode a chat-rendered prompt with `add_special_tokens=False`:
        the template already wrote the BOS text where the model wants it."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._bos_to_prepend is not None:
            ids = [self._bos_to_prepend, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` as transformers' `apply_chat_template(tokenize=False)` does."""
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template; pass plain text prompts "
                "(LLM.generate) instead of chat messages"
            )
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        chat = [alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        variables = {"tools": None, "documents": None, **self.template_vars, **kwargs}
        return render(
            self.chat_template,
            messages=chat,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


class IncrementalDetokenizer:
    """Streams text token by token with vLLM's prefix/read offsets: the text of the tokens after
    `read_offset` is the decode of `[prefix_offset:]` minus the decode of
    `[prefix_offset:read_offset]`, so context-dependent tokens (SentencePiece spaces) come out
    right, and nothing is emitted while the text ends in half a UTF-8 character (U+FFFD)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - 5, 0)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a stream that ended inside a character)."""
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (hold_incomplete and new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


def post_processor_adds_bos(tok: HFTokenizer, bos_id: int) -> bool:
    with_special = tok.encode("a", add_special_tokens=True).ids
    without = tok.encode("a", add_special_tokens=False).ids
    return len(with_special) > len(without) and with_special[0] == bos_id


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def as_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def byte_level_bpe(vocab: Path, merges: Path, add_prefix_space: bool) -> HFTokenizer:
    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    return tok


def add_missing_tokens(tok: HFTokenizer, config: dict, specials: Iterable[str]) -> None:
    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    entries = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
    new = [
        AddedToken(
            e["content"],
            single_word=e.get("single_word", False),
            lstrip=e.get("lstrip", False),
            rstrip=e.get("rstrip", False),
            normalized=e.get("normalized", False),
            special=e.get("special", False),
        )
        for _, e in entries
        if e.get("content") not in known
    ]
    new += [
        AddedToken(s, special=True, normalized=False)
        for s in dict.fromkeys(specials)
        if s not in known and all(t.content != s for t in new)
    ]
    if new:
        tok.add_tokens(new)


def set_post_processor(
    tok: HFTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> None:
    """The post-processor transformers builds from add_bos_token/add_eos_token."""
    add_bos = add_bos and bos is not None and tok.token_to_id(bos) is not None
    add_eos = add_eos and eos is not None and tok.token_to_id(eos) is not None

    def sequence(name: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if add_bos else []
        parts.append(f"${name}:{type_id}")
        return " ".join(parts + ([f"{eos}:{type_id}"] if add_eos else []))

    single = sequence("A", 0)
    pair = f"{single} {sequence('B', 1)}"
    special = [
        (t, tok.token_to_id(t))
        for t, on in ((bos, add_bos), (eos, add_eos))
        if on and t is not None
    ]  # (add_bos and add_eos already imply a token)
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


def read_chat_template(path: Path, config: dict) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}
