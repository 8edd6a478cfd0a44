"""The OpenAI-compatible HTTP API, on FastAPI.

    GET  /                      the chat page (one self-contained HTML file, works offline)
    GET  /health                liveness and engine load (slots busy, sequences waiting)
    GET  /v1/models             the served model
    POST /v1/completions        text completion (prompt: a string, strings, token ids)
    POST /v1/chat/completions   chat completion, with the model's chat template (ChatML without one)
    GET  /docs, /openapi.json   the API description

Both POST endpoints take ``stream: true`` for server-sent events in OpenAI's chunk format (ending with
``data: [DONE]``), and ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``n``,
``presence_penalty``, ``frequency_penalty``, plus the common extensions ``top_k``,
``repetition_penalty`` and ``ignore_eos``. Unset sampling fields take the checkpoint's
generation_config.json values, else OpenAI's defaults (temperature 1, top_p 1).

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a request
that cannot be served as asked (malformed JSON, a prompt longer than the context window, max_tokens over
the limit), 401 for a missing or wrong API key, 404 for an unknown model or path, 408 past the
per-request timeout, 413 for a body over the size limit, 422 for fields of the wrong type or range, 429
when the queue is full. A 500 means a bug.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal, Optional, Union

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import ConfigError, ServeConfig, UserError
from ..generate import chat_prompt, encode_prompt
from .engine import Engine, Event, QueueFull, Request as EngineRequest, SamplingParams

log = logging.getLogger("lmforge.serve")

MAX_STOP = 16  # stop strings per request
MAX_PROMPTS = 64  # prompts in one /v1/completions request


# --------------------------------------------------------------------------------------------------
# Request and response schemas (they are also the OpenAPI description at /docs)


def _float(default=None, **kw):
    return Field(default, allow_inf_nan=False, **kw)


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send a last chunk with the token usage (and empty choices) before [DONE]."""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, description="The served model's id (see /v1/models); optional.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: Optional[float] = _float(ge=0, le=2, description="0 means greedy. Default: the checkpoint's, else 1.")
    top_p: Optional[float] = _float(gt=0, le=1, description="Nucleus sampling mass. Default: the checkpoint's, else 1.")
    n: int = Field(1, ge=1, description="Choices to generate (at most the server's --max-batch).")
    stream: bool = Field(False, description="Send the answer as server-sent events.")
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = Field(None, description="Up to 16 strings that end generation.")
    seed: Optional[int] = Field(None, description="Makes sampling reproducible (choice i uses seed + i).")
    presence_penalty: Optional[float] = _float(ge=-2, le=2)
    frequency_penalty: Optional[float] = _float(ge=-2, le=2)
    user: Optional[str] = None
    top_k: Optional[int] = Field(None, ge=0, description="Extension: keep the k most likely tokens (0: all).")
    repetition_penalty: Optional[float] = _float(gt=0, le=10, description="Extension: CTRL's repetition penalty.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-text tokens.")


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: Optional[bool] = Field(None, description="Not supported (must be false or absent).")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        "", description="A string, several strings, token ids, or several lists of token ids.")
    echo: bool = Field(False, description="Return the prompt in front of the completion.")
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="Not supported (must be 0 or absent).")
    suffix: Optional[str] = Field(None, description="Not supported (must be absent).")
    best_of: Optional[int] = Field(None, ge=1, description="Must equal n when given.")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str
    quantize: str
    slots: int
    active: int
    waiting: int
    context_window: int
    compiled_step: bool = Field(description="decode steps run lmforge's compiled step (lmforge.fused), not "
                                            "the model's forward")
    steps: int
    tokens: int
    cancelled: int
    timed_out: int


# --------------------------------------------------------------------------------------------------
# Errors


