"""The HTTP API, split as vLLM's entrypoints are: `protocol` (request/response schemas),
`client` (the one engine interface, `EngineClient`), `serving` (request -> engine calls ->
JSON or server-sent events), `routes` (thin), `metrics` (Prometheus, access log), `app`
(wiring, API key, errors) and `upstream` (an `EngineClient` that forwards to an
OpenAI-compatible server)."""

from .app import create_app
from .client import EngineClient

__all__ = ["EngineClient", "create_app"]
