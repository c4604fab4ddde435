"""The OpenAI-compatible routes over one `LLM`, as a FastAPI app.

Every request is a coroutine awaiting the engine's futures (`await` a RequestOutput, `async for`
over a streaming one); no thread is spent per request. A streamed request whose client goes away
is aborted (its pages are freed within an engine step); so is an unstreamed one, found by polling
the connection while it waits. The app refuses with 503 until `ServerState.llm` is set and after
`ServerState.draining` is; every route but /health needs the API key when one is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

import jaxllm
from jaxllm import chat as chat_lib
from jaxllm.engine.engine import EngineShutdown
from jaxllm.serve import endpoints, protocol
from jaxllm.serve.metrics import CONTENT_TYPE, ServerMetrics
from jaxllm.serve.protocol import ServeError

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this is refused with 413
DISCONNECT_POLL_S = 0.5  # how often an unstreamed request checks that its client is still there


@dataclasses.dataclass
class ServerState:
    """What the routes share: the LLM (None while it loads), its public name and the limits."""

    model_name: str
    llm: Any = None
    api_key: Optional[str] = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    draining: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = dataclasses.field(init=False)

    def __post_init__(self):
        self.metrics = ServerMetrics(lambda: self.llm)

    def ready_llm(self):
        if self.draining:
            raise ServeError(503, "the server is shutting down", type="service_unavailable")
        if self.llm is None:
            raise ServeError(503, "the model is loading", type="service_unavailable")
        return self.llm


def _error(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _parse(request: Request, state: ServerState, model: type[BaseModel]):
    """The body as `model`; 413 over the size limit, 400 for bad JSON or fields, 404 for another model."""
    body = await request.body()
    if len(body) > state.max_body_bytes:
        raise ServeError(413, f"the request body has {len(body)} bytes; the limit is {state.max_body_bytes}")
    return endpoints.parse(body, model, state.model_name)


@dataclasses.dataclass(frozen=True)
class _SeqStep:
    """What one streamed step added to one sequence (copied at once: the RequestOutput moves on)."""

    index: int
    text: str
    token_ids: list
    logprobs: list
    finish_reason: Optional[str]


async def _merge(outputs: list) -> AsyncIterator[tuple[int, list[_SeqStep]]]:
    """(prompt index, its sequences' steps) for each streamed step of several requests, as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, out):
        try:
            async for step in out:
                seqs = [_SeqStep(s.index, s.text_diff, s.token_ids_diff, s.logprobs_diff, s.finish_reason)
                        for s in step.outputs]  # fmt: skip
                await queue.put((i, seqs, None))
        except Exception as e:  # the request failed in the engine: end the stream with it
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, out)) for i, out in enumerate(outputs)]
    try:
        done = 0
        while done < len(outputs):
            i, seqs, error = await queue.get()
            if error is not None:
                raise error
            if seqs is None:
                done += 1
            else:
                yield i, seqs
    finally:
        for task in tasks:
            task.cancel()


def _abort_unfinished(outputs: list, state: ServerState) -> None:
    """Abort the requests still running (their client left); each is counted in the metrics when the
    engine has cancelled it."""
    for out in outputs:
        if not out.done():
            out.abort()
            asyncio.get_running_loop().create_task(_record_when_cancelled(state, out))


async def _record_when_cancelled(state: ServerState, out) -> None:
    try:
        state.metrics.record(await out.aresult())
    except Exception:  # a request that failed while cancelled counts as nothing
        pass


async def _watch_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _await_all(request: Request, state: ServerState, outputs: list) -> list:
    """Every output finished; aborted when the client disconnects first."""
    gathered = asyncio.ensure_future(asyncio.gather(*(out.aresult() for out in outputs)))
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            raise asyncio.CancelledError("the client disconnected")
        return gathered.result()
    finally:
        watcher.cancel()
        if not gathered.done():
            gathered.cancel()
        _abort_unfinished(outputs, state)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


