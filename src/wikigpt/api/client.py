"""The one engine interface the serving layer talks to (vLLM's `EngineClient`, smaller).

Two implementations: the in-process continuous-batching engine (`wikigpt.engine.Engine`, which
matches this protocol as it is) and `upstream.UpstreamClient`, which forwards every completion
to an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, another `wikigpt serve`).
The serving layer never imports either: it is handed an `EngineClient`.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from ..decoding import SamplingParams


class Chunk(Protocol):
    """A piece of one completion's text; the last one has `finish_reason` set.

    With `logprobs` asked for, `logprobs` scores the tokens sampled since the previous chunk
    and the first chunk's `prompt_logprobs` the prompt's (with `echo`; its first entry has no
    score). A score has `text`, `logprob` and `top` [(text, logprob), ...], like the engine's
    `TokenLogprob`."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Any]
    prompt_logprobs: list[Any] | None
    cached_tokens: int  # of prompt_tokens, those the prefix cache held


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


class ModelFacts(Protocol):
    name: str
    n_params: int | None
    device: Any
    dtype: Any


@runtime_checkable
class EngineClient(Protocol):
    """What serving a model needs. `submit` is called on the event loop and raises
    InvalidRequestError (bad prompt) or OverloadedError (queue full) at once."""

    ready: threading.Event  # set once requests can be served (model warmed up, upstream answering)
    not_ready_reason: str  # what /ready says while `ready` is not set
    max_batch_size: int
    context_length: int | None
    tokenizer: Any  # decodes token-id prompts for `echo`; None where there is none
    lm: ModelFacts
    root: str | None  # where the model came from (its path or Hub id; upstream: its own `root`)
    forwards: bool  # completions go to another server; then `on_upstream` reports each one
    on_step: Callable[[int, int, float], None] | None  # (rows, prefill tokens, seconds) per step

    @property
    def queue_depth(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    def submit(self, prompt: str | list[int], params: SamplingParams, *, ignore_eos: bool = False,
               max_tokens_name: str = "max_new_tokens", logprobs: int | None = None, echo: bool = False,
               score_only: bool = False, stream: bool = True) -> CompletionStream:
        """`logprobs=N` scores each generated token with its N best alternatives, `echo` the
        prompt too, `score_only` generates nothing (one chunk with the prompt's scores).
        `stream=False`: the client reads the answer whole, so an implementation may produce it
        in one chunk when that is cheaper (the upstream client: one JSON answer, not an SSE
        event per token); the chunks are consumed the same way either way."""
        ...

    def info(self) -> dict:
        """Facts for `GET /` and `/v1/models`: dtype and device at least."""
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
