"""Text out of a model: decoding with sane defaults, stop strings and blank-line cleaning.

`ContinuationFilter` turns raw decoded text, arriving in pieces, into what a user sees: cut
before the first stop string and with runs of blank lines collapsed to one. It works on
streams (the CLI, the server) and on whole strings alike, so both give the same text.
`stream()` is the single-prompt path used by `wikigpt generate`; the server's batching engine
uses its own decoding loop with the same filter and sampling settings.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed

from .modeling import LoadedModel, generation_config_for
from .settings import SamplingParams

# Two or more blank lines (lines holding only spaces/tabs) in a row become one blank line.
BLANK_RUN = re.compile(r"\n[ \t\r\f\v]*(?:\n[ \t\r\f\v]*)+\n")


def collapse_blank_lines(text: str) -> str:
    return BLANK_RUN.sub("\n\n", text)


class ContinuationFilter:
    """Incrementally cleans a model's continuation.

    `feed(piece)` returns the text that is now safe to show: text that cannot change any more.
    Held back are trailing whitespace (it may grow into a run of blank lines that is collapsed)
    and a tail that could be the start of a stop string. Once a stop string appears, `done` is
    set and nothing after it is ever returned. `finish()` returns the rest.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.raw = ""
        self.done = False
        self._emitted = 0

    def _stop_index(self) -> int:
        hits = [i for i in (self.raw.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else -1

    def _safe_prefix_len(self) -> int:
        """Length of the raw text that no future piece can change."""
        n, prev = len(self.raw), -1
        while n != prev:  # until neither rule shortens it further
            prev = n
            n = len(self.raw[:n].rstrip())
            for s in self.stop:  # hold back a tail that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, n), 0, -1):
                    if self.raw[:n].endswith(s[:k]):
                        n -= k
                        break
        return n

    def _emit(self, upto: int, final: bool) -> str:
        cleaned = collapse_blank_lines(self.raw[:upto])
        if final:
            cleaned = cleaned.rstrip()
        out = cleaned[self._emitted :]
        self._emitted = max(self._emitted, len(cleaned))
        return out

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.raw += piece
        idx = self._stop_index()
        if idx >= 0:
            self.done = True
            return self._emit(idx, final=True)
        return self._emit(self._safe_prefix_len(), final=False)

    def finish(self) -> str:
        if self.done:
            return ""
        self.done = True
        return self._emit(len(self.raw), final=True)


def clean_continuation(raw: str, stop: list[str] | tuple[str, ...] = ()) -> str:
    """Whole-string form of ContinuationFilter (same result as feeding it piece by piece)."""
    f = ContinuationFilter(stop)
    return f.feed(raw) + f.finish()


class _StopWhen(StoppingCriteria):
    """Stops `generate` as soon as the consumer has seen a stop string or went away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream(lm: LoadedModel, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the cleaned continuation of `prompt` piece by piece as tokens are produced.

    transformers' `generate` runs in a worker thread and hands decoded text to a
    TextIteratorStreamer; closing the iterator early stops generation at the next token.
    """
    tok = lm.tokenizer
    enc = tok(prompt, return_tensors="pt").to(lm.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    stop_event = threading.Event()
    config = generation_config_for(params, tok)
    config.stop_strings = None  # the filter below cuts stop strings exactly and sets stop_event
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if params.seed is not None:
                set_seed(params.seed)
            with torch.inference_mode():
                lm.model.generate(
                    **enc,
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhen(stop_event)]),
                )
        except BaseException as exc:  # re-raised in the consumer's thread below
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, name="wikigpt-generate", daemon=True)
    worker.start()
    filt = ContinuationFilter(params.stop)
    try:
        for piece in streamer:
            out = filt.feed(piece)
            if out:
                yield out
            if filt.done:
                break
        if errors:
            raise errors[0]
        rest = filt.finish()
        if rest:
            yield rest
    finally:
        stop_event.set()
        worker.join()


def generate(lm: LoadedModel, prompt: str, params: SamplingParams) -> str:
    """Prompt plus cleaned continuation, as one string."""
    return prompt + "".join(stream(lm, prompt, params))
