"""Running the app: uvicorn, with a drain on SIGTERM instead of uvicorn's plain stop.

uvicorn on SIGTERM closes its listening socket at once (new clients get "connection refused",
which a load balancer reads as a crash), waits `timeout_graceful_shutdown` for open
connections, cancels what is left mid-answer, then re-raises the signal, so the process exits
143. Here the first SIGTERM or SIGINT starts a drain instead:

1. new requests get 503 with Retry-After in the usual error JSON (`/health` stays 200: the
   process is alive; `/metrics` keeps answering, so the drain itself can be watched), so
   clients and balancers go elsewhere;
2. requests in flight finish, for up to --shutdown-grace seconds;
3. those still running then end cleanly: the engine (or the upstream relay) stops, which
   gives each a `ShuttingDownError`: an error event and `[DONE]` for a stream, a 503 for a
   whole answer; nothing is cut off mid-event;
4. uvicorn's own shutdown runs (listener closed, lifespan shutdown) and the process exits 0.

A second signal stops at once, as uvicorn's does.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from fastapi.responses import JSONResponse

from ..errors import ShuttingDownError
from .protocol import error_body

log = logging.getLogger("wikigpt.api")
# After the grace period the aborted requests still need their last event written; a client that
# stopped reading never takes it, so the drain gives up on those after this many seconds more.
ABORT_SECONDS = 3.0
STILL_SERVED = frozenset({"/health", "/metrics"})  # while draining: liveness and monitoring


class Drain:
    """Shutdown state shared by the server (which starts the drain) and the app (which counts
    requests in flight and refuses new ones while it drains)."""

    def __init__(self, grace: float, retry_after: int = 5) -> None:
        self.grace, self.retry_after = grace, retry_after
        self.in_flight = 0
        self.since: float | None = None  # time.monotonic() of the signal

    @property
    def draining(self) -> bool:
        return self.since is not None


class DrainGuard:
    """ASGI middleware: counts HTTP requests in flight, and answers 503 while draining."""

    def __init__(self, app, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining and scope["path"] not in STILL_SERVED:
            err = ShuttingDownError("the server is shutting down; send the request to another instance or "
                                    "retry once it is back", retry_after=self.drain.retry_after)
            response = JSONResponse(error_body(err), status_code=err.http_status,
                                    headers={"Retry-After": str(err.retry_after), "Connection": "close"})
            return await response(scope, receive, send)
        self.drain.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class Server(uvicorn.Server):
    """uvicorn's server with the drain above. `abort` (run in a thread) ends every request
    still in flight with a ShuttingDownError: the engine client's `stop`."""

    def __init__(self, config: uvicorn.Config, drain: Drain, abort) -> None:
        super().__init__(config)
        self.drain, self.abort = drain, abort
        self._aborted_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        log.info("signal %d: draining; %d request(s) in flight get up to %g s (--shutdown-grace)",
                 sig, self.drain.in_flight, self.drain.grace)
        self.drain.since = time.monotonic()
        # not appended to self._captured_signals: uvicorn would re-raise it at exit (status 143)

    async def on_tick(self, counter: int) -> bool:
        d = self.drain
        if d.draining and not self.should_exit:
            now = time.monotonic()
            if d.in_flight == 0:
                self.should_exit = True
            elif self._aborted_at is None and now - d.since >= d.grace:
                log.warning("grace period over: ending %d request(s) still in flight", d.in_flight)
                self._aborted_at = now
                await asyncio.to_thread(self.abort)
            elif self._aborted_at is not None and now - self._aborted_at > ABORT_SECONDS:
                log.warning("%d connection(s) did not take their last event; closing", d.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app, host: str, port: int, log_level: str, sockets=None) -> None:
    """Run `app` (from create_app) until a signal has drained it."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            server_header=False, timeout_graceful_shutdown=ABORT_SECONDS)
    Server(config, app.state.drain, app.state.serving.client.stop).run(sockets=sockets)
