"""The HTTP API: request/response schemas and routes (FastAPI). The engine owns the model.

Routes: `GET /` (health with model facts, the original's health URL), `GET /health` (live),
`GET /ready` (503 until the model is warmed up), `POST /predict` (the original contract),
`POST /v1/completions` and `GET /v1/models` (OpenAI-compatible), `GET /metrics` (Prometheus).

Request bodies are read here, not by FastAPI's body binding, because the original contract is
`curl -d '{"text": ...}'` with no Content-Type (curl then labels the JSON as form data): every
POST body is parsed as UTF-8 JSON whatever its content type, under a size cap, and every
failure becomes a typed error from errors.py rendered in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .engine import Engine, RequestStream
from .errors import (AuthenticationError, InvalidRequestError, MethodNotAllowedError, ModelNotFoundError,
                     NotFoundError, NotReadyError, OverloadedError, PayloadTooLargeError, WikigptError)
from .settings import SamplingParams, ServeSettings

log = logging.getLogger("wikigpt.api")
_DEFAULTS = SamplingParams()


# ---- schemas ---------------------------------------------------------------------------------
class PredictRequest(SamplingParams):
    """The original contract, `{"text": "..."}`, plus optional sampling settings."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", strict=True)

    text: str = Field(min_length=1, max_length=100_000)
    """The prompt to continue; the answer repeats it followed by the continuation."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request. Omitted sampling fields take wikigpt's decoding
    defaults (temperature 0.8, top-p 0.95, top-k 50, repetition penalty 1.1, 64 tokens), not
    OpenAI's, because those are what keeps this model's text readable."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    echo: bool = False
    ignore_eos: bool = False
    """Keep generating past the end-of-text token (benchmarks use it for fixed lengths)."""
    user: str | None = None
    logprobs: None = None
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)

    @field_validator("prompt")
    @classmethod
    def _prompt_items(cls, value):
        if isinstance(value, list) and len(value) > 64 and not isinstance(value[0], int):
            raise ValueError("at most 64 prompts per request")
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and any(isinstance(p, (str, list)) and not p for p in value):
            raise ValueError("prompts must not be empty")
        return value

    def sampling(self, index: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_tokens,
                      seed=None if self.seed is None else (self.seed + index) % 2**63, stop=stop)
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise _invalid(exc) from None


_UNSUPPORTED = {"logprobs": "null", "suffix": "null", "presence_penalty": "0", "frequency_penalty": "0",
                "logit_bias": "{}"}


def _invalid(exc: ValidationError) -> InvalidRequestError:
    parts, param = [], None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        param = param or loc or None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif loc in _UNSUPPORTED:
            msg = f"not supported by this server (leave it out or send {_UNSUPPORTED[loc]})"
        elif err["type"] == "missing":
            msg = "field required"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return InvalidRequestError("invalid request: " + "; ".join(parts[:5]), param=param)


def _error_body(exc: WikigptError) -> dict:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": None}}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


# ---- metrics ---------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of their own (one per app, so tests can run several)."""

    def __init__(self, engine: Engine) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("wikigpt_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("wikigpt_http_request_duration_seconds", "Time to the last byte", ["route"],
                                 buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.ttft = Histogram("wikigpt_time_to_first_token_seconds", "Time from request to first text",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.generated = Counter("wikigpt_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("wikigpt_prompt_tokens", "Prompt tokens processed", registry=r)
        self.step_batch = Histogram("wikigpt_batch_size", "Sequences per decoding step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        Gauge("wikigpt_queue_depth", "Requests waiting for a batch slot",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("wikigpt_running_sequences", "Sequences in the decoding batch",
              registry=r).set_function(lambda: engine.batch_size)
        engine.on_step = lambda rows, prefill, seconds: self.step_batch.observe(rows)

    def finished(self, streams: list[RequestStream], started: float) -> None:
        firsts = [s.first_token_at for s in streams if s.first_token_at is not None]
        if firsts:
            self.ttft.observe(min(firsts) - started)
        self.generated.inc(sum(s.completion_tokens for s in streams))
        self.prompt.inc(sum(s.prompt_tokens for s in streams))


class _AccessLog:
    """ASGI middleware: one log line and the request metrics per HTTP request (no prompt text)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %d %.3fs", client[0], scope["method"], scope["path"], status[0], seconds)


# ---- app ---------------------------------------------------------------------------------------
def create_app(settings: ServeSettings, engine: Engine) -> FastAPI:
    """The FastAPI app serving `engine`; starts its worker on startup and stops it on shutdown."""
    name = settings.served_model_name or settings.model
    lm = engine.lm
    model_info = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "wikigpt",
                  "context_length": engine.context_length, "n_params": lm.n_params,
                  "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device),
                  "bf16_from_batch": engine.bf16_from_batch or None}
    evaluation = _eval_summary(settings.model)  # the model's measured perplexity, shown by the UI
    metrics = Metrics(engine)
    expected_auth = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s (%d params, context %d) with batches of up to %d", name, lm.n_params,
                 engine.context_length, engine.max_batch_size)
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="wikigpt", version=__version__, lifespan=lifespan,
                  description="Text generation with a GPT-2-family model fine-tuned on WikiText.")
    app.add_middleware(_AccessLog, metrics=metrics)

    def authorize(request: Request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected_auth):
            raise AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    @app.exception_handler(WikigptError)
    async def _typed(request: Request, exc: WikigptError):
        headers = {}
        if isinstance(exc, OverloadedError):
            headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, AuthenticationError):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(_error_body(exc), status_code=exc.http_status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            err: WikigptError = NotFoundError(f"no route {where}; see GET /docs for the routes")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            err = MethodNotAllowedError(f"method {request.method} is not allowed on {request.url.path}"
                                        + (f"; use {allowed}" if allowed else ""))
        else:
            err = InvalidRequestError(str(exc.detail))
            err.http_status = exc.status_code
        return await _typed(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query', 'path'))}: "
                 f"{e.get('msg', 'invalid')}" for e in exc.errors()]
        return await _typed(request, InvalidRequestError("invalid request: " + "; ".join(parts[:5])))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(_error_body(WikigptError("internal server error")), status_code=500)

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = PayloadTooLargeError(f"the request body is larger than {limit} bytes (--max-body-bytes)")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_big
        if not raw.strip():
            raise InvalidRequestError('the request body is empty: send a JSON object such as {"text": "Data Science is"}')
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"the request body is not valid UTF-8 (bad byte at offset {exc.start})") from None
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"the request body is not valid JSON: {exc.msg} "
                                      f"(line {exc.lineno}, column {exc.colno})") from None
        except ValueError as exc:
            raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
            raise InvalidRequestError(f"the request body must be a JSON object, not {kind}")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise _invalid(exc) from None

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise ModelNotFoundError(f"model '{requested}' is not served here; this server serves '{name}' "
                                     "(GET /v1/models)", param="model")

    def submit_all(jobs: list[tuple[str | list[int], SamplingParams]], ignore_eos: bool,
                   max_tokens_name: str) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for prompt, params in jobs:
                streams.append(engine.submit(prompt, params, ignore_eos=ignore_eos, max_tokens_name=max_tokens_name))
        except OverloadedError as exc:
            exc.retry_after = settings.retry_after
            for s in streams:
                s.cancel()
            raise
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams

    async def collect(request: Request, streams: list[RequestStream]) -> list[str] | None:
        """Texts of all streams; None (and the streams cancelled) if the client goes away first."""
        task = asyncio.ensure_future(asyncio.gather(*(s.text() for s in streams)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    return None
        finally:
            task.cancel()
            for s in streams:
                if s.finish_reason is None:  # disconnected, or a sibling failed: free their slots
                    s.cancel()

    # ---- health (no authentication) -----------------------------------------------------
    @app.get("/")
    async def root() -> dict:
        return {"status": "ok", "model": name, "ready": engine.ready.is_set(), "version": __version__,
                "context_length": engine.context_length, "n_params": lm.n_params,
                "dtype": model_info["dtype"], "bf16_from_batch": model_info["bf16_from_batch"],
                "device": model_info["device"],
                "max_batch_size": engine.max_batch_size, "eval": evaluation,
                "routes": ["/predict", "/v1/completions", "/v1/models", "/metrics", "/health", "/ready"]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        if not engine.ready.is_set():
            raise NotReadyError("the model is still loading", retry_after=settings.retry_after)
        return {"status": "ready", "model": name}

    # ---- everything else needs the API key, when one is set ------------------------------
    guarded = [Depends(authorize)]

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> dict:
        return {"object": "list", "data": [model_info]}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def get_model(model_id: str) -> dict:
        check_model(model_id)
        return model_info

    @app.post("/predict", dependencies=guarded)
    async def predict(request: Request):
        """The original contract: `{"text": "Data Science is"}` -> `{"predictions": text + continuation}`."""
        started = time.perf_counter()
        req: PredictRequest = await read_body(request, PredictRequest)
        params = SamplingParams(**req.model_dump(exclude={"text"}))
        streams = submit_all([(req.text, params)], False, "max_new_tokens")
        try:
            texts = await collect(request, streams)
        finally:
            metrics.finished(streams, started)
        if texts is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        text = texts[0]
        s = streams[0]
        return {"predictions": req.text + text, "model": name, "finish_reason": s.finish_reason,
                "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                          "total_tokens": s.prompt_tokens + s.completion_tokens}}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        started = time.perf_counter()
        req: CompletionRequest = await read_body(request, CompletionRequest)
        check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequestError("best_of is not supported (leave it out or set it equal to n)", param="best_of")
        prompts = _prompt_list(req.prompt)
        jobs = [(p, req.sampling(i * req.n + j)) for i, p in enumerate(prompts) for j in range(req.n)]
        if len(jobs) > engine.max_batch_size:
            raise InvalidRequestError(f"the request asks for {len(jobs)} completions (prompts x n); this "
                                      f"server generates at most {engine.max_batch_size} per request", param="n")
        streams = submit_all(jobs, req.ignore_eos, "max_tokens")
        echoes = [(p if isinstance(p, str) else engine.tokenizer.decode(p)) if req.echo else "" for p in prompts]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(s.prompt_tokens for s in streams[::req.n])

        def usage() -> dict:
            done = sum(s.completion_tokens for s in streams)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        def chunk(choices: list[dict]) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices}

        if not req.stream:
            try:
                texts = await collect(request, streams)
            finally:
                metrics.finished(streams, started)
            if texts is None:
                return Response(status_code=499)
            choices = [{"index": i, "text": echoes[i // req.n] + t, "logprobs": None,
                        "finish_reason": streams[i].finish_reason} for i, t in enumerate(texts)]
            return {**chunk(choices), "usage": usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            try:
                for i in range(len(streams)):
                    if echoes[i // req.n]:
                        yield _sse(chunk([{"index": i, "text": echoes[i // req.n], "logprobs": None,
                                           "finish_reason": None}]))
                async for i, c in _merge(streams):
                    yield _sse(chunk([{"index": i, "text": c.text, "logprobs": None,
                                       "finish_reason": c.finish_reason}]))
                if include_usage:
                    yield _sse({**chunk([]), "usage": usage()})
            except WikigptError as exc:
                yield _sse(_error_body(exc))
            finally:
                for s in streams:
                    s.cancel()
                metrics.finished(streams, started)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _eval_summary(model: str) -> dict | None:
    """The latest measurement in MODEL_DIR/eval_report.json (written by `wikigpt evaluate`), if any."""
    from .evaluate import read_eval_report

    report = read_eval_report(model) if os.path.isdir(model) else None
    latest = report.get("latest") if isinstance(report, dict) else None
    if not isinstance(latest, dict):
        return None
    keys = ("perplexity", "word_perplexity", "bits_per_byte", "data", "split", "n_tokens", "complete", "measured_at")
    # JSON has no NaN (a text without words has no word perplexity): such values are left out.
    return {k: latest[k] for k in keys if k in latest and not (isinstance(latest[k], float) and not math.isfinite(latest[k]))}


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Chunks of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for c in streams[0]:
            yield 0, c
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for c in s:
                await queue.put((i, c))
        except Exception as exc:
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
