"""The library API, shaped as vLLM's: LLM(model).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from typing import cast

from .backend import get_backend
from .config import (
    BATCH_INVARIANT_HYBRID,
    SPEC_BATCH_INVARIANT,
    SPEC_HYBRID,
    EngineConfig,
    SpeculativeConfig,
    all_layers_window,
    kv_cache_bytes_per_block,
    size_kv_cache,
)
from .engine.llm_engine import LLMEngine
from .errors import InvalidRequestError
from .loader import load_model
from .memory import check_fits
from .outputs import RequestOutput
from .runner.model_runner import ModelRunner
from .sampling_params import SamplingParams
from .structured_outputs import GrammarCompiler
from .tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        backend: str = "numpy",
        device: str | None = None,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 512,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        batch_invariant: bool = False,
        speculative_config: dict | str | SpeculativeConfig | None = None,
        tensor_parallel_size: int = 1,
        verbose: bool = True,
    ):
        # sizes are checked before loading weights (the slow part) and before deriving others
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("block_size", block_size),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
            ("num_kv_blocks", num_kv_blocks),
            ("kv_cache_memory", kv_cache_memory),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise ValueError(
                    f"{name}={value!r} must be a positive integer; pass {name}=1 or more"
                )
        for name, value in (
            ("enable_prefix_caching", enable_prefix_caching),
            ("batch_invariant", batch_invariant),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be True or False")
        speculative = SpeculativeConfig.parse(speculative_config)
        if speculative is not None and batch_invariant:
            raise ValueError(SPEC_BATCH_INVARIANT)
        self.backend = get_backend(backend, device, dtype, tensor_parallel_size)
        itemsize = self.backend.itemsize
        sizes: dict[str, int] = {}

        def kv_sizing(net) -> int:
            """The KV pool and max_model_len, from the model's sizes alone (before its weights
            are placed); the position tables are then sized by max_model_len."""
            if batch_invariant and net.needs_state_slots:
                raise ValueError(BATCH_INVARIANT_HYBRID)
            if speculative is not None and net.needs_state_slots:
                raise ValueError(SPEC_HYBRID)
            per_block = kv_cache_bytes_per_block(net, block_size, itemsize)
            blocks, model_len = size_kv_cache(
                per_block,
                block_size,
                net.cfg.max_position_embeddings,
                max_model_len,
                max_num_seqs,
                num_kv_blocks,
                kv_cache_memory,
            )
            if self.backend.on_host:
                check_fits(
                    f"a KV cache of {blocks} blocks x {block_size} tokens",
                    blocks * per_block,
                    "lower kv_cache_memory (or num_kv_blocks), max_num_seqs or max_model_len",
                )
            # a state slot per running sequence, a scratch slot, and (prefix caching) as many
            # snapshot slots as running sequences
            snapshots = max_num_seqs if net.needs_state_slots and enable_prefix_caching else 0
            state_slots = max_num_seqs + 1 + snapshots if net.needs_state_slots else 0
            state_bytes = state_slots * net.state_elements_per_slot * itemsize
            if self.backend.on_host and state_bytes:
                check_fits(
                    f"recurrent state of {state_slots} slots",
                    state_bytes,
                    "lower max_num_seqs, or pass enable_prefix_caching=False (which halves it)",
                )
            sizes.update(per_block=per_block, num_kv_blocks=blocks, max_model_len=model_len)
            sizes.update(snapshots=snapshots, state_slots=state_slots, state_bytes=state_bytes)
            return sizes["max_model_len"]

        loaded = load_model(model, self.backend, kv_sizing)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_path = loaded.path
        per_block, num_kv_blocks = sizes["per_block"], sizes["num_kv_blocks"]
        max_model_len = sizes["max_model_len"]
        # a model with recurrent state (Granite 4.0-H) gets a state slot per running sequence,
        # and as many slots again for the states its prefix cache resumes from
        hybrid = self.model.needs_state_slots
        self.config = EngineConfig(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching,
            num_state_slots=max_num_seqs if hybrid else 0,
            num_state_snapshots=sizes["snapshots"],
            batch_invariant=batch_invariant,
            sliding_window=all_layers_window(self.model.layer_windows),
            speculative=speculative,
        )
        runner = ModelRunner(self.model, self.backend, self.config, loaded.eos_token_ids, seed)
        grammars = None
        if self.tokenizer is not None:  # structured outputs compile against the tokenizer
            grammars = GrammarCompiler(self.tokenizer, self.model.vocab_size, loaded.eos_token_ids)
        self.engine = LLMEngine(
            self.model, self.tokenizer, runner, self.config, loaded.eos_token_ids, grammars
        )
        # generate / chat / stream may run in several threads, or interleave (two streams):
        # engine calls are serialized by the lock, and whichever call steps the engine keeps
        # the latest output of every request for its owner
        self._lock = threading.RLock()
        self._outputs: dict[str, RequestOutput] = {}
        if verbose:
            tokens = (num_kv_blocks - 1) * block_size
            print(
                f"nanovllm: {loaded.path.name} on {self.backend.describe()}, loaded in "
                f"{loaded.load_seconds:.1f}s; KV cache: {num_kv_blocks} blocks x {block_size} "
                f"= {tokens} tokens, {num_kv_blocks * per_block / 2**20:.0f} MiB; "
                f"max_model_len={max_model_len}"
                + (
                    f"; recurrent state: {sizes['state_slots']} slots, "
                    f"{sizes['state_bytes'] / 2**20:.0f} MiB"
                    if sizes["state_slots"]
                    else ""
                )
                + (
                    f"; batch-invariant passes of {runner.row_block} rows"
                    if batch_invariant
                    else ""
                )
                + (f"; {speculative.describe()}" if speculative else ""),
                file=sys.stderr,
            )

    def get_tokenizer(self):
        return self.tokenizer

    # ---- offline generation ----------------------------------------------------------------
    def _add_all(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[str]:
        """Adds every request or none: a bad prompt leaves the engine as it was."""
        added: list[str] = []
        with self._lock:
            try:
                for prompt, p in zip(prompts, params):
                    added.append(self.engine.add_request(prompt, p))
            except Exception:
                for rid in added:
                    self.engine.abort_request(rid)
                raise
        return added

    def _step_for(self, ids: set[str]) -> list[RequestOutput]:
        """The newest outputs of these requests: those another call's steps left for them, or
        else those of one engine step (whose outputs for other requests are kept for them)."""
        with self._lock:
            mine = [self._outputs.pop(rid) for rid in ids if rid in self._outputs]
            if mine:
                return mine
            if not any(rid in self.engine.requests for rid in ids):
                raise RuntimeError(
                    f"requests {sorted(ids)} are not in the engine: were they "
                    "aborted through llm.engine?"
                )
            for out in self.engine.step():
                self._outputs[out.request_id] = out  # outputs are cumulative: the newest wins
            return [self._outputs.pop(rid) for rid in ids if rid in self._outputs]

    def _abort(self, ids) -> None:
        with self._lock:
            for rid in ids:
                self.engine.abort_request(rid)
                self._outputs.pop(rid, None)

    def take_output(self, request_id: str) -> RequestOutput | None:
        """The newest output of a request added through `llm.engine.add_request` that an
        LLM call's steps produced while you were not stepping the engine yourself."""
        with self._lock:
            return self._outputs.pop(request_id, None)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [cast(list[int], prompts)]  # one prompt (mypy cannot narrow on an item)
        prompts = list(cast(Sequence[Prompt], prompts))
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; "
                    "pass one, or one per prompt"
                )
        ids = self._add_all(prompts, params)
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            waiting = set(ids)
            while waiting:
                for out in self._step_for(waiting):
                    if out.finished:
                        done[out.request_id] = out
                        waiting.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self._abort(rid for rid in ids if rid not in done)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = cast(
            list[list[dict]], [messages] if messages and isinstance(messages[0], dict) else messages
        )  # one conversation, or several
        texts = [self.chat_text(c, add_generation_prompt) for c in conversations]
        # the rendered template already holds its special tokens (BOS included)
        prompts: list[Prompt] = [
            self._chat_tokenizer().encode(t, add_special_tokens=False) for t in texts
        ]
        outs = self.generate(prompts, sampling_params, use_tqdm)
        for out, text in zip(outs, texts):
            out.prompt = text
        return outs

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A conversation rendered with the model's chat template."""
        tokenizer = self._chat_tokenizer()
        validate_messages(messages)
        return tokenizer.apply_chat_template(messages, add_generation_prompt)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """A conversation rendered with the model's chat template, as token ids."""
        text = self.chat_text(messages, add_generation_prompt)
        return self._chat_tokenizer().encode(text, add_special_tokens=False)

    def _chat_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(
                "this model has no tokenizer, so it cannot chat; pass "
                "token ids to generate() instead"
            )
        return self.tokenizer

    # ---- streaming -------------------------------------------------------------------------
    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yields the text of one request as it is generated (the first sample if n > 1).

        Text that could still turn out to be the start of a stop string is held back until
        it is clear it is not.
        """
        params = sampling_params or SamplingParams()
        [rid] = self._add_all([prompt], [params])
        hold = max((len(s) for s in params.stop_strings), default=1) - 1
        sent, finished = 0, False
        try:
            while not finished:
                for out in self._step_for({rid}):
                    text, finished = out.outputs[0].text, out.finished
                    upto = len(text) if finished else max(sent, len(text) - hold)
                    if upto > sent:
                        yield text[sent:upto]
                        sent = upto
        finally:
            if not finished:
                self._abort([rid])


def validate_messages(messages) -> None:
    """A conversation is a list of dicts with a str `role` and a str (or None, or a list of
    parts) `content`; anything else is an InvalidRequestError naming the message."""
    if not isinstance(messages, list | tuple):
        raise InvalidRequestError(
            f"a conversation must be a list of message dicts, not {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(
                f"messages[{i}] must be a dict with 'role' and 'content', not {type(m).__name__}"
            )
        if not isinstance(m.get("role"), str):
            raise InvalidRequestError(
                f"messages[{i}] has no str 'role' (got "
                f"{m.get('role')!r}); use 'system', 'user' or "
                "'assistant'"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequestError(
                f"messages[{i}]['content'] must be a str, a list of "
                f"parts or None, not {type(content).__name__}"
            )
