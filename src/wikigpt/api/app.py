"""App wiring: the FastAPI app, its lifespan, the API-key guard and the one error handler chain."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..evalreport import eval_summary
from ..errors import (AuthenticationError, InvalidRequestError, MethodNotAllowedError, NotFoundError,
                      OverloadedError, WikigptError)
from ..settings import ServeSettings
from .engine_client import EngineClient
from .metrics import AccessLog, Metrics
from .protocol import error_body, invalid
from .routes import add_routes
from .server import Drain, DrainGuard
from .serving import Serving

log = logging.getLogger("wikigpt.api")
OPEN_PATHS = frozenset({"/", "/health", "/ready"})  # health checks: no API key


def create_app(settings: ServeSettings, client: EngineClient) -> FastAPI:
    """The FastAPI app serving `client`; starts it on startup and stops it on shutdown."""
    metrics = Metrics(client)
    # the model's measured perplexity (MODEL_DIR/eval_report.json), shown by the UI; none upstream
    serving = Serving(settings, client, metrics, None if settings.upstream else eval_summary(settings.model))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client.start()
        m = client.model()
        log.info("serving %s (context %s) with batches of up to %d", serving.name, m.context_length, m.max_batch_size)
        yield
        await asyncio.to_thread(client.stop)

    app = FastAPI(title="wikigpt", version=__version__, lifespan=lifespan,
                  description="Text generation with a GPT-2-family model fine-tuned on WikiText.")
    app.state.serving = serving
    app.state.drain = Drain(settings.shutdown_grace)
    add_routes(app)
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, key=settings.api_key)
    app.add_middleware(DrainGuard, drain=app.state.drain)  # counts requests in flight; 503 once draining
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: refused requests are logged too
    _add_error_handlers(app)
    return app


class ApiKeyGuard:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer <key>`, including
    FastAPI's own /docs, /redoc and /openapi.json and paths that match no route."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer <key>'")
                response = JSONResponse(error_body(err), status_code=err.http_status,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as OpenAI's error JSON with the status errors.py assigns; never a traceback."""

    @app.exception_handler(WikigptError)
    async def typed(request: Request, exc: WikigptError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverloadedError) else {}
        return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException):
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
        return await typed(request, err)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        return await typed(request, invalid(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(WikigptError("internal server error")), status_code=500)

