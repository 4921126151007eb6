"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs out.

It owns the scheduler (what runs), the model runner (how it runs) and the tokenizer, and
does the per-request bookkeeping between them: detokenizing, stop checks, logprobs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..errors import InvalidRequestError, StepError
from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    completions: list[CompletionOutput]
    detokenizers: list
    prompt_logprobs: list | None = None
    pending: set[int] = field(default_factory=set)  # indices of unfinished samples

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            self.prompt_logprobs,
            self.completions,
            finished=not self.pending,
        )


class LLMEngine:
    def __init__(self, model, tokenizer, runner, config, eos_token_ids: list[int], grammars=None):
        self.model, self.tokenizer, self.runner, self.config = model, tokenizer, runner, config
        # structured outputs: compiles constraints, hands out matchers (None: no tokenizer)
        self.grammars = grammars
        self.scheduler = Scheduler(config)
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self.last_step_tokens = (0, 0)  # (prefill, decode) tokens computed by the last step

    # ---- requests ----------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "this model has no tokenizer, so text prompts cannot be encoded; pass token "
                    "ids instead (a list of ints), or use a model directory with tokenizer.json"
                )
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequestError(
                    f"the prompt holds {prompt[e.start : e.end]!r} at index {e.start}, which is "
                    "not text (a lone surrogate) and cannot be encoded as UTF-8; remove it or "
                    "decode your input with errors='replace'"
                ) from None
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, list | tuple) or any(
            not isinstance(t, int) or isinstance(t, bool) for t in prompt
        ):
            kind = type(prompt).__name__
            if isinstance(prompt, list | tuple):
                odd = next(t for t in prompt if not isinstance(t, int) or isinstance(t, bool))
                kind += f" holding {odd!r}"
            raise InvalidRequestError(
                f"a prompt must be a str or a list of int token ids, not "
                f"{kind}; decode bytes to str first"
            )
        return None, list(prompt)

    def validate_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.config.max_model_len, self.model.vocab_size)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(params).__name__}")
        params.validate()  # again: the dataclass may have been changed since it was built
        vocab = self.model.vocab_size
        for name, ids in (
            ("stop_token_ids", params.stop_token_ids or ()),
            ("logit_bias", params.logit_bias or ()),
        ):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise InvalidRequestError(
                    f"{name} holds {bad[0]}, outside the vocabulary "
                    f"[0, {vocab}); pass ids below {vocab}"
                )
        grammar = None
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise InvalidRequestError(
                    "structured_outputs needs the model's tokenizer, and this model has none; "
                    "use a model directory with tokenizer.json, or a GGUF file with its vocabulary"
                )
            grammar = self.grammars.grammar(params.structured_outputs)
        text, ids = self.encode_prompt(prompt)
        self.validate_prompt(ids)
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        seqs = [
            Sequence(
                next(self._seq_ids),
                rid,
                ids,
                params,
                index=i,
                use_prefix_cache=params.prompt_logprobs is None,
                max_tokens=params.max_tokens,
            )
            for i in range(params.n)
        ]
        if grammar is not None:  # one matcher per sample
            for s in seqs:
                s.matcher = self.grammars.matcher(grammar)
        detok = []
        if self.tokenizer is not None:
            from ..tokenizer import IncrementalDetokenizer

            detok = [
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                for _ in seqs
            ]
        req = Request(
            rid,
            text,
            ids,
            params,
            seqs,
            [
                CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None else None)
                for i in range(params.n)
            ],
            detok,
            pending=set(range(params.n)),
        )
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        self.requests[rid] = req
        for s in seqs:
            self.scheduler.add(s)
        return rid

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        for i in req.pending:
            req.completions[i].finish_reason = "abort"
        req.pending.clear()
        return req.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.requests:
                raise RuntimeError("the scheduler could not schedule any waiting request")
            return []
        # a decode computes its token and any proposals after it
        decode = sum(len(s.token_ids) for s in batch.seqs if len(s.token_ids) == 1 + s.num_draft)
        self.last_step_tokens = (batch.num_tokens - decode, decode)
        try:
            results = self.runner.execute(batch)
        except Exception as e:
            self.scheduler.discard(batch)
            failed = list(dict.fromkeys(s.seq.request_id for s in batch.seqs))
            for rid in failed:
                self.abort_request(rid)
            raise StepError(failed, e) from e
        self.scheduler.postprocess(
            batch, [None if r.token_id is None else r.token_ids() for r in results]
        )
        touched: dict[str, Request] = {}
        for sched, res in zip(batch.seqs, results):
            seq = sched.seq
            req = self.requests[seq.request_id]
            touched[req.request_id] = req
            if res.prompt_logprobs is not None and seq.index == 0:
                self._add_prompt_logprobs(req, sched.start, res.prompt_logprobs)
            if res.token_id is None:
                continue
            if res.error is not None:  # this sample cannot go on; the others in the step can
                out = req.completions[seq.index]
                out.finish_reason, out.error = "error", res.error
                self._finish(req, seq, "error")
                continue
            # one token, or with speculation the accepted proposals and the model's next one:
            # each is taken as if it had come alone, and a stop among them ends the run there
            for token, logprobs in [(res.token_id, res.logprobs), *res.more]:
                if seq.is_finished:
                    break
                self._on_token(req, seq, token, logprobs)
        return [r.output() for r in touched.values()]

    def _logprob_dict(self, entries: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        tok = self.tokenizer
        return {
            t: Logprob(lp, rank, tok.token_text(t) if tok else None)
            for t, (lp, rank) in entries.items()
        }

    def _add_prompt_logprobs(self, req: Request, start: int, rows) -> None:
        # rows[j] is for prompt position start + 1 + j; positions already recorded (the same
        # prompt recomputed after a preemption) are skipped
        assert req.prompt_logprobs is not None  # set when the request asked for them
        for j, entries in enumerate(rows):
            if start + 1 + j == len(req.prompt_logprobs):
                req.prompt_logprobs.append(self._logprob_dict(entries))

    def _on_token(self, req: Request, seq: Sequence, token: int, logprobs) -> None:
        p, out = req.params, req.completions[seq.index]
        out.token_ids.append(token)
        if logprobs is not None:
            assert out.logprobs is not None  # a list when the request asked for logprobs
            out.logprobs.append(self._logprob_dict(logprobs))
            lp = logprobs[token][0]
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + lp
        reason: str | None = None
        stop_reason: int | str | None = None  # the stop token id or stop string
        matcher = seq.matcher
        if matcher is not None and not matcher.consume_token(token):
            out.finish_reason, out.error = (
                "error",
                (f"the structured output's grammar rejected token {token}: {matcher.get_error()}"),
            )
            self._finish(req, seq, "error")
            return
        # with a grammar, min_tokens yields: the grammar decides where the answer ends
        min_tokens = 0 if matcher is not None else p.min_tokens
        if len(out.token_ids) >= min_tokens:
            if token in (p.stop_token_ids or ()):
                reason, stop_reason = "stop", token
            elif token in self.eos_token_ids and not p.ignore_eos:
                reason = "stop"
        if req.detokenizers and reason is None:
            delta = req.detokenizers[seq.index].push(token)
            out.text += delta
            if delta and p.stop_strings and len(out.token_ids) >= min_tokens:
                hit = find_stop(out.text, len(delta), p.stop_strings, p.include_stop_str_in_output)
                if hit is not None:
                    (out.text, stop_reason), reason = hit, "stop"
        if reason is None and matcher is not None and matcher.is_stopped():
            reason = "stop"  # the grammar allows nothing more: the answer is complete
        if reason is None and (
            len(out.token_ids) >= (p.max_tokens or 1 << 62)
            # (the prompt and the output so far: with speculation, seq holds the whole run)
            or seq.num_prompt_tokens + len(out.token_ids) >= self.config.max_model_len
        ):
            reason = "length"
        if reason is not None:
            out.finish_reason, out.stop_reason = reason, stop_reason
            self._finish(req, seq, reason)

    def _finish(self, req: Request, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        req.pending.discard(seq.index)
        if not req.pending:
            del self.requests[req.request_id]


def find_stop(text: str, new: int, stops: list[str], include: bool) -> tuple[str, str] | None:
    """A stop string that ends within the last `new` characters: (text cut there, the stop)."""
    for stop in stops:
        i = text.find(stop, max(0, len(text) - new - len(stop) + 1))
        if i != -1:
            return text[: i + len(stop) if include else i], stop
    return None


def check_prompt(ids: list[int], limit: int, vocab: int) -> None:
    """A prompt of token ids fits: not empty, shorter than max_model_len (`limit`), every id in
    the vocabulary; else an InvalidRequestError that names the value, the limit and the fix."""
    if not ids:
        raise InvalidRequestError("the prompt is empty; pass at least one token or character")
    if len(ids) >= limit:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens, but max_model_len={limit} leaves room for at "
            f"most {limit - 1} prompt tokens; shorten the prompt or raise max_model_len"
        )
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the vocabulary [0, {vocab}); pass ids below {vocab}"
        )
