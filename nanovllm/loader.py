"""A model argument (None, a directory, a .gguf file or a hub id) -> model, tokenizer, config."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .models import model_class
from .tokenizer import Tokenizer
from .weights.default_model import resolve_model


@dataclass(slots=True)
class LoadedModel:
    path: Path
    hf_config: dict
    model: object
    tokenizer: Tokenizer | None
    eos_token_ids: list[int]
    load_seconds: float


def _eos_ids(hf_config: dict, tokenizer: Tokenizer | None) -> list[int]:
    ids = list(tokenizer.eos_token_ids) if tokenizer else []
    eos = hf_config.get("eos_token_id")
    for t in eos if isinstance(eos, list) else [eos]:
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    return ids


def load_model(model: str | None, backend, max_model_len: int | None = None) -> LoadedModel:
    start = time.perf_counter()
    path = resolve_model(model)
    if path.is_file():
        from .weights.gguf_file import load_gguf

        hf_config, tensors, tok_data = load_gguf(path)
        tokenizer = None
        if tok_data is not None:
            eos = [] if tok_data.eos_token_id is None else [tok_data.eos_token_id]
            tokenizer = Tokenizer(tok_data.tokenizer, bos_token_id=tok_data.bos_token_id,
                                  eos_token_ids=eos, add_bos_token=tok_data.add_bos_token,
                                  chat_template=tok_data.chat_template,
                                  bos_token=tok_data.bos_token, eos_token=tok_data.eos_token)
    else:
        from .weights.safetensors_dir import load_hf_dir

        hf_config, tensors = load_hf_dir(path)
        tokenizer = Tokenizer.from_dir(path)
    cls = model_class(hf_config, str(path))
    positions = max_model_len or None
    net = cls(hf_config, backend, max_positions=positions)
    net.load_weights(tensors, str(path))
    return LoadedModel(path, hf_config, net, tokenizer, _eos_ids(hf_config, tokenizer),
                       time.perf_counter() - start)