class APIError(HTTPException):
    """An error for the client, answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(status_code=status, detail=message)
        self.message, self.type, self.param, self.code = message, type, param, code


def _json(content: Any, status: int = 200) -> Response:
    # ASCII-escaped JSON: valid for any text, whatever a client sent.
    return Response(json.dumps(content, ensure_ascii=True), status_code=status, media_type="application/json")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict] = None) -> Response:
    r = _json({"error": {"message": message, "type": type, "param": param, "code": code}}, status)
    if headers:
        r.headers.update(headers)
    return r


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "server_unavailable"}


def _api_error_for_event(ev: Event) -> APIError:
    return APIError(ev.status, ev.message, type=_ERROR_TYPES.get(ev.status, "server_error"))


def _validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


ERROR_RESPONSES: dict = {code: {"model": ErrorResponse, "description": about} for code, about in (
    (400, "The request cannot be served as asked (malformed JSON, prompt too long, limits)"),
    (401, "Missing or wrong API key"),
    (404, "Unknown model"),
    (408, "The request took longer than the server's per-request timeout"),
    (413, "Request body too large"),
    (422, "A field has the wrong type or is out of range"),
    (429, "Too many requests are waiting"),
)}


# --------------------------------------------------------------------------------------------------
# Body size limit (before anything reads the body)


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by Content-Length or as it streams in.
    It also reads every POST body to /v1/ as JSON whatever its Content-Type says (``curl -d`` sends
    form encoding), as OpenAI's API does."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/"):
            headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
            scope = dict(scope, headers=headers)
        length = dict(headers).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await error_response(400, "invalid Content-Length header")(scope, receive, send)
            if too_big:
                return await self._too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body is larger than the limit of {self.limit} bytes "
                                        f"(--max-request-bytes)", type="request_too_large")
            return message

        return await self.app(scope, counted, send)

    async def _too_large(self, scope, receive, send):
        r = error_response(413, f"request body is larger than the limit of {self.limit} bytes (--max-request-bytes)",
                           type="request_too_large", headers={"Connection": "close"})
        await r(scope, receive, send)


# --------------------------------------------------------------------------------------------------
# The app


def _check_text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: text is not valid Unicode (lone surrogate)", param=param) from None
    return value


class _Stream:
    """Carries engine events (from the engine thread) into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list[EngineRequest] = []

    def emitter(self, offset: int):
        def emit(ev: Event) -> None:
            if ev.kind != "error":
                ev.index += offset
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass
        return emit

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


