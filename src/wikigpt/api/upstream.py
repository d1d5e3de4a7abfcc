"""An `EngineClient` that forwards completions to an OpenAI-compatible server (`serve --upstream`).

Each completion (one per prompt and per `n`) is one `POST /v1/completions` to the upstream, with
every sampling field filled in by us (our decoding defaults, not the upstream's) and our stop
strings, so the upstream stops where we would. Its text passes through our `ContinuationFilter`,
as the in-process engine's does.

The upstream streams only when our client does. A streamed answer is one SSE event per token:
the upstream's API server serializes a JSON event and we parse one, per token, so 32 clients x 64
tokens cost 2,048 events serialized there and parsed here instead of 32 answers, CPU taken from the upstream's engine
where they share a machine (on 2 cores, relaying every answer as a stream kept ~82 % of vLLM's
tokens/s). A client that reads its answer whole (`/predict`, `/v1/completions` without `stream`)
gets one non-streamed upstream answer instead: its whole text fed to the filter at once (the
same text as fed piece by piece), usage and finish_reason from the same JSON. A streamed answer
asks for `stream_options.include_usage`, its token counts in a last event.

Cancelling a completion closes its upstream connection, streamed or not, which is how vLLM learns
to abort the request. The read timeout bounds each gap between events of a stream, and a whole
non-streamed answer (nothing arrives before its end).

Failures are typed (errors.py): the upstream's 4xx is ours with its message; unreachable, cut
off mid-answer or a 5xx is 503/502 naming the upstream; no answer within the read timeout 504.
Readiness follows the upstream: a watcher polls its `/v1/models` and any connection failure
clears `ready` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass

import httpx

from ..errors import (NotReadyError, OverloadedError, ShuttingDownError, UpstreamError, UpstreamRejectedError,
                      UpstreamTimeoutError, WikigptError)
from ..decoding import KNOBS, SamplingParams
from ..outputs import Backlog, Chunk, ChunkStream, ServedModel, parse_logprobs
from ..settings import ServeSettings
from ..textfilter import ContinuationFilter
from .chat import render as render_chat
from .logprobs import split_echo

log = logging.getLogger("wikigpt.upstream")
POLL_SECONDS = 2.0  # how stale /ready may be when the upstream goes away between requests


@dataclass
class UpstreamModel:
    name: str
    n_params: int | None = None
    device: str = "upstream"
    dtype: str = ""
    quantization: str | None = None  # as the upstream reports it (a wikigpt upstream does)


class UpstreamClient:
    def __init__(self, settings: ServeSettings) -> None:
        self.url = settings.upstream
        self.headers = {"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
        self.wanted = settings.model if "model" in settings.model_fields_set else None
        self.timeout = httpx.Timeout(settings.upstream_read_timeout, connect=settings.upstream_connect_timeout)
        self.max_batch_size = settings.max_batch_size
        self.max_in_flight = settings.max_batch_size + settings.queue_size
        self.stream_backlog = settings.stream_backlog
        self.context_length: int | None = None
        self.lm = UpstreamModel(self.wanted or "")
        self.root: str | None = None  # the upstream's `root` (where its model came from), once known
        self.llama_cpp = False  # llama.cpp's server (its card has `meta`): its own sampling names
        self.ready = threading.Event()
        self.not_ready_reason = f"the upstream {self.url} has not answered yet"
        self._observer = None  # engine_client.Observer: told of every forwarded completion
        self.in_flight = 0
        self.streams: set[UpstreamStream] = set()  # in flight: ended with ShuttingDownError by stop()
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: asyncio.Task | None = None

    # ---- EngineClient -----------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return 0  # requests queue at the upstream

    @property
    def batch_size(self) -> int:
        return self.in_flight

    def stats(self) -> dict:
        return {"queue_depth": self.queue_depth, "running": self.batch_size}

    def observe(self, observer) -> None:
        self._observer = observer

    def model(self) -> ServedModel:
        return ServedModel(self.lm.name, self.root, self.lm.n_params, self.context_length, self.max_batch_size)

    def info(self) -> dict:
        return {"upstream": self.url, "device": f"upstream {self.url}", "dtype": self.lm.dtype,
                "quantization": self.lm.quantization}

    def render_chat(self, messages: list[dict]) -> tuple[str, list[str]]:
        return render_chat(messages, None)  # no tokenizer here, so no template: the transcript

    def decode_prompt(self, ids: list[int]) -> None:
        return None

    def start(self) -> UpstreamClient:
        """Call on the event loop (the app's lifespan does)."""
        self._loop = asyncio.get_running_loop()
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout,
                                       limits=httpx.Limits(max_connections=self.max_in_flight + 4))
        self._watcher = self._loop.create_task(self._watch())
        return self

    def stop(self) -> None:
        """Call from another thread (the lifespan and the SIGTERM drain run it in one): ends
        every completion still in flight with ShuttingDownError, then closes the connections."""
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)

    def submit(self, prompt: str | list[int], params: SamplingParams, *, ignore_eos: bool = False,
               logprobs: int | None = None, echo: bool = False,
               score_only: bool = False, stream: bool = True) -> UpstreamStream:
        """`stream=False`: nobody reads the text piece by piece, so ask for one JSON answer."""
        if not self.lm.name:
            raise NotReadyError(self.not_ready_reason, retry_after=5)
        if self.in_flight >= self.max_in_flight:
            raise OverloadedError(f"the server is busy: {self.in_flight} requests are in flight to the "
                                  f"upstream (--max-batch-size + --queue-size); retry shortly")
        knobs = {(KNOBS[k].llama_cpp if self.llama_cpp else k): v for k, v in params.knobs().items()}
        body = {"model": self.lm.name, "prompt": prompt, "max_tokens": params.max_new_tokens, **knobs,
                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}  # token counts in a last event
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        if ignore_eos:
            body["ignore_eos"] = True
        if logprobs is not None or score_only:  # OpenAI's fields: vLLM answers them as we do
            body.update(logprobs=logprobs or 0, echo=echo or score_only)
        if score_only:
            body["max_tokens"] = 0
        return UpstreamStream(self, body, params.stop)

    async def tokenize(self, text: str, add_special_tokens: bool = True,
                       with_strings: bool = False) -> tuple[list[int], list[str] | None]:
        """The upstream's own /tokenize (vLLM's route; another wikigpt serve has it too)."""
        answer = await self._relay_json("/tokenize", {"model": self.lm.name, "prompt": text,
                                                      "add_special_tokens": add_special_tokens,
                                                      "return_token_strs": with_strings})
        return list(answer["tokens"]), answer.get("token_strs") if with_strings else None

    async def detokenize(self, ids: list[int]) -> str:
        return str((await self._relay_json("/detokenize", {"model": self.lm.name, "tokens": ids}))["prompt"])

    async def _relay_json(self, path: str, body: dict) -> dict:
        if not self.lm.name:
            raise NotReadyError(self.not_ready_reason, retry_after=5)
        try:
            r = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if r.status_code >= 400:
            raise self._status_error(r.status_code, r.content)
        try:
            return r.json()
        except ValueError:
            raise UpstreamError(f"the upstream {self.url} sent an answer to {path} this server cannot read") from None

    # ---- readiness ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            try:
                self._adopt(await self._models())
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with its reason
                self.down(str(exc.message if isinstance(exc, WikigptError) else exc))
            await asyncio.sleep(POLL_SECONDS)

    async def _models(self) -> list[dict]:
        try:
            r = await self._http.get("/v1/models", timeout=min(10.0, self.timeout.read))
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.content)
        return [m for m in r.json().get("data", []) if isinstance(m, dict) and m.get("id")]

    def _adopt(self, models: list[dict]) -> None:
        ids = [m["id"] for m in models]
        card = next((m for m in models if m["id"] == (self.wanted or (ids[0] if ids else None))), None)
        if card is None:
            self.down(f"the upstream {self.url} serves {ids or 'no model'}, not '{self.wanted}' (--model)")
            return
        self.lm.name, self.lm.dtype = card["id"], str(card.get("dtype") or "")
        meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}  # llama.cpp's server: its own card
        self.llama_cpp = bool(meta)
        self.lm.n_params, self.lm.quantization = card.get("n_params") or meta.get("n_params"), card.get("quantization")
        self.root = card.get("root") or card["id"]
        self.context_length = card.get("max_model_len") or card.get("context_length") or meta.get("n_ctx")
        if not self.ready.is_set():
            log.info("upstream %s ready: serving %s (context %s)", self.url, self.lm.name, self.context_length)
        self.ready.set()

    def down(self, reason: str) -> None:
        if self.ready.is_set():
            log.warning("upstream not ready: %s", reason)
        self.not_ready_reason = reason
        self.ready.clear()

    async def _close(self) -> None:
        for s in list(self.streams):
            s.abort(ShuttingDownError("the server is shutting down: the request was ended before it finished",
                                      retry_after=5))
        if self._watcher is not None:
            self._watcher.cancel()
        if self._http is not None:
            await self._http.aclose()

    # ---- errors ---------------------------------------------------------------------------------
    def _transport_error(self, exc: httpx.HTTPError) -> WikigptError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return UpstreamTimeoutError(f"the upstream {self.url} did not answer within "
                                        f"{self.timeout.read:g} s (--upstream-read-timeout)")
        what = "is unreachable" if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) else "broke off its answer"
        err = UpstreamError(f"the upstream {self.url} {what} ({type(exc).__name__}: {exc or 'no detail'})")
        self.down(err.message)
        return err

    def _status_error(self, status: int, content: bytes) -> WikigptError:
        message, param = _error_message(content)
        if status in (429, 503):
            return OverloadedError(f"the upstream {self.url} is busy: {message}")
        if status in (401, 403):
            err = UpstreamError(f"the upstream {self.url} refused our credentials (--upstream-api-key): {message}")
        elif 400 <= status < 500:
            return UpstreamRejectedError(message, status=status, param=param)
        else:
            err = UpstreamError(f"the upstream {self.url} failed ({status}): {message}")
        err.http_status = 502
        return err


