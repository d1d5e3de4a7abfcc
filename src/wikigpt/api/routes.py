"""The routes: thin, each hands its request to the app's `Serving`.

`GET /` (health with model facts, the original's health URL), `GET /health` (live), `GET /ready`
(503 until requests can be served), `POST /predict` (the original contract), `POST
/v1/completions`, `POST /v1/chat/completions` and `GET /v1/models` (OpenAI-compatible), `POST
/tokenize` and `POST /detokenize` (vLLM's), `GET /metrics` (Prometheus). The API key, when set,
guards every route but the first three (app.py's `ApiKeyGuard`).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import NotReadyError
from .serving import Serving


async def serving(request: Request) -> Serving:
    """Async, so FastAPI calls it on the event loop: a plain `def` dependency runs in its thread
    pool, a thread hop per request and up to 40 threads that come and go with the load."""
    return request.app.state.serving


async def root(s: Serving = Depends(serving)) -> dict:
    return s.health()


async def health() -> dict:
    return {"status": "ok"}


async def ready(s: Serving = Depends(serving)) -> dict:
    if not s.client.ready.is_set():
        raise NotReadyError(s.client.not_ready_reason, retry_after=s.settings.retry_after)
    return {"status": "ready", "model": s.name}


async def metrics(s: Serving = Depends(serving)) -> Response:
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def list_models(s: Serving = Depends(serving)) -> dict:
    return {"object": "list", "data": [s.model_card()]}


async def get_model(model_id: str, s: Serving = Depends(serving)) -> dict:
    s.check_model(model_id)
    return s.model_card()


async def predict(request: Request, s: Serving = Depends(serving)):
    """The original contract: `{"text": "Data Science is"}` -> `{"predictions": text + continuation}`."""
    return await s.predict(request)


async def completions(request: Request, s: Serving = Depends(serving)):
    """OpenAI's completions: `prompt`, sampling fields, `n`, `echo`, `stream` (server-sent events)."""
    return await s.completions(request)


async def chat_completions(request: Request, s: Serving = Depends(serving)):
    """OpenAI's chat completions for a base model (api/chat.py: the prompt a conversation becomes)."""
    return await s.chat_completions(request)


async def tokenize(request: Request, s: Serving = Depends(serving)) -> dict:
    """vLLM's tokenizer route: `{"prompt": "..."}` -> `{"count", "max_model_len", "tokens", "token_strs"}`."""
    return await s.tokenize(request)


async def detokenize(request: Request, s: Serving = Depends(serving)) -> dict:
    """vLLM's: `{"tokens": [ids]}` -> `{"prompt": text}`."""
    return await s.detokenize(request)


def add_routes(app: FastAPI) -> None:
    """Registered on the app itself (not through an APIRouter), so `app.routes` lists them all."""
    for method, path, endpoint in (("GET", "/", root), ("GET", "/health", health), ("GET", "/ready", ready),
                                   ("GET", "/metrics", metrics), ("GET", "/v1/models", list_models),
                                   ("GET", "/v1/models/{model_id:path}", get_model),
                                   ("POST", "/predict", predict), ("POST", "/v1/completions", completions),
                                   ("POST", "/v1/chat/completions", chat_completions),
                                   ("POST", "/tokenize", tokenize), ("POST", "/detokenize", detokenize)):
        app.add_api_route(path, endpoint, methods=[method])
