"""How surprised a model is by a text, token by token: the math the CLI's `score` and the web
UI's "Score text" page share (no torch, no HTTP, no Streamlit).

A scored text is what `POST /v1/completions` answers to `{"prompt": text, "max_tokens": 0,
"echo": true, "logprobs": N}`: OpenAI's legacy logprobs object, one entry per prompt token, the
first without a score (nothing comes before it). From it:

    surprise(token)  = -log2 p(token | text before it)          bits
    perplexity       = exp(-mean of the scored tokens' ln p)
    bits per byte    = -sum(ln p) / (ln 2 * UTF-8 bytes of the scored part of the text)

Bits per byte does not depend on the tokenizer, so two models with different vocabularies
compare on it; perplexity only between models that share a tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .outputs import TokenLogprob, parse_logprobs


@dataclass
class Scored:
    """A text scored by one model."""

    model: str
    tokens: list[TokenLogprob]
    text: str | None = None  # the scored text itself, where known (the API echoes it)

    @classmethod
    def from_openai(cls, logprobs: dict, model: str = "", top_n: int | None = None, text: str | None = None) -> Scored:
        """From OpenAI's legacy logprobs object (ours, vLLM's or OpenAI's), keeping the `top_n`
        best alternatives (the object also names the chosen token, however unlikely)."""
        return cls(model, parse_logprobs(logprobs, top_n), text)

    @property
    def scored(self) -> list[TokenLogprob]:
        return [t for t in self.tokens if t.logprob is not None]

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the scored tokens' text, the unscored first token left out. From the
        text itself where known: a token that is part of a multi-byte character spells U+FFFD
        (3 bytes) on its own, whatever its real byte count."""
        first = next((i for i, t in enumerate(self.tokens) if t.logprob is not None), len(self.tokens))
        unscored = len("".join(t.text for t in self.tokens[:first]).encode("utf-8"))
        if self.text is not None and first < len(self.tokens):
            return len(self.text.encode("utf-8")) - unscored
        return len("".join(t.text for t in self.tokens[first:]).encode("utf-8"))

    @property
    def nll(self) -> float:
        """-sum(ln p) over the scored tokens, in nats."""
        return -sum(t.logprob for t in self.scored)

    @property
    def perplexity(self) -> float:
        n = len(self.scored)
        return math.exp(self.nll / n) if n else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.n_bytes) if self.n_bytes else math.nan

    def summary(self) -> str:
        n = len(self.scored)
        if not n:
            return f"{self.model}: nothing to score (a text of one token has no scored token)"
        return (f"{self.model}: perplexity {self.perplexity:,.2f} · {self.bits_per_byte:.3f} bits per byte · "
                f"{n} tokens scored ({self.n_bytes} bytes; the first token has no context)")


def spelled(scored: Scored) -> list[str]:
    """Each token's text as it stands in the scored text, for display: a character split across
    tokens (each of which spells U+FFFD alone) is shown whole on the first of them, the others
    empty, so the pieces join into the text itself."""
    pieces = [t.text for t in scored.tokens]
    text = scored.text
    if text is None or "".join(pieces) == text:
        return pieces
    out, pos, i = [], 0, 0
    while i < len(pieces):
        if "\ufffd" not in pieces[i] and text.startswith(pieces[i], pos):
            out.append(pieces[i])
            pos += len(pieces[i])
            i += 1
            continue
        j = i  # a run of partial tokens: up to where the next whole token stands in the text
        while j < len(pieces) and ("\ufffd" in pieces[j] or not pieces[j]):
            j += 1
        end = text.find(pieces[j], pos) if j < len(pieces) else len(text)
        if end < 0:
            return pieces  # the text and its tokens disagree beyond repair: show the tokens
        run = max(j - i, 1)
        out += [text[pos:end]] + [""] * (run - 1)
        pos, i = end, i + run
    return out if "".join(out) == text else pieces


def surprise_delta(a: Scored, b: Scored) -> list[float | None]:
    """Per-token surprise of `b` minus `a` (bits; negative: `b` found the token likelier), or
    None where a token has no score in either. Only texts tokenized alike line up."""
    if [t.text for t in a.tokens] != [t.text for t in b.tokens]:
        raise ValueError("the two models split the text into different tokens; compare bits per byte instead")
    return [None if x.surprise is None or y.surprise is None else y.surprise - x.surprise
            for x, y in zip(a.tokens, b.tokens)]


def paragraphs(raw: str, max_chars: int | None = None, limit: int = 200) -> list[str]:
    """WikiText paragraphs (lines that are not headings or blank), at most `max_chars` long
    (a prompt must fit the model's context), the first `limit` of them."""
    out = []
    for line in raw.splitlines():
        text = line.strip()
        if not text or text.startswith("="):
            continue
        if max_chars is None or len(text) <= max_chars:
            out.append(text)
            if len(out) >= limit:
                break
    return out


def shade(surprise: float | None, top: float = 16.0) -> float:
    """0..1 for a colour's strength: 0 bits white, `top` bits (about 1 in 65,000) and beyond full."""
    return 0.0 if surprise is None else max(0.0, min(1.0, surprise / top))


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def show_token(text: str) -> str:
    """A token's text quoted, whitespace made visible: ' the', '\\n'."""
    return repr(text)


def table_rows(scored: Scored, top_n: int = 3) -> list[tuple[str, str, str, str, str]]:
    """(index, token, p, surprise bits, top alternatives) per token, as text."""
    rows = []
    for i, t in enumerate(scored.tokens):
        alts = ", ".join(f"{show_token(text)} {fmt_p(math.exp(lp))}" for text, lp in t.top[:top_n])
        rows.append((str(i), show_token(t.text), fmt_p(t.p),
                     "–" if t.surprise is None else f"{t.surprise:.2f}", alts))
    return rows

