"""What a generation backend streams back: chunks of text and token scores.

Shared by the in-process engine and the upstream client (`serve --upstream`), and free of
torch so that a gateway process never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (before repetition
    penalty, temperature, top-k and top-p), with the most likely alternatives."""

    token_id: int
    text: str  # the token decoded on its own ("\ufffd" for part of a multi-byte character)
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # best first


@dataclass
class Chunk:
    """A piece of a request's output. The last one has `finish_reason` set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens sampled since the last chunk
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first chunk, when echo was asked