class Server:
    """The state behind the routes: the model, its tokenizer, the engine and the limits."""

    def __init__(self, lm, cfg: ServeConfig, name: str):
        self.lm, self.cfg, self.name = lm, cfg, name
        self.tok = lm.tokenizer
        self.created = int(time.time())
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=cfg.max_batch, max_context=cfg.max_context,
                             max_queue=cfg.max_queue, batch_invariant=cfg.batch_invariant)
        self.window = self.engine.window
        self.block = lm.model.cfg.block_size
        self.stop_ids = frozenset(set(getattr(self.tok, "stop_ids", ())) | lm._extra_stop_ids())
        self.chat_stop_ids = frozenset(self.stop_ids | lm._end_of_turn_ids())
        gen = (lm.meta or {}).get("generation") or {}
        self.defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                         if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
        if gen.get("do_sample") is False:
            self.defaults["temperature"] = 0.0

    # ----------------------------------------------------------------------------------------------
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.name:
            _check_text(model, "model")
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        _check_text(text, param)
        try:
            return encode_prompt(self.tok, text)
        except UserError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain exceptions for odd text
            raise APIError(400, f"{param}: cannot tokenize the text ({type(e).__name__})", param=param) from None

    def sampling(self, body: _Sampling, prompt_len: int, max_tokens: Optional[int], param: str,
                 stop_ids: frozenset) -> SamplingParams:
        if prompt_len >= self.window:
            raise APIError(400, f"the prompt is {prompt_len} tokens, longer than the context window of "
                                f"{self.window} tokens (it must leave room for at least one new token); "
                                f"shorten the prompt", param=param, code="context_length_exceeded")
        room = self.window - prompt_len
        limit = self.cfg.max_tokens_limit
        if max_tokens is None:
            max_tokens = min(self.cfg.default_max_tokens, room)
        elif max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's limit of {limit} "
                                f"(--max-tokens-limit)", param="max_tokens")
        elif prompt_len + max_tokens > self.window:
            raise APIError(400, f"the context window is {self.window} tokens, but {prompt_len + max_tokens} were "
                                f"requested ({prompt_len} in the prompt, {max_tokens} in max_tokens); shorten the "
                                f"prompt or lower max_tokens", param="max_tokens", code="context_length_exceeded")
        stop = body.stop if body.stop is not None else []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        for s in stop:
            _check_text(s, "stop")
        pick = lambda v, k, d: v if v is not None else self.defaults.get(k, d)  # noqa: E731
        temperature = float(pick(body.temperature, "temperature", 1.0))
        top_p = float(pick(body.top_p, "top_p", 1.0))
        top_k = int(pick(body.top_k, "top_k", 0))
        rep = float(pick(body.repetition_penalty, "repetition_penalty", 1.0))
        if not (0 <= temperature and 0 < top_p <= 1 and top_k >= 0 and rep > 0):
            raise APIError(400, "the checkpoint's generation_config.json has invalid sampling defaults; set "
                                "temperature, top_p, top_k and repetition_penalty in the request")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=min(top_k, self.lm.model.cfg.vocab_size), repetition_penalty=rep,
                              presence_penalty=body.presence_penalty or 0.0,
                              frequency_penalty=body.frequency_penalty or 0.0,
                              stop=[s for s in stop if s], stop_ids=stop_ids,
                              seed=None if body.seed is None else body.seed % 2**64, ignore_eos=body.ignore_eos)

    def check_n(self, n: int, prompts: int = 1) -> None:
        if n > self.cfg.max_batch:
            raise APIError(400, f"n is {n}, more than this server's {self.cfg.max_batch} decode slots "
                                f"(--max-batch)", param="n")
        if n * prompts > self.cfg.max_queue:
            raise APIError(400, f"{n * prompts} choices requested; this server queues at most {self.cfg.max_queue} "
                                f"(--max-queue)", param="n")

    def submit(self, prompts: list[list[int]], n: int, params: list[SamplingParams]) -> _Stream:
        stream = _Stream(asyncio.get_running_loop())
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                req = EngineRequest(ids, n, p, stream.emitter(i * n), deadline)
                self.engine.submit(req)
                stream.requests.append(req)
        except QueueFull as e:
            stream.cancel()
            raise APIError(e.status, str(e), type=_ERROR_TYPES[e.status]) from None
        return stream

    async def collect(self, stream: _Stream, total: int, http: Request) -> tuple[list[str], list[str], list[int]]:
        """Wait for every choice to finish (the client going away cancels the request)."""
        texts: list[list[str]] = [[] for _ in range(total)]
        reasons, tokens = [""] * total, [0] * total
        finished = 0
        try:
            while finished < total:
                try:
                    ev = await asyncio.wait_for(stream.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise APIError(499, "client disconnected") from None
                    continue
                if ev.kind == "text":
                    texts[ev.index].append(ev.text)
                elif ev.kind == "finish":
                    reasons[ev.index], tokens[ev.index] = ev.reason, ev.tokens
                    finished += 1
                else:
                    raise _api_error_for_event(ev)
        finally:
            stream.cancel()  # no-op for finished requests; frees the slots of abandoned ones
        return ["".join(t) for t in texts], reasons, tokens

    async def sse(self, stream: _Stream, total: int, chunk, usage_chunk, prefix: Optional[list[str]] = None):
        """Server-sent events: first chunks, text chunks as they come, finish chunks, usage, [DONE]."""
        def data(obj) -> str:
            return "data: " + json.dumps(obj, ensure_ascii=True) + "\n\n"

        tokens = [0] * total
        finished = 0
        try:
            for i in range(total):
                yield data(chunk(i, "" if prefix is None else prefix[i], None, first=True))
            while finished < total:
                ev = await stream.queue.get()
                if ev.kind == "text":
                    yield data(chunk(ev.index, ev.text, None))
                elif ev.kind == "finish":
                    tokens[ev.index] = ev.tokens
                    finished += 1
                    yield data(chunk(ev.index, "", ev.reason))
                else:
                    err = _api_error_for_event(ev)
                    yield data({"error": {"message": err.message, "type": err.type, "param": None,
                                          "code": str(ev.status)}})
                    break
            else:
                if usage_chunk is not None:
                    yield data(usage_chunk(sum(tokens)))
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()  # the client went away (or we are done): free the slots

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _page() -> str:
    return resources.files("lmforge.serve").joinpath("index.html").read_text(encoding="utf-8")


def create_app(lm, cfg: ServeConfig, name: Optional[str] = None) -> FastAPI:
    """The FastAPI application serving ``lm`` (an ``lmforge.LM`` with a tokenizer)."""
    if lm.tokenizer is None:
        raise UserError("this model has no tokenizer; serve a checkpoint that includes tokenizer.json")
    cfg.validate()
    name = name or cfg.model_name or lm.name
    quantized = getattr(lm.model, "quantized", "none")
    server = Server(lm, cfg, name)
    page = _page()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan,
                  description=f"OpenAI-compatible API serving **{name}**. The chat page is at `/`.")
    app.state.server = server

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, APIError):
            return error_response(exc.status_code, exc.message, exc.type, exc.param, exc.code)
        kind = _ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        msg = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, msg, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", param="body")
        msg, param = _validation_message(errors)
        return error_response(422, msg, param=param)

    @app.exception_handler(UserError)
    @app.exception_handler(ConfigError)
    async def user_error(request: Request, exc: Exception):
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error")

    # -- auth --------------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="The server's --api-key, when it has one.")

    async def authorize(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        key = cfg.api_key
        if key is None:
            return
        given = creds.credentials if creds is not None else ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8")):
            raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    auth = [Depends(authorize)]

    # -- routes ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/health", response_model=Health, summary="Liveness and load")
    async def health() -> dict:
        return {"status": "ok", "model": name, "quantize": quantized, **server.engine.stats()}

    def card() -> dict:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "lmforge"}

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=ERROR_RESPONSES,
             summary="List the served model")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=auth, responses=ERROR_RESPONSES,
             summary="Describe the served model")
    async def model_info(model_id: str) -> dict:
        server.check_model(model_id)
        return card()

    # Before OpenAPI 3.2 a text/event-stream schema describes one event; ours carry a JSON chunk or [DONE].
    stream_doc = {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "A JSON chunk, or [DONE] at the end"}}}}}

    @app.post("/v1/chat/completions", dependencies=auth, summary="Chat completion",
              responses={200: {"model": ChatCompletion, "content": stream_doc,
                               "description": "A chat completion, or with stream: true, server-sent events"},
                         **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        server.check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        server.check_n(body.n)
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            messages.append({"role": m.role, "content": _check_text(content, f"messages.{i}.content")})
        try:
            text = chat_prompt(server.tok, messages)
        except UserError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        ids = server.encode(text, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = server.sampling(body, len(ids), max_tokens, "messages", server.chat_stop_ids)
        stream = server.submit([ids], body.n, [params])
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "created": created, "model": name, "system_fingerprint": f"lmforge-{__version__}"}
        if not body.stream:
            texts, reasons, tokens = await server.collect(stream, body.n, http)
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": reasons[i]} for i in range(body.n)]
            return _json({**head, "object": "chat.completion", "choices": choices,
                          "usage": server.usage(len(ids), sum(tokens))})

        def chunk(i: int, text: str, reason: Optional[str], first: bool = False) -> dict:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        usage_chunk = None
        if body.stream_options is not None and body.stream_options.include_usage:
            usage_chunk = lambda done: {**head, "object": "chat.completion.chunk", "choices": [],  # noqa: E731
                                        "usage": server.usage(len(ids), done)}
        return _sse_response(server.sse(stream, body.n, chunk, usage_chunk))

    @app.post("/v1/completions", dependencies=auth, summary="Text completion",
              responses={200: {"model": Completion, "content": stream_doc,
                               "description": "A completion, or with stream: true, server-sent events"},
                         **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, http: Request) -> Response:
        server.check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (this server returns every choice it samples)", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif len(prompt) > 0 and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}",
                           param="prompt")
        server.check_n(body.n, len(prompts))
        V = lm.model.cfg.vocab_size
        ids_list, echo_texts = [], []
        for p in prompts:
            if isinstance(p, str):
                ids_list.append(server.encode(p, "prompt"))
                echo_texts.append(p)
            else:
                if not p:
                    raise APIError(400, "prompt: a token-id prompt is empty", param="prompt")
                if min(p) < 0 or max(p) >= V:
                    raise APIError(400, f"prompt: token ids must be in [0, {V})", param="prompt")
                ids_list.append(list(p))
                echo_texts.append(server.tok.decode(p) if body.echo else "")
        params = [server.sampling(body, len(ids), body.max_tokens, "prompt", server.stop_ids) for ids in ids_list]
        total = len(prompts) * body.n
        prefix = [echo_texts[i // body.n] if body.echo else "" for i in range(total)]
        stream = server.submit(ids_list, body.n, params)
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "created": created, "model": name, "system_fingerprint": f"lmforge-{__version__}"}
        prompt_tokens = sum(len(x) for x in ids_list)
        if not body.stream:
            texts, reasons, tokens = await server.collect(stream, total, http)
            choices = [{"index": i, "text": prefix[i] + texts[i], "logprobs": None, "finish_reason": reasons[i]}
                       for i in range(total)]
            return _json({**head, "object": "text_completion", "choices": choices,
                          "usage": server.usage(prompt_tokens, sum(tokens))})

        def chunk(i: int, text: str, reason: Optional[str], first: bool = False) -> dict:
            return {**head, "object": "text_completion",
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

        usage_chunk = None
        if body.stream_options is not None and body.stream_options.include_usage:
            usage_chunk = lambda done: {**head, "object": "text_completion", "choices": [],  # noqa: E731
                                        "usage": server.usage(prompt_tokens, done)}
        return _sse_response(server.sse(stream, total, chunk, usage_chunk, prefix))

    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    return app


def _sse_response(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
