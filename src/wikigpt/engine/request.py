"""A request inside the engine, and the stream its caller reads.

`Request` lives on the worker thread (slot, tokens, output); `RequestStream` is what
`Engine.submit()` hands to the asyncio side. Chunks cross between the two threads only through
the event loop's `call_soon_threadsafe`, so the asyncio queue is touched on its own thread.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from collections.abc import Callable

from ..outputs import Backlog, ChunkStream
from ..decoding import SamplingParams
from .detokenizer import Chunk, Detokenizer
from .sampling import RowSampling


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    out: Backlog
    output: Detokenizer
    sampling: RowSampling
    logprobs: int | None = None  # top alternatives per scored token; None: no scores
    echo: bool = False  # also score the prompt
    score_only: bool = False  # score the prompt, generate nothing
    cancelled: bool = False
    slot: int = -1
    last: int = 0  # the next input token
    submitted: float = field(default_factory=time.perf_counter)

    def push(self, item: Chunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.offer, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


def deliver(items: list[tuple[Request, Chunk]]) -> None:
    """Runs on the event loop. A row whose reader fell --stream-backlog chunks behind is
    cancelled: the worker frees its slot at the next step."""
    for r, chunk in items:
        if not r.out.offer(chunk):
            r.cancelled = True


class RequestStream(ChunkStream):
    """One engine request's chunks; `cancel()` frees its batch slot (`wake` rouses the engine's
    worker, which may be waiting for work, to drop it)."""

    def __init__(self, req: Request, wake: Callable[[], None]) -> None:
        super().__init__(req.out, len(req.prompt_ids))
        self._req, self._wake = req, wake

    def cancel(self) -> None:
        if not self._req.cancelled:
            self._req.cancelled = True
            self._wake()
