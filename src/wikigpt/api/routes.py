"""The routes: thin, each hands its request to the app's `Serving`.

`GET /` (health with model facts, the original's health URL), `GET /health` (live), `GET /ready`
(503 until requests can be served), `POST /predict` (the original contract), `POST
/v1/completions` and `GET /v1/models` (OpenAI-compatible), `GET /metrics` (Prometheus). The API
key, when set, guards every route but the first three (app.py's `ApiKeyGuard`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import NotReadyError
from .serving import Serving

router = APIRouter()


def serving(request: Request) -> Serving:
    return request.app.state.serving


@router.get("/")
async def root(s: Serving = Depends(serving)) -> dict:
    return s.health()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(s: Serving = Depends(serving)) -> dict:
    if not s.client.ready.is_set():
        reason = getattr(s.client, "not_ready_reason", None) or "the model is still loading"
        raise NotReadyError(reason, retry_after=s.settings.retry_after)
    return {"status": "ready", "model": s.name}


@router.get("/metrics")
async def metrics(s: Serving = Depends(serving)) -> Response:
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(s: Serving = Depends(serving)) -> dict:
    return {"object": "list", "data": [s.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, s: Serving = Depends(serving)) -> dict:
    s.check_model(model_id)
    return s.model_card()


@router.post("/predict")
async def predict(request: Request, s: Serving = Depends(serving)):
    """The original contract: `{"text": "Data Science is"}` -> `{"predictions": text + continuation}`."""
    return await s.predict(request)


@router.post("/v1/completions")
async def completions(request: Request, s: Serving = Depends(serving)):
    """OpenAI's completions: `prompt`, sampling fields, `n`, `echo`, `stream` (server-sent events)."""
    return await s.completions(request)
