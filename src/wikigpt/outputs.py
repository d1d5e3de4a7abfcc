"""What a generation backend tells the serving layer: what it serves, chunks of text, token scores.

Shared by the in-process engine and the upstream client (`serve --upstream`), and free of
torch so that a gateway process never imports it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import SlowReaderError


@dataclass(frozen=True)
class ServedModel:
    """What a backend serves, as clients are told (`GET /`, `/v1/models`)."""

    name: str  # the model's name (upstream: the upstream's model id)
    root: str | None  # where it came from: its path or Hub id (upstream: the upstream's `root`)
    n_params: int | None
    context_length: int | None  # most prompt + generated tokens
    max_batch_size: int  # most completions generated together (a request's prompts x n at most)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (before repetition
    penalty, temperature, top-k, top-p and min-p), with the most likely alternatives: what the
    engine scores, the upstream relays and a client reads back."""

    text: str  # the token decoded on its own ("\ufffd" for part of a multi-byte character)
    logprob: float | None  # ln p; None for a text's first token, which has no context
    top: list[tuple[str, float]] = field(default_factory=list)  # [(text, ln p), ...], best first
    token_id: int | None = None  # where known (the engine's own scores)

    @property
    def surprise(self) -> float | None:
        """-log2 p in bits: 0 for a certain token, 1 for a coin flip, ~15.6 for 1 in 50,257."""
        return None if self.logprob is None else -self.logprob / math.log(2)

    @property
    def p(self) -> float | None:
        return None if self.logprob is None else math.exp(self.logprob)


def parse_logprobs(obj: dict | None, top_n: int | None = None) -> list[TokenLogprob]:
    """OpenAI's legacy `logprobs` object (ours, vLLM's, OpenAI's) back into scores, keeping the
    `top_n` best alternatives; [] for none. ValueError when its lists differ in length."""
    if not obj:
        return []
    tokens, values = obj.get("tokens") or [], obj.get("token_logprobs") or []
    tops = obj.get("top_logprobs") or [None] * len(tokens)
    if not (len(tokens) == len(values) == len(tops)):
        raise ValueError(f"logprobs lists differ in length: {len(tokens)} tokens, {len(values)} "
                         f"token_logprobs, {len(tops)} top_logprobs")
    return [TokenLogprob(str(t), None if v is None else float(v),
                         sorted(((str(k), float(x)) for k, x in (top or {}).items()), key=lambda kv: -kv[1])[:top_n])
            for t, v, top in zip(tokens, values, tops)]


@dataclass
class Chunk:
    """A piece of a request's output. The last one has `finish_reason` set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens sampled since the last chunk
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first chunk, when echo was asked
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache, not computed


class Backlog(asyncio.Queue):
    """A request's chunks that its reader has not taken yet, at most `limit` of them.

    A streaming client that stays connected but stops reading blocks the response's writes, so
    chunks pile up here at one per token. Past `limit`, `offer` refuses them: the request is
    over (its producer frees the slot) and the reader, should it read again, finds the backlog
    and then a SlowReaderError. Memory per stalled request is bounded by `limit` chunks plus the
    connection's transport buffer."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflowed = False

    def offer(self, item: "Chunk | BaseException") -> bool:
        """Queue `item`; False (and the request's end queued) when the reader is too far behind."""
        if self.overflowed:
            return False
        if self.qsize() >= self.limit and not isinstance(item, BaseException):
            self.overflowed = True
            self.put_nowait(SlowReaderError(
                f"the client did not read its stream: {self.limit} chunks were waiting for it "
                "(--stream-backlog), so the request was aborted"))
            return False
        self.put_nowait(item)
        return True


class ChunkStream:
    """Async iterator over one request's chunks, which a producer (the engine's worker thread,
    the upstream relay) puts on `queue`: an exception put there is raised to the reader, and
    a reader that stops before the last chunk cancels the request, freeing its slot."""

    def __init__(self, queue: Backlog, prompt_tokens: int = 0) -> None:
        self._out = queue
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, those the prefix cache held (OpenAI's cached_tokens)
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        try:
            while self.finish_reason is None:
                item = await self._out.get()
                if isinstance(item, BaseException):
                    raise item
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.completion_tokens, self.finish_reason = item.completion_tokens, item.finish_reason
                self.cached_tokens = max(self.cached_tokens, item.cached_tokens)
                yield item
        finally:
            if self.finish_reason is None:
                self.cancel()

    async def opened(self) -> None:
        """Accepted when made (the engine refuses at submit); the upstream stream overrides it."""

    async def text(self) -> str:
        """The whole continuation (consumes the stream)."""
        return "".join([c.text async for c in self])

    def cancel(self) -> None:
        raise NotImplementedError
