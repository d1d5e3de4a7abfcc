"""Text out of a model: decoding with sane defaults, stop strings and blank-line cleaning.

The text is cleaned by textfilter's `ContinuationFilter` (stop strings, blank-line runs).
`stream()` is the single-prompt path used by `wikigpt generate`; the server's batching engine
uses its own decoding loop with the same filter and sampling settings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed

from .modeling import LoadedModel
from .decoding import SamplingParams
from .textfilter import ContinuationFilter


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
    config = params.generation_config(tok)
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
