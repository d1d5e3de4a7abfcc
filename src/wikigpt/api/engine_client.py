"""The one engine interface the serving layer talks to (vLLM's `EngineClient`, smaller).

Two implementations: the in-process continuous-batching engine (`wikigpt.engine.Engine`, which
matches this protocol as it is) and `upstream.UpstreamClient`, which forwards every completion
to an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, another `wikigpt serve`).
The serving layer never imports either: it is handed an `EngineClient`.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from ..decoding import SamplingParams
from ..outputs import Chunk, ServedModel


class CompletionStream(Protocol):
    """One completion in flight: an async iterator of chunks; `cancel()` frees its slot.
    `opened()` returns once the request is accepted, or raises its refusal: the serving layer
    awaits it before it answers 200 to a streamed request (the engine accepts or refuses at
    `submit`; the upstream client only once the upstream answered)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of prompt_tokens, those the prefix cache held (usage.prompt_tokens_details)
    finish_reason: str | None
    first_token_at: float | None  # time.perf_counter() of the first chunk

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def text(self) -> str: ...

    async def opened(self) -> None: ...

    def cancel(self) -> None: ...


class Observer(Protocol):
    """What a client reports as it works (api/metrics.py implements it)."""

    def on_step(self, rows: int, prefill_tokens: int, seconds: float) -> None:
        """One decoding step of the in-process engine."""

    def on_upstream(self, seconds: float, outcome: str) -> None:
        """One completion forwarded to an upstream: sending to its last byte; ok, error, cancelled."""


@runtime_checkable
class EngineClient(Protocol):
    """What serving a model needs. Called on the event loop; `submit` raises InvalidRequestError
    (bad prompt) or OverloadedError (queue full) at once. Nothing here hands out a tokenizer or
    a model: the serving layer sees facts, streams and text."""

    ready: threading.Event  # set once requests can be served (model warmed up, upstream answering)
    not_ready_reason: str  # what /ready says while `ready` is not set

    def model(self) -> ServedModel:
        """What is served (upstream: known once the upstream answered)."""
        ...

    def info(self) -> dict:
        """More facts for `GET /` and `/v1/models`: dtype and device at least."""
        ...

    def stats(self) -> dict:
        """Live load: `queue_depth` (waiting for a slot) and `running` (decoding or in flight)."""
        ...

    def observe(self, observer: Observer) -> None:
        """Report steps and forwarded completions to `observer` from now on."""
        ...

    def submit(self, prompt: str | list[int], params: SamplingParams, *, ignore_eos: bool = False,
               logprobs: int | None = None, echo: bool = False,
               score_only: bool = False, stream: bool = True) -> CompletionStream:
        """`logprobs=N` scores each generated token with its N best alternatives, `echo` the
        prompt too, `score_only` generates nothing (one chunk with the prompt's scores).
        `stream=False`: the client reads the answer whole, so an implementation may produce it
        in one chunk when that is cheaper (the upstream client: one JSON answer, not an SSE
        event per token); the chunks are consumed the same way either way. Refusals name
        OpenAI's fields (`max_tokens`)."""
        ...

    def render_chat(self, messages: list[dict]) -> tuple[str, list[str]]:
        """A chat's prompt and extra stop strings (chat.py: the model's template, else a transcript)."""
        ...

    def decode_prompt(self, ids: list[int]) -> str | None:
        """A token-id prompt's text for `echo`; None where no tokenizer is at hand (upstream: the
        upstream's scores spell it)."""
        ...

    async def tokenize(self, text: str, add_special_tokens: bool = True,
                       with_strings: bool = False) -> tuple[list[int], list[str] | None]:
        """The text's token ids, and with `with_strings` each token as the tokenizer spells it."""
        ...

    async def detokenize(self, ids: list[int]) -> str:
        """The text of `ids`; InvalidRequestError for an id outside the vocabulary."""
        ...

    def start(self) -> Any: ...

    def stop(self) -> None: ...
