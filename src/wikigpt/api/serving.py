"""Serving logic: a parsed request becomes engine calls, their output a JSON answer or SSE.

One `Serving` per app, shared by the routes. It knows nothing of which engine it drives (the
in-process one or an upstream server): it talks to an `EngineClient`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .. import __version__
from ..decoding import SamplingParams
from ..errors import EngineError, InvalidRequestError, ModelNotFoundError, OverloadedError, WikigptError
from ..settings import ServeSettings
from .chat import AssistantText, chat_logprobs
from .engine_client import CompletionStream, EngineClient
from .logprobs import echo_of, logprobs_object, prompt_scores
from .metrics import Metrics
from .protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, PredictRequest, TokenizeRequest, error_body,
                       read_body)

log = logging.getLogger("wikigpt.api")
ROUTES = ["/predict", "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
          "/metrics", "/health", "/ready"]
Job = tuple[str | list[int], SamplingParams]


class Serving:
    def __init__(self, settings: ServeSettings, client: EngineClient, metrics: Metrics,
                 evaluation: dict | None = None) -> None:
        self.settings, self.client, self.metrics, self.evaluation = settings, client, metrics, evaluation
        self.created = int(time.time())

    # ---- facts ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The model name clients see and send (upstream: known once the upstream answered)."""
        return self.settings.served_model_name or self.client.model().name

    def model_card(self) -> dict:
        """vLLM's model card (`root`: where the model came from; `max_model_len`) plus our facts."""
        m = self.client.model()
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "wikigpt",
                "root": m.root or self.name, "parent": None, "max_model_len": m.context_length,
                "context_length": m.context_length, "n_params": m.n_params, **self.client.info()}

    def health(self) -> dict:
        c, m = self.client, self.client.model()
        return {"status": "ok", "model": self.name, "ready": c.ready.is_set(), "version": __version__,
                "context_length": m.context_length, "n_params": m.n_params, **c.info(),
                "max_batch_size": m.max_batch_size, "eval": self.evaluation, "routes": ROUTES}

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise ModelNotFoundError(f"model '{requested}' is not served here; this server serves "
                                     f"'{self.name}' (GET /v1/models)", param="model")

    # ---- routes' work -----------------------------------------------------------------------
    async def predict(self, request: Request) -> Any:
        """The original contract: `{"text": "Data Science is"}` -> `{"predictions": text + continuation}`."""
        started = time.perf_counter()
        req = await read_body(request, PredictRequest, self.settings.max_body_bytes)
        try:
            streams = self._submit([(req.text, req.sampling())], False, streamed=False)
            outs = await self._collect(request, streams, started)
        except WikigptError as exc:  # refusals name OpenAI's max_tokens; this route takes max_new_tokens
            exc.message = re.sub(r"\bmax_tokens\b", "max_new_tokens", exc.message)
            raise
        if outs is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        s = streams[0]
        return {"predictions": req.text + outs[0].text, "model": self.name, "finish_reason": s.finish_reason,
                "usage": _usage(streams, 1)}

    async def completions(self, request: Request) -> Any:
        started = time.perf_counter()
        req = await read_body(request, CompletionRequest, self.settings.max_body_bytes)
        self.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequestError("best_of is not supported (leave it out or set it equal to n)", param="best_of")
        prompts, n = req.prompts, req.n
        scoring, scored = _scoring(req), req.logprobs is not None
        jobs = [(p, req.sampling(i * n + j)) for i, p in enumerate(prompts) for j in range(n)]
        self._check_count(len(jobs))
        echoes = [self._echo(p, scored) if req.echo else "" for p in prompts for _ in range(n)]
        streams = self._submit(jobs, req.ignore_eos, streamed=req.stream, **scoring)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if not req.stream:
            outs = await self._collect(request, streams, started)
            if outs is None:
                return Response(status_code=499)
            choices = []
            for i, o in enumerate(outs):
                echo, lp = echoes[i], None
                if scored:
                    echo, lp, _ = _scored(echo, o.prompt_logprobs, o.logprobs, 0)
                choices.append(_choice(i, echo + o.text, streams[i].finish_reason, lp))
            return {**head, "choices": choices, "usage": _usage(streams, n)}
        payloads = _completion_events(streams, head, echoes, scored)
        return await self._stream(streams, payloads, head if _wants_usage(req) else None, n, started)

    async def chat_completions(self, request: Request) -> Any:
        """OpenAI's chat completions for a base model: the messages rendered into a prompt
        (chat.py: the model's template, else a plain transcript), its continuation the reply."""
        started = time.perf_counter()
        req = await read_body(request, ChatRequest, self.settings.max_body_bytes)
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        self._check_count(req.n)
        prompt, stops = self.client.render_chat([m.model_dump() for m in req.messages])
        top_n = (req.top_logprobs or 0) if req.logprobs else None  # alternatives per token; None: no scores
        scoring = {} if top_n is None else {"logprobs": top_n}
        jobs = [(prompt, req.sampling(j, stops)) for j in range(req.n)]
        streams = self._submit(jobs, req.ignore_eos, streamed=req.stream, **scoring)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name}
        if not req.stream:
            outs = await self._collect(request, streams, started)
            if outs is None:
                return Response(status_code=499)
            choices = [{"index": i, "message": {"role": "assistant", "content": AssistantText()(o.text)},
                        "logprobs": None if top_n is None else chat_logprobs(o.logprobs, top_n),
                        "finish_reason": streams[i].finish_reason} for i, o in enumerate(outs)]
            return {**head, "choices": choices, "usage": _usage(streams, req.n)}
        head["object"] = "chat.completion.chunk"
        payloads = _chat_events(streams, head, top_n)
        return await self._stream(streams, payloads, head if _wants_usage(req) else None, req.n, started)

    async def tokenize(self, request: Request) -> dict:
        req = await read_body(request, TokenizeRequest, self.settings.max_body_bytes)
        self.check_model(req.model)
        ids, strings = await self.client.tokenize(req.prompt, req.add_special_tokens, req.return_token_strs)
        return {"count": len(ids), "max_model_len": self.client.model().context_length, "tokens": ids, "token_strs": strings}

    async def detokenize(self, request: Request) -> dict:
        req = await read_body(request, DetokenizeRequest, self.settings.max_body_bytes)
        self.check_model(req.model)
        return {"prompt": await self.client.detokenize(req.tokens)}

    # ---- helpers ------------------------------------------------------------------------------
    def _echo(self, prompt: str | list[int], scored: bool) -> str | None:
        """The prompt's text; None where the prompt's scores will spell it (token ids, no tokenizer)."""
        if isinstance(prompt, str):
            return prompt
        text = self.client.decode_prompt(prompt)
        if text is None and not scored:
            raise InvalidRequestError("echo of token-id prompts needs a tokenizer, which this server "
                                      "does not have (upstream mode): send the prompt as text", param="echo")
        return text

    def _check_count(self, completions: int) -> None:
        cap = self.client.model().max_batch_size
        if completions > cap:
            raise InvalidRequestError(f"the request asks for {completions} completions (prompts x n); this "
                                      f"server generates at most {cap} per request", param="n")

    def _submit(self, jobs: list[Job], ignore_eos: bool, streamed: bool,
                **scoring) -> list[CompletionStream]:
        """All jobs or none: a refusal of one cancels those already queued. `scoring`: the
        engine's logprobs/echo/score_only, passed only when asked for."""
        streams: list[CompletionStream] = []
        try:
            for prompt, params in jobs:
                streams.append(self.client.submit(prompt, params, ignore_eos=ignore_eos, stream=streamed, **scoring))
        except BaseException as exc:
            _cancel(streams)
            if isinstance(exc, OverloadedError):
                exc.retry_after = self.settings.retry_after
            raise
        return streams

    async def _collect(self, request: Request, streams: list[CompletionStream], started: float) -> list[_Output] | None:
        """Outputs of all streams; None (and the streams cancelled) if the client goes away first."""
        task = asyncio.ensure_future(asyncio.gather(*(_drain(s) for s in streams)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    return None
        finally:
            task.cancel()
            task.add_done_callback(_retrieve)  # its CancelledError is expected, not "never retrieved"
            _cancel(streams)  # disconnected, or a sibling failed: free their slots
            self.metrics.finished(streams, started)

    async def _stream(self, streams: list[CompletionStream], payloads: AsyncIterator[dict], usage_head: dict | None,
                      n: int, started: float) -> StreamingResponse:
        """`payloads` as server-sent events, then usage (when `usage_head` is given) and `[DONE]`."""
        try:  # an upstream's refusal is our 4xx, not an event after a 200
            await asyncio.gather(*(s.opened() for s in streams))
        except BaseException:
            _cancel(streams)
            raise
        return StreamingResponse(self._sse(streams, payloads, usage_head, n, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, streams: list[CompletionStream], payloads: AsyncIterator[dict], usage_head: dict | None,
                   n: int, started: float) -> AsyncIterator[str]:
        try:
            async for payload in payloads:
                yield sse(payload)
            if usage_head is not None:
                yield sse({**usage_head, "choices": [], "usage": _usage(streams, n)})
        except WikigptError as exc:
            yield sse(error_body(exc))
        except Exception:  # a bug: logged with its traceback, the client gets a clean event
            log.exception("streaming failed")
            yield sse(error_body(EngineError("internal error while generating; the request was dropped")))
        finally:
            _cancel(streams)
            self.metrics.finished(streams, started)
        yield sse("[DONE]")


async def _completion_events(streams: list[CompletionStream], head: dict, echoes: list[str | None],
                             scored: bool) -> AsyncIterator[dict]:
    """Completion events: echoes, then chunks as they come. With logprobs, a choice's echo
    waits for its first chunk, which brings the prompt's scores."""
    offsets = [0] * len(streams)
    for i, echo in enumerate(echoes):
        if echo and not scored:
            yield {**head, "choices": [_choice(i, echo, None)]}
    async for i, c in merge(streams):
        text, lp = c.text, None
        if scored:
            echo, echoes[i] = echoes[i], ""
            echo, lp, offsets[i] = _scored(echo, c.prompt_logprobs, c.logprobs, offsets[i])
            text = echo + text
        yield {**head, "choices": [_choice(i, text, c.finish_reason, lp)]}


async def _chat_events(streams: list[CompletionStream], head: dict, top_n: int | None) -> AsyncIterator[dict]:
    """Chat chunks: each choice opens with the assistant's role, then its text as it comes;
    its last chunk carries the finish_reason. `top_n`: alternatives per scored token (None: no scores)."""
    replies = [AssistantText() for _ in streams]
    for i in range(len(streams)):
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    async for i, c in merge(streams):
        text = replies[i](c.text)
        if text or c.finish_reason or c.logprobs:
            yield {**head, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                        "logprobs": None if top_n is None else chat_logprobs(c.logprobs, top_n),
                                        "finish_reason": c.finish_reason}]}


def _wants_usage(req: CompletionRequest | ChatRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def _choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


@dataclass
class _Output:
    """One stream's whole output: its text and, when asked for, its tokens' scores."""

    text: str = ""
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None


async def _drain(stream: CompletionStream) -> _Output:
    out = _Output()
    async for c in stream:
        out.text += c.text
        out.logprobs += c.logprobs
        if c.prompt_logprobs is not None:
            out.prompt_logprobs = c.prompt_logprobs
    return out


def _scoring(req: CompletionRequest) -> dict:
    """The engine's scoring arguments for `req`, only those it asks for (an EngineClient
    without scoring serves every other request)."""
    if req.max_tokens == 0 and not req.echo:
        raise InvalidRequestError("max_tokens: 0 generates nothing; it is only allowed with echo: true "
                                  "(to score the prompt with logprobs)", param="max_tokens")
    kw: dict[str, Any] = {}
    if req.logprobs is not None:
        kw.update(logprobs=req.logprobs, echo=req.echo)
    if req.max_tokens == 0:
        kw["score_only"] = True
    return kw


def _scored(echo: str | None, prompt_lp: list | None, scores: list, offset: int) -> tuple[str, dict, int]:
    """A chunk's echo text (spelled by the prompt's scores where None), its `logprobs` object
    (prompt tokens first, when echoed) and the choice's text offset after it."""
    if echo is None:
        echo = echo_of(prompt_lp or ())
    entries = [*prompt_scores(echo, prompt_lp or ()), *scores]
    if not prompt_lp and echo:
        offset += len(echo)  # echoed without scores (not asked for): the tokens come after it
    lp, offset = logprobs_object(entries, offset)
    return echo, lp, offset


def _usage(streams: Sequence[CompletionStream], n: int) -> dict:
    """Token counts; a prompt sent n times (n choices) counts once, as OpenAI counts it, and so
    do its cached tokens: those the cache held before the request (the fewest of its n copies;
    the others copy what the first computed)."""
    prompt_tokens = sum(s.prompt_tokens for s in streams[::n])
    cached = sum(min(s.cached_tokens for s in streams[i:i + n]) for i in range(0, len(streams), n))
    done = sum(s.completion_tokens for s in streams)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _cancel(streams: Sequence[CompletionStream]) -> None:
    for s in streams:
        if s.finish_reason is None:
            s.cancel()


async def merge(streams: Sequence[CompletionStream]) -> AsyncIterator[tuple[int, Any]]:
    """Chunks of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for c in streams[0]:
            yield 0, c
        return
    # bounded: a reader that stops taking chunks stops the pumps too, so the chunks pile up in
    # each stream's own Backlog, which aborts its request past --stream-backlog
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

    async def pump(i: int, s: CompletionStream) -> None:
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
