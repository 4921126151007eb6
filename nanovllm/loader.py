"""A model argument (None, a directory, a .gguf file or a hub id) -> model, tokenizer, config."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import WeightsError
from .models import model_class
from .models.base import CausalLM, table_weights
from .models.config_check import check_config
from .tokenizer import Tokenizer
from .weights.default_model import resolve_model


@dataclass(slots=True)
class LoadedModel:
    path: Path
    hf_config: dict
    model: CausalLM
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


def load_model(
    model: str | None, backend, max_positions: int | Callable[[CausalLM], int] | None = None
) -> LoadedModel:
    """Read the files, check the config's sizes and that every weight is finite, build the
    model and load its weights. `max_positions` (or a function of the model, which may look
    at its sizes and raise before any weight is placed) sizes its position tables."""
    start = time.perf_counter()
    path = resolve_model(model)
    converted = None  # a GGUF's tensors as stored by an earlier load (checked then)
    if path.is_file():
        from .weights import converted_cache
        from .weights.gguf_file import load_gguf, load_gguf_tokenizer

        converted = converted_cache.load(path)
        if converted is not None:
            (hf_config, tensors), tok_data = converted, load_gguf_tokenizer(path)
        else:
            hf_config, tensors, tok_data = load_gguf(path)
        tokenizer = None
        if tok_data is not None:
            eos = [] if tok_data.eos_token_id is None else [tok_data.eos_token_id]
            tokenizer = Tokenizer(
                tok_data.tokenizer,
                bos_token_id=tok_data.bos_token_id,
                eos_token_ids=eos,
                add_bos_token=tok_data.add_bos_token,
                chat_template=tok_data.chat_template,
                bos_token=tok_data.bos_token,
                eos_token=tok_data.eos_token,
            )
    else:
        from .weights.safetensors_dir import load_hf_dir

        hf_config, tensors = load_hf_dir(path)
        tokenizer = Tokenizer.from_dir(path)
    check_config(hf_config, len(tensors), str(path))
    cls = model_class(hf_config, str(path))
    net = cls(hf_config, backend)
    positions = max_positions(net) if callable(max_positions) else max_positions
    if positions is not None:
        net = cls(hf_config, backend, max_positions=positions)
    if converted is None:
        check_finite(tensors, str(path))
        if path.is_file():  # the next load maps these instead of dequantizing again
            tensors = converted_cache.store(path, hf_config, tensors, weight_order(net))
    net.load_weights(tensors, str(path))
    return LoadedModel(
        path, hf_config, net, tokenizer, _eos_ids(hf_config, tokenizer), time.perf_counter() - start
    )


def weight_order(net: CausalLM) -> list[str]:
    """The Hugging Face tensors the model reads, in the order its weight table reads them."""
    table, _ = net.weight_table()
    return [n for w in table_weights(table) for n in w.names]


def check_finite(tensors: dict[str, np.ndarray], source: str) -> None:
    """A NaN or infinity in a weight means a corrupt file: name the tensor and the count."""
    for name, values in tensors.items():
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            count = values.size - int(np.count_nonzero(np.isfinite(values)))
            raise WeightsError(
                f"{source}: tensor {name!r} holds {count} non-finite value(s) "
                f"(NaN or infinity) of {values.size}; the file is corrupt: "
                "download it again"
            )