class UpstreamStream(ChunkStream):
    """One forwarded completion; the same surface as the engine's RequestStream, plus `opened()`."""

    def __init__(self, client: UpstreamClient, body: dict, stop: list[str]) -> None:
        super().__init__(Backlog(client.stream_backlog))
        self._client, self._body = client, body
        self._filter, self._reason = ContinuationFilter(stop), None
        self._pieces, self._counted = 0, 0  # text pieces seen; the upstream's own count (usage)
        self._cached = 0  # usage.prompt_tokens_details.cached_tokens (vLLM's prefix cache)
        self._scores, self._prompt_scores, self._echoed = [], None, not body.get("echo")
        self._opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run())

    async def opened(self) -> None:
        """Returns once the upstream's first event arrived (a refusal can come as an event after
        its 200); raises the upstream's refusal as our error."""
        await asyncio.shield(self._opened)

    def cancel(self) -> None:
        self._task.cancel()  # leaves the request (or `async with stream(...)`): the connection closes
        if not self._opened.done():
            self._opened.cancel()

    def abort(self, exc: WikigptError) -> None:
        """End the completion with `exc` (its reader gets it as the last item) and close its request."""
        if not self._opened.done():
            self._opened.set_exception(exc)
            self._opened.exception()
        self._out.offer(exc)
        self._task.cancel()

    async def _run(self) -> None:
        c, started, outcome = self._client, time.perf_counter(), "ok"
        c.in_flight += 1  # here, not in __init__: a task cancelled before it starts never runs its finally
        c.streams.add(self)
        try:
            if self._body["stream"]:
                async with c._http.stream("POST", "/v1/completions", json=self._body) as r:
                    if r.status_code >= 400:
                        raise c._status_error(r.status_code, await r.aread())
                    await self._relay(r)
            else:
                r = await c._http.post("/v1/completions", json=self._body)
                if r.status_code >= 400:
                    raise c._status_error(r.status_code, r.content)
                if not self._take(r.json()):  # the whole text fed at once, then the filter's rest
                    self._finish()
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - every failure reaches the client as a typed error
            if isinstance(exc, httpx.HTTPError):
                exc = c._transport_error(exc)
            elif not isinstance(exc, WikigptError):
                log.exception("forwarding to the upstream failed")
                exc = UpstreamError(f"the upstream {c.url} sent an answer this server cannot read")
            outcome = "error"
            if not self._opened.done():
                self._opened.set_exception(exc)
                self._opened.exception()  # retrieved: no "never retrieved" warning if nobody awaits it
            self._out.offer(exc)
        finally:
            c.in_flight -= 1
            c.streams.discard(self)
            if c._observer is not None:
                c._observer.on_upstream(time.perf_counter() - started, outcome)

    async def _relay(self, r: httpx.Response) -> None:
        """Upstream SSE -> our chunks, event by event; the finish comes after the usage event."""
        async for line in r.aiter_lines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if data == "[DONE]":
                break
            if data and self._take(json.loads(data)):
                return
        self._finish()

    def _take(self, answer: dict) -> bool:
        """One streamed event, or the whole non-streamed answer: its choice's text through our
        filter as chunks. True once one of our stop strings ended the completion. Token scores
        ride on the next chunk out; an echoed prompt's text is the serving layer's."""
        if "error" in answer:  # vLLM refuses some bad prompts this way, after its 200
            raw, err = json.dumps(answer).encode(), answer["error"]
            code = err.get("code") if isinstance(err, dict) else None
            if not self._opened.done() and isinstance(code, int) and 400 <= code < 500:
                raise self._client._status_error(code, raw)
            raise UpstreamError(f"the upstream {self._client.url} failed mid-answer: {_error_message(raw)[0]}")
        if not self._opened.done():
            self._opened.set_result(None)
        if usage := answer.get("usage"):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self._counted = int(usage.get("completion_tokens") or 0)
            self._cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        for choice in answer.get("choices") or ():
            text, new = choice.get("text") or "", parse_logprobs(choice.get("logprobs"))
            if not self._echoed:
                self._echoed = True
                offsets = (choice.get("logprobs") or {}).get("text_offset")
                self._prompt_scores, text, new = split_echo(self._body["prompt"], text, new, offsets)
            self._scores += new
            self._pieces += 1 if text else 0
            out = self._filter.feed(text)
            self._reason = choice.get("finish_reason") or self._reason
            if self._filter.done:  # one of our stop strings: done here, whatever the upstream does
                self._put(out, "stop")
                return True
            if out:
                self._put(out, None)
        return False

    def _finish(self) -> None:
        if self._reason is None:
            raise UpstreamError(f"the upstream {self._client.url} ended its answer without a finish_reason")
        self._put(self._filter.finish(), self._reason)

    def _put(self, text: str, finish: str | None) -> None:
        if not self._out.offer(Chunk(text, finish, self.prompt_tokens, self._counted or self._pieces,
                                     self._scores, self._prompt_scores, self._cached)):
            raise asyncio.CancelledError  # the reader fell --stream-backlog behind: close the upstream request
        self._scores, self._prompt_scores = [], None


def _error_message(content: bytes) -> tuple[str, str | None]:
    """Message and param of an OpenAI-style error body, else the body's first 300 characters."""
    text = content.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or "no message").strip(), err.get("param")
    detail = (err or body.get("detail")) if isinstance(body, dict) else None
    return str(detail or text[:300] or "no message").strip(), None
