"""The HTTP API, split as vLLM's entrypoints are: `protocol` (request/response schemas),
`engine_client` (the one engine interface, `EngineClient`), `serving` (request -> engine calls
-> JSON or server-sent events), `routes` (thin), `metrics` (Prometheus, access log), `app`
(wiring, API key, errors), `chat` (messages -> prompt) and `upstream` (an `EngineClient` that
forwards to an OpenAI-compatible server).

Imported lazily: the engine uses `chat` without loading FastAPI.
"""

__all__ = ["EngineClient", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "EngineClient":
        from .engine_client import EngineClient

        return EngineClient
    raise AttributeError(name)
