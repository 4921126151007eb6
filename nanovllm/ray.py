"""Ray: batch inference over a Ray Data dataset (`LLMPredictor`), and the import that names the
extra to install. Data-parallel serving is in server/replicas.py.

    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    out = ds.map_batches(LLMPredictor, concurrency=2, batch_size=16, fn_constructor_kwargs={
        "model": path, "sampling_params": {"max_tokens": 64}})

Each of the `concurrency` actors holds one LLM and runs each batch it gets through it at once,
with continuous batching; the rows come back with `text`, `token_ids` and `finish_reason`
added to their columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .llm import LLM
from .sampling_params import SamplingParams


def require_ray(what: str = "this"):
    """The ray module, or an ImportError that names the extra which installs it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            f"{what} needs Ray, which is not installed ({e}); install it with: "
            "pip install 'nanovllm[ray]'"
        ) from None
    return ray


class LLMPredictor:
    """A callable class for `ray.data.Dataset.map_batches`: one LLM per actor.

    `model` and the other keyword arguments are LLM's (backend, max_num_seqs, ...);
    `sampling_params` is a SamplingParams or a dict of its fields, the same for every row. A
    row holds a `prompt` (text) or `messages` (a chat, rendered with the model's template).
    """

    def __init__(
        self,
        model: str | None = None,
        sampling_params: SamplingParams | dict | None = None,
        **llm_kwargs: Any,
    ):
        require_ray("LLMPredictor")
        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams(**sampling_params)
        self.params = sampling_params or SamplingParams()
        self.llm = LLM(model, **{"verbose": False, **llm_kwargs})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "messages" in batch:
            chats = [[dict(m) for m in conversation] for conversation in batch["messages"]]
            outputs = self.llm.chat(chats, self.params, use_tqdm=False)
        elif "prompt" in batch:
            prompts = [str(p) for p in batch["prompt"]]
            outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        else:
            raise ValueError(
                f"LLMPredictor: the batch has columns {sorted(batch)}; a row needs a 'prompt' "
                "(text) or 'messages' (a list of {'role', 'content'} dicts) column"
            )
        firsts = [o.outputs[0] for o in outputs]
        token_ids = np.empty(len(firsts), dtype=object)  # one list of ids per row
        token_ids[:] = [list(c.token_ids) for c in firsts]
        return {
            **batch,
            "text": np.array([c.text for c in firsts], dtype=object),
            "token_ids": token_ids,
            "finish_reason": np.array([c.finish_reason for c in firsts], dtype=object),
        }