# ---- the app -------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware: the API key and the declared body size, checked before a route runs. (Plain
    ASGI rather than Starlette's BaseHTTPMiddleware, which hides a client's disconnect from routes.)"""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> Optional[ServeError]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.state.api_key
        if key is not None and scope["path"] != "/health" and headers.get("authorization") != f"Bearer {key}":
            return ServeError(401, "a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.state.max_body_bytes:
            return ServeError(413, f"the request body has {length} bytes; the limit is {self.state.max_body_bytes}")
        return None


def create_app(state: ServerState) -> FastAPI:
    """The routes over `state` (its llm may be set later: the app answers 503 until then)."""
    app = FastAPI(title="jaxllm", version=jaxllm.__version__)
    app.state.serve = state

    app.add_middleware(_Guard, state=state)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return _error(e)

    @app.exception_handler(EngineShutdown)
    async def engine_shutdown(request: Request, e: EngineShutdown):
        return _error(ServeError(503, str(e), type="service_unavailable"))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return _error(ServeError(500, f"{type(e).__name__}: {e}", type="internal_error"))

    @app.exception_handler(404)
    async def not_found(request: Request, e):
        return _error(ServeError(404, f"no route {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def bad_method(request: Request, e):
        return _error(ServeError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.get("/health")
    async def health():
        state.ready_llm()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": jaxllm.__version__}

    @app.get("/v1/models")
    async def models():
        llm = state.ready_llm()
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "jaxllm",
            "root": llm.model_name, "max_model_len": llm.max_seq_len}]}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        llm = state.ready_llm()
        body = await _parse(request, state, protocol.TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise ServeError(400, "give one of prompt and messages", param="prompt")
        try:
            if body.messages is not None:
                ids = chat_lib.render(llm.tokenizer, body.messages,
                                      add_generation_prompt=body.add_generation_prompt)["prompt_token_ids"]  # fmt: skip
            else:
                ids = list(llm.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        except ValueError as e:
            raise ServeError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        llm = state.ready_llm()
        body = await _parse(request, state, protocol.DetokenizeRequest)
        vocab = llm.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ServeError(400, f"tokens must be in [0, {vocab})", param="tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        llm = state.ready_llm()
        body = await _parse(request, state, protocol.CompletionRequest)
        return await _generate(request, state, llm, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        llm = state.ready_llm()
        body = await _parse(request, state, protocol.ChatCompletionRequest)
        return await _generate(request, state, llm, body)

    return app


async def _generate(request: Request, state: ServerState, llm, body):
    """Submit a parsed completion or chat request (endpoints.prepare) and answer it."""
    prompts, params = endpoints.prepare(llm.tokenizer, llm.max_seq_len, llm.config.vocab_size, body)
    outputs = []
    try:
        for prompt in prompts:
            outputs.append(endpoints.submit(llm, prompt, params, body.stream))
    except BaseException:
        _abort_unfinished(outputs, state)
        raise
    chat = isinstance(body, protocol.ChatCompletionRequest)
    request_id, created = endpoints.request_id(chat), int(time.time())
    if body.stream:
        return StreamingResponse(_stream(state, llm, body, outputs, request_id, created, chat),
                                 media_type="text/event-stream")  # fmt: skip
    done = await _await_all(request, state, outputs)
    for out in done:
        state.metrics.record(out)
    return endpoints.response_body(llm.tokenizer, state.model_name, body, done, request_id, created)


async def _stream(state: ServerState, llm, body, outputs: list, request_id: str, created: int, chat: bool):
    """Server-sent events: one chunk per choice per engine step that added to it, then (with
    stream_options.include_usage) a usage chunk, then [DONE]. Leaving early aborts what runs."""
    n = body.n
    kind = "chat.completion.chunk" if chat else "text_completion"
    num_logprobs = body.top_logprobs or 0 if chat else body.logprobs
    want_logprobs = body.logprobs if chat else body.logprobs is not None
    tokenizer = llm.tokenizer
    offsets: dict[int, int] = {}
    started: set[int] = set()

    def chunk(choices, usage=None):
        data = {"id": request_id, "object": kind, "created": created, "model": state.model_name, "choices": choices}
        if body.include_usage:
            data["usage"] = usage
        return _sse(data)

    try:
        async for p, seqs in _merge(outputs):
            choices = []
            for seq in seqs:
                index = p * n + seq.index
                text, tokens, reason = seq.text, seq.token_ids, seq.finish_reason
                if chat and index not in started:
                    started.add(index)
                    yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])  # fmt: skip
                if not text and not tokens and reason is None:
                    continue
                logprobs = None
                if want_logprobs and tokens:
                    logprobs = (endpoints.chat_logprobs(tokenizer, tokens, seq.logprobs, num_logprobs) if chat else
                                endpoints.completion_logprobs(tokenizer, tokens, seq.logprobs, num_logprobs,
                                                    offsets.get(index, 0)))  # fmt: skip
                offsets[index] = offsets.get(index, 0) + len(text)
                choice = {"index": index, "logprobs": logprobs, "finish_reason": protocol.finish_reason(reason)}
                if chat:
                    choice["delta"] = {"content": text} if text else {}
                else:
                    choice["text"] = text
                if body.return_token_ids:
                    choice["token_ids"] = list(tokens)
                choices.append(choice)
            if choices:
                yield chunk(choices)
        for out in outputs:
            state.metrics.record(out)
        if body.include_usage:
            yield chunk([], endpoints.usage(outputs))
        yield "data: [DONE]\n\n"
    except Exception as e:  # the engine failed the request: tell the client in the stream
        yield _sse(ServeError(500, str(e), type="internal_error").body())
    finally:
        _abort_unfinished(outputs, state)
