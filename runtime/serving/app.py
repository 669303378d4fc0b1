"""The OpenAI-compatible HTTP API over one engine (FastAPI).

`model` is an adapter name, or the bundle's base name for no adapter. Every error is an
OpenAI error object: unknown model 404, bad parameters 400 (a prompt longer than the context
included), missing or wrong API key 401, queue full 503, body too large 413.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from peft_export.bundle.errors import PeftExportError
from peft_export.runtime.errors import (
    ContextLengthError,
    InferenceError,
    QueueFullError,
    SchedulerClosedError,
    UnknownAdapterError,
)
from peft_export.runtime.request import SamplingOptions
from peft_export.runtime.serving.engine import Engine, Piece
from peft_export.runtime.serving.limits import BodyLimit, error_body
from peft_export.runtime.serving.metrics import ServerMetrics
from peft_export.runtime.serving.schemas import (
    AdapterLoad,
    ChatRequest,
    CompletionRequest,
    _Sampling,
)

DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default max_tokens for /v1/completions."""


@dataclass
class ServerConfig:
    base_name: str
    """The `model` name that means no adapter."""
    api_key: str | None = None
    adapter_root: Path | None = None
    """POST /v1/adapters reads adapter folders only below this folder; None refuses it."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (None: the model's context)."""
    default_chat_tokens: int = 512
    """max_tokens of a chat request that sends none (bounded by the room left in context)."""


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind, extra.get("code"), extra.get("param"))


def _status_of(exc: PeftExportError) -> ApiError:
    if isinstance(exc, UnknownAdapterError):
        return ApiError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, QueueFullError | SchedulerClosedError):
        return ApiError(503, str(exc), "server_error", code="overloaded")
    return ApiError(400, str(exc))


