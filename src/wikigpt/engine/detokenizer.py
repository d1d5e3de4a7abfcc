"""One request's output: token ids in, the text a user sees out.

Every sampled token passes through here exactly once, in order: incremental detokenization
turns ids into new text (vLLM's detokenizer is the model), then the `ContinuationFilter` that
`wikigpt generate` uses cuts stop strings and collapses blank-line runs. Because the request
owns both steps in one object, no piece of text can reach the filter twice or out of order,
whatever the reason a request ends (EOS, a stop string, the length limit, cancellation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..textfilter import ContinuationFilter
from ..outputs import Chunk, TokenLogprob


def token_logprobs(decode: Callable[[list[int]], str], logprobs: torch.Tensor, ids: list[int],
                   top_n: int) -> list[TokenLogprob]:
    """TokenLogprobs of `ids` from log-softmaxed rows [len(ids), vocab] (row i scores ids[i])."""
    chosen = logprobs.gather(1, torch.tensor(ids, device=logprobs.device)[:, None])[:, 0].tolist()
    tops = logprobs.topk(top_n, -1) if top_n else None
    out = []
    for i, (t, lp) in enumerate(zip(ids, chosen)):
        top = []
        if tops is not None:
            top = [(decode([j]), v) for j, v in zip(tops.indices[i].tolist(), tops.values[i].tolist())]
        out.append(TokenLogprob(decode([t]), lp, top, token_id=t))
    return out


class Detokenizer:
    """Detokenizes one request's tokens incrementally and filters the text.

    Decoding only a short window of tokens each step (as vLLM does) keeps the cost per token
    constant: the new text is decode(tokens[prefix:]) minus decode(tokens[prefix:read]). Text
    ending in U+FFFD is held back while it may be the first bytes of a multi-byte character
    that the next token completes; `finish()` releases it.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | tuple[str, ...] = (),
                 prompt_tokens: int = 0) -> None:
        self._decode = decode
        self.filter = ContinuationFilter(stop)
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # of them, those a prefix-cache hit supplied (set when prefilled)
        self.tokens: list[int] = []
        self.pending: list[TokenLogprob] = []  # scored tokens not yet handed out in a chunk
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._prefix = 0
        self._read = 0

    @property
    def stopped(self) -> bool:
        """A stop string was seen: nothing after it is ever shown, the request is over."""
        return self.filter.done

    def append(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to show."""
        self.tokens.append(token)
        return self.filter.feed(self._new_text(final=False))

    def finish(self) -> str:
        """The request ends here: return what was held back (partial characters, trailing
        whitespace), cleaned."""
        text = self.filter.feed(self._new_text(final=True))
        return text + self.filter.finish()

    def chunk(self, text: str, finish_reason: str | None = None) -> Chunk:
        c = Chunk(text, finish_reason, self.prompt_tokens, len(self.tokens), self.pending, self.prompt_logprobs,
                  self.cached_tokens)
        self.pending, self.prompt_logprobs = [], None
        return c

    def _new_text(self, final: bool) -> str:
        if self._read == len(self.tokens):
            return ""
        before = self._decode(self.tokens[self._prefix:self._read])
        now = self._decode(self.tokens[self._prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.tokens)
            return now[len(before):]
        if final:
            self._read = len(self.tokens)
        return ""
