"""The FastAPI app: OpenAI's routes over one EngineLoop (or, data-parallel, a ReplicaSet shaped
like one), with auth, readiness and OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` for every failure."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .. import __version__
from .engine_loop import EngineLoop, ServerError, Update
from .job import Job
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from .replicas import ReplicaSet
from .responses import (
    Choices,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    prompt_logprobs_json,
    sse,
)
from .served_model import ServedModel


@dataclass
class ServerState:
    served_model_name: str
    metrics: Metrics
    api_key: str | None = None
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # generation config
    model: ServedModel | None = None  # set once the model is loaded
    loop: EngineLoop | ReplicaSet | None = None
    created: int = field(default_factory=now)

    @property
    def replicas(self) -> ReplicaSet | None:
        """The engine replicas when data-parallel (the loop itself), else None."""
        return self.loop if isinstance(self.loop, ReplicaSet) else None

    def attach(self, llm, max_waiting: int | None = None) -> None:
        """The model is loaded: start its engine loop and begin serving."""
        loop = EngineLoop(llm.engine, self.metrics, max_waiting)
        loop.start()
        self.model, self.loop = ServedModel.of(llm), loop

    def attach_replicas(self, replicas: ReplicaSet) -> None:
        """The replicas are up (data parallelism): route requests to them."""
        self.model, self.loop = replicas.model, replicas


@dataclass(frozen=True)
class Serving:
    """A server whose model is loaded and whose engine is healthy: what the routes use."""

    state: ServerState
    model: ServedModel
    loop: EngineLoop | ReplicaSet


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code or self.status,
            }
        }


def from_server_error(e: ServerError) -> APIError:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    kind = {400: "invalid_request_error", 503: "service_unavailable"}.get(e.status, "server_error")
    return APIError(e.status, str(e), kind, param=field_of(str(e)), headers=headers)


def field_of(message: str) -> str | None:
    """'SamplingParams.top_p=2.0 is invalid; ...' -> 'top_p'."""
    if message.startswith("SamplingParams."):
        return message.split(".", 1)[1].split("=", 1)[0]
    if message.startswith(("StructuredOutputsParams", "response_format", "structured_outputs")):
        return "response_format" if message.startswith("response_format") else "structured_outputs"
    return None


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="nanovllm", version=__version__)
    app.state.server = state

    # ---- errors in OpenAI's shape ---------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg')}"
        else:
            got = first.get("input")
            message = (
                f"{'.'.join(loc) or 'body'}: {first.get('msg')} (got {got!r})"
                if "input" in first
                else f"{'.'.join(loc)}: {first.get('msg')}"
            )
        return JSONResponse(
            APIError(400, message, param=loc[0] if loc else None).body(), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            APIError(e.status_code, str(e.detail), kind).body(),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    # ---- dependencies -------------------------------------------------------------------------
    def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), state.api_key):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY' "
                "with the key the server was started with (--api-key)",
                code="invalid_api_key",
            )

    def ready() -> Serving:
        if state.model is None or state.loop is None:
            raise APIError(
                503,
                "the model is still loading; retry in a few seconds",
                "service_unavailable",
                headers={"Retry-After": "2"},
            )
        if not state.loop.healthy:
            raise APIError(
                503, f"the engine cannot serve: {state.loop.dead}", "service_unavailable"
            )
        return Serving(state, state.model, state.loop)

    def check_model(name: str | None) -> None:
        if name is not None and name != state.served_model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{state.served_model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    guarded = [Depends(authorized)]

    # ---- open routes ---------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.loop is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.replicas is not None:  # one line per replica: a dead one is named
            report = await state.replicas.check()
            up = sum(r["status"] == "ok" for r in report)
            status = "ok" if up == len(report) else "degraded" if up else "error"
            return JSONResponse(
                {"status": status, "replicas": report}, status_code=200 if up else 503
            )
        if not state.loop.healthy:
            return JSONResponse({"status": "error", "reason": state.loop.dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        text = (
            state.metrics.render()
            if state.replicas is None
            else await state.replicas.render_metrics()  # every replica's, labelled engine="i"
        )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- guarded routes ------------------------------------------------------------------
    @app.get("/v1/models", dependencies=guarded)
    async def models():
        s = ready()
        return {
            "object": "list",
            "data": [
                {
                    "id": s.state.served_model_name,
                    "object": "model",
                    "created": s.state.created,
                    "owned_by": "nanovllm",
                    "root": s.model.path,
                    "max_model_len": s.model.max_model_len,
                }
            ],
        }

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        s = ready()
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "pass exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = chat_ids(s, body.messages, body.add_generation_prompt)
        elif body.prompt is not None:
            ids = encode(s, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": s.model.max_model_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        s = ready()
        check_model(body.model)
        vocab = s.model.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens"
            )
        return {"prompt": tokenizer(s).decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        s = ready()
        check_model(body.model)
        try:
            prompts = body.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        params = sampling(s, body, body.max_tokens, body.logprobs)
        if body.echo and body.logprobs is not None:
            params.prompt_logprobs = max(params.prompt_logprobs or 0, body.logprobs)
        encoded = [encode(s, p, True) if isinstance(p, str) else list(p) for p in prompts]
        for ids in encoded:
            check_fits(s, ids, params.max_tokens, "prompt")
        echoes = (
            [
                tokenizer(s).decode(ids) if not isinstance(p, str) else p
                for p, ids in zip(prompts, encoded)
            ]
            if body.echo
            else None
        )
        job = await start(s, encoded, params)
        choices = Choices(len(encoded), params.n, params.stop_strings)
        rid, model, created = new_id("cmpl"), s.state.served_model_name, now()
        k = body.logprobs or 0

        def logprobs_of(i: int, token_ids, logprobs, offset: int, prompt_lp=None):
            if body.logprobs is None:
                return None
            if prompt_lp is not None:  # echo: the prompt's tokens first
                token_ids = [*encoded[i], *token_ids]
                logprobs = [*prompt_lp, *logprobs]
            return completion_logprobs(token_ids, logprobs, k, offset)

        def chunk(choice_list: list, usage: dict | None = None) -> str:
            return sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": choice_list,
                    "usage": usage,
                }
            )

        if body.stream:

            async def events() -> AsyncIterator[str]:
                started: set[int] = set()
                offsets: dict[int, int] = {}
                async for i, update in job.updates():
                    parts = []
                    for d in choices.apply(i, update):
                        c = d.choice
                        prefix = ""
                        if echoes is not None and c.index not in started:
                            prefix = echoes[i]
                        started.add(c.index)
                        lp = logprobs_of(i, d.token_ids, d.logprobs, offsets.get(c.index, 0))
                        if lp is not None and lp["tokens"]:
                            offsets[c.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                        parts.append(
                            {
                                "index": c.index,
                                "text": prefix + d.text,
                                "logprobs": lp,
                                "finish_reason": d.finish_reason,
                                "stop_reason": c.stop_reason if d.finish_reason else None,
                            }
                        )
                    if parts:
                        yield chunk(parts)
                if body.include_usage:
                    yield chunk([], choices.usage(sum(map(len, encoded))))

            return stream(job, events(), request)

        prompt_lps: dict[int, list] = {}
        for i, update in await collect(job, request):
            choices.apply(i, update)
            if update.prompt_logprobs is not None:
                prompt_lps[i] = update.prompt_logprobs
        out = []
        for c in choices.all:
            i = c.index // params.n
            echo = echoes[i] if echoes is not None else ""
            out.append(
                {
                    "index": c.index,
                    "text": echo + c.text,
                    "logprobs": logprobs_of(
                        i,
                        c.token_ids,
                        c.logprobs,
                        0,
                        prompt_lps.get(i) if echoes is not None else None,
                    ),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "prompt_logprobs": prompt_logprobs_json(prompt_lps.get(i))
                    if body.prompt_logprobs is not None
                    else None,
                }
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": out,
            "usage": choices.usage(sum(map(len, encoded))),
        }

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        s = ready()
        check_model(body.model)
        try:
            num_logprobs = body.num_logprobs()
        except ValueError as e:
            raise APIError(400, str(e), param="top_logprobs") from None
        params = sampling(s, body, body.output_limit(), num_logprobs)
        ids = chat_ids(s, body.messages, body.add_generation_prompt)
        check_fits(s, ids, params.max_tokens, "messages")
        job = await start(s, [ids], params)
        choices = Choices(1, params.n, params.stop_strings)
        rid, model, created = new_id("chatcmpl"), s.state.served_model_name, now()
        k = num_logprobs or 0

        def logprobs_of(token_ids, logprobs):
            return None if num_logprobs is None else chat_logprobs(token_ids, logprobs, k)

        def chunk(choice_list: list, usage: dict | None = None) -> str:
            return sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": choice_list,
                    "usage": usage,
                }
            )

        if body.stream:

            async def events() -> AsyncIterator[str]:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(params.n)
                    ]
                )
                async for i, update in job.updates():
                    parts = []
                    for d in choices.apply(i, update):
                        delta = {"content": d.text} if d.text or not d.finish_reason else {}
                        parts.append(
                            {
                                "index": d.choice.index,
                                "delta": delta,
                                "logprobs": logprobs_of(d.token_ids, d.logprobs),
                                "finish_reason": d.finish_reason,
                                "stop_reason": d.choice.stop_reason if d.finish_reason else None,
                            }
                        )
                    if parts:
                        yield chunk(parts)
                if body.include_usage:
                    yield chunk([], choices.usage(len(ids)))

            return stream(job, events(), request)

        prompt_lp = None
        for _, update in await collect(job, request):
            choices.apply(0, update)
            prompt_lp = update.prompt_logprobs or prompt_lp
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs_of(c.token_ids, c.logprobs),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c in choices.all
            ],
            "usage": choices.usage(len(ids)),
            "prompt_logprobs": prompt_logprobs_json(prompt_lp),
        }

    return app


# ---- helpers shared by the routes ------------------------------------------------------------


def tokenizer(s: Serving):
    if s.model.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: pass token ids, not text", param="prompt")
    return s.model.tokenizer


def encode(s: Serving, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return tokenizer(s).encode(text, add_special_tokens=add_special_tokens)
    except (TypeError, ValueError, UnicodeError) as e:
        raise APIError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from None


def chat_ids(s: Serving, messages, add_generation_prompt: bool) -> list[int]:
    tokenizer(s)
    try:
        text = s.model.chat_text([m.as_dict() for m in messages], add_generation_prompt)
    except Exception as e:  # the template's own errors (raise_exception, undefined, ...)
        raise APIError(
            400,
            f"the chat template could not render these messages: {type(e).__name__}: {e}",
            param="messages",
        ) from None
    return encode(s, text, False)


def sampling(s: Serving, body, max_tokens: int | None, logprobs: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs, s.state.sampling_defaults)
    except ValueError as e:
        message = str(e)
        param = field_of(message)
        raise APIError(400, message, param=param) from None


def check_fits(s: Serving, ids: list[int], max_tokens: int | None, param: str) -> None:
    try:
        s.model.validate_prompt(ids)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None
    limit = s.model.max_model_len
    if max_tokens is not None and len(ids) + max_tokens > limit:
        over = len(ids) + max_tokens - limit
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but the prompt has "
            f"{len(ids)} tokens and max_tokens asks for {max_tokens} more: {over} too "
            f"many; lower max_tokens to at most {limit - len(ids)} or shorten the prompt",
            param="max_tokens",
        )


async def start(s: Serving, prompts: list[list[int]], params) -> Job:
    job = Job(s.loop)
    try:
        await job.start(prompts, params)
    except ServerError as e:
        raise from_server_error(e) from None
    return job


async def collect(job: Job, request: Request) -> list[tuple[int, Update]]:
    """The job's updates for a non-streamed response; a client that goes away aborts it."""

    async def gather() -> list[tuple[int, Update]]:
        return [item async for item in job.updates()]

    gathering = asyncio.ensure_future(gather())
    disconnected = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({gathering, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if gathering not in done:
            raise APIError(499, "the client closed the request")
        return gathering.result()
    except ServerError as e:
        raise from_server_error(e) from None
    finally:
        gathering.cancel()
        disconnected.cancel()
        job.abort()


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stream(job: Job, events, request: Request) -> StreamingResponse:
    """SSE: the events, then `data: [DONE]`; an error mid-stream is a last `data: {error}`
    event. A client that disconnects cancels this generator, which aborts the job."""

    async def body():
        try:
            async for event in events:
                yield event
        except ServerError as e:
            yield sse(from_server_error(e).body())
        finally:
            job.abort()
        yield sse("[DONE]")

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