class OpenAIServer:
    """Holds the engine, the config and the metrics; `app` is the FastAPI application."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.bundle = engine.bundle
        self.config = config
        self.metrics = ServerMetrics(engine)
        self.app = self._build()

    # -- application ----------------------------------------------------------------

    def _build(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            yield
            await run_in_threadpool(self.engine.close)

        app = FastAPI(
            title="peft-export", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
        )
        app.add_middleware(BodyLimit, max_bytes=self.config.max_body_bytes)

        @app.exception_handler(ApiError)
        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return JSONResponse(exc.body, status_code=exc.status)

        @app.exception_handler(RequestValidationError)
        async def bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
            body = error_body(f"{where}: {message}" if where else message, "invalid_request_error")
            body["error"]["param"] = where or None
            return JSONResponse(body, status_code=400)

        @app.exception_handler(HTTPException)
        async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
            body = error_body(str(exc.detail), "invalid_request_error")
            return JSONResponse(body, status_code=exc.status_code)

        @app.middleware("http")
        async def authorize(request: Request, call_next):
            if self.config.api_key and request.url.path != "/health":
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), self.config.api_key.encode()):
                    body = error_body(
                        "missing or wrong API key; send 'Authorization: Bearer KEY'",
                        "authentication_error",
                        "invalid_api_key",
                    )
                    return JSONResponse(body, status_code=401)
            return await call_next(request)

        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/adapters")(self.load_adapter)
        app.delete("/v1/adapters/{name}")(self.unload_adapter)
        return app

    # -- plain endpoints ------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {"status": "ok", "engine": self.engine.name, "running_rows": stats.running_rows}

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict[str, Any]:
        created = int(self.bundle.root.joinpath("manifest.json").stat().st_mtime)
        ids = [self.config.base_name, *self.engine.adapters()]
        data = [
            {"id": i, "object": "model", "created": created, "owned_by": "peft-export"} for i in ids
        ]
        return {"object": "list", "data": data}

    # -- adapters -------------------------------------------------------------------

    async def load_adapter(self, body: AdapterLoad) -> dict[str, Any]:
        from peft_export.runtime.serving.adapter_install import convert_to_file

        folder = self._adapter_folder(body.path)
        if body.name == self.config.base_name:
            raise ApiError(400, f"{body.name!r} is the base model's name; choose another")
        try:
            method = await run_in_threadpool(
                convert_to_file, self.engine, body.name, folder, body.replace
            )
        except PeftExportError as exc:
            raise _status_of(exc) from None
        return {"id": body.name, "object": "model", "method": method}

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        if name not in self.engine.adapters():
            raise ApiError(404, f"no adapter named {name!r}", code="model_not_found")
        try:
            await run_in_threadpool(self.engine.unregister, name)
        except PeftExportError as exc:
            raise _status_of(exc) from None
        return {"id": name, "object": "model", "deleted": True}

    def _adapter_folder(self, path: str) -> Path:
        root = self.config.adapter_root
        if root is None:
            raise ApiError(
                403,
                "this server loads no adapters over HTTP; start it with --adapter-root DIR",
                "permission_error",
            )
        base = root.resolve()
        folder = (base / path).resolve()
        if not folder.is_relative_to(base):
            raise ApiError(
                403, f"{path!r} is outside the server's --adapter-root", "permission_error"
            )
        if not folder.is_dir():
            raise ApiError(400, f"{path!r} is not an adapter folder under --adapter-root")
        return folder

    # -- generation -----------------------------------------------------------------

    async def completions(self, body: CompletionRequest) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self._codec().encode_text(prompt)
        else:
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < self.bundle.manifest.vocab_size for t in ids):
                raise ApiError(400, "prompt token ids are outside the vocabulary", param="prompt")
        return await self._generate("completions", body, ids, DEFAULT_COMPLETION_TOKENS)

    async def chat_completions(self, body: ChatRequest) -> Any:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        try:
            ids = self._codec().encode_messages(messages)
        except InferenceError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return await self._generate("chat", body, ids, self.config.default_chat_tokens)

    def _codec(self):
        if self.bundle.codec is None:
            raise ApiError(400, "this bundle ships no tokenizer; send prompt token ids")
        return self.bundle.codec

    async def _generate(self, endpoint: str, body: _Sampling, ids: list[int], default: int):
        adapter = self._adapter(body.model)
        max_tokens = self._token_limit(body, ids, default)
        options = SamplingOptions(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_strings=body.stop_strings,
            ignore_eos=body.ignore_eos,
        )
        arrived = time.monotonic()
        try:
            handle = self.engine.submit(ids, options, adapter)
        except PeftExportError as exc:
            error = _status_of(exc)
            outcome = "rejected" if error.status == 503 else "client_error"
            self.metrics.requests.labels(endpoint, outcome).inc()
            raise error from None
        self.metrics.prompt_tokens.inc(len(ids))
        reply = _Reply(endpoint, body.model, len(ids))
        pieces = self._timed(endpoint, handle, arrived)
        if body.stream:
            return StreamingResponse(
                reply.sse(pieces, body.include_usage), media_type="text/event-stream"
            )
        try:
            async for piece in pieces:
                reply.add(piece)
        except PeftExportError as exc:
            raise _status_of(exc) from None
        return reply.whole()

    async def _timed(self, endpoint: str, handle, arrived: float) -> AsyncIterator[Piece]:
        """The handle's pieces, observed for the latency histograms; the request is
        cancelled when the consumer stops early (a client that went away)."""
        last = None
        outcome = "cancelled"
        try:
            async for piece in handle.aevents():
                now = time.monotonic()
                if piece.tokens:
                    if last is None:
                        self.metrics.ttft.observe(now - arrived)
                    else:
                        self.metrics.inter_token.observe(now - last)
                    last = now
                    self.metrics.token(now)
                if piece.finish_reason is not None:
                    outcome = "ok"
                    self.metrics.e2e.observe(now - arrived)
                yield piece
        except PeftExportError:
            outcome = "error"
            raise
        finally:
            if outcome != "ok":
                handle.cancel()
            self.metrics.requests.labels(endpoint, outcome).inc()

    def _adapter(self, model: str) -> str | None:
        if model == self.config.base_name:
            return None
        if not self.engine.owns(model):
            known = ", ".join([self.config.base_name, *self.engine.adapters()])
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server has {known}",
                code="model_not_found",
                param="model",
            )
        return model

    def _token_limit(self, body: _Sampling, ids: list[int], default: int) -> int:
        context = self.bundle.max_positions
        limit = self.config.max_prompt_tokens or context
        if limit is not None and len(ids) > limit:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens, more than this server's limit of {limit}; "
                "send a shorter prompt",
                code="context_length_exceeded",
                param="messages",
            )
        wanted = body.token_limit
        if wanted is None:
            wanted = default if context is None else max(0, min(default, context - len(ids)))
        if context is not None and len(ids) + wanted > context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({wanted}) exceeds the "
                f"model's context of {context} tokens; lower max_tokens or shorten the prompt",
                code="context_length_exceeded",
                param="max_tokens",
            )
        return wanted


class _Reply:
    """Builds the OpenAI response (whole, or as SSE chunks) of one request."""

    def __init__(self, endpoint: str, model: str, prompt_tokens: int) -> None:
        self.chat = endpoint == "chat"
        self.model = model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.text: list[str] = []
        self.finish_reason: str | None = None

    def add(self, piece: Piece) -> None:
        self.completion_tokens += piece.tokens
        self.text.append(piece.text)
        self.finish_reason = piece.finish_reason or self.finish_reason

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def _envelope(self, obj: str, choices: list[dict], usage: dict | None) -> dict[str, Any]:
        out = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None or obj != "chat.completion.chunk":
            out["usage"] = usage
        return out

    def whole(self) -> dict[str, Any]:
        text = "".join(self.text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = self.finish_reason or "stop"
        return self._envelope(self.object, [choice], self.usage())

    def _chunk(self, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice], None)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], None)

    async def sse(self, pieces: AsyncIterator[Piece], include_usage: bool) -> AsyncIterator[str]:
        first = True
        try:
            async for piece in pieces:
                self.add(piece)
                if piece.text or piece.finish_reason or first:
                    yield _event(self._chunk(piece.text, piece.finish_reason, first))
                    first = False
        except PeftExportError as exc:
            yield _event(_status_of(exc).body)
            return
        if include_usage:
            usage = self._envelope(
                "chat.completion.chunk" if self.chat else "text_completion", [], self.usage()
            )
            yield _event(usage)
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    return OpenAIServer(engine, config).app
