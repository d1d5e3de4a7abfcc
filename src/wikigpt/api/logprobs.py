"""OpenAI's legacy completions `logprobs` object, built from an engine's token scores.

    {"tokens": ["The", " history"], "token_logprobs": [null, -7.1],
     "top_logprobs": [null, {" history": -7.1, " city": -3.2}], "text_offset": [0, 3]}

As vLLM builds it: `top_logprobs[i]` holds the N most likely tokens plus the chosen one (so
`logprobs: 0` still names it), and `text_offset[i]` is the sum of the earlier tokens' text
lengths in this choice, counted from the start of the echoed prompt (or of the completion).
The first prompt token has no context, so its logprob and top entry are null.

Scores are `outputs.TokenLogprob`s; an entry may be None (the engine's first prompt token,
whose text is then given separately) or carry `logprob=None` (an upstream's first prompt
token, text known). `outputs.parse_logprobs` reads the object back.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..outputs import TokenLogprob


def prompt_scores(echo_text: str, scores: Sequence[TokenLogprob | None]) -> list[TokenLogprob]:
    """The prompt's scores with the first token's text filled in: the echoed text minus what
    the scored tokens spell (byte-level BPE spells a text exactly, but a token that is part of
    a multi-byte character decodes alone to U+FFFD, and then the remainder is not exact)."""
    if not scores:
        return []
    rest = scores[1:]
    spelled = "".join(s.text for s in rest)
    first = scores[0]
    if first is None:
        text = echo_text[: len(echo_text) - len(spelled)] if echo_text.endswith(spelled) else echo_text[:1]
        first = TokenLogprob(text, None)
    return [first, *rest]


def echo_of(scores: Sequence[TokenLogprob | None]) -> str:
    """The prompt's text spelled by its scores (a token-id prompt on a server without a
    tokenizer: the upstream names every token, the first one included)."""
    return "".join(s.text for s in scores if s is not None)


def logprobs_object(scores: Sequence[TokenLogprob], offset: int = 0) -> tuple[dict, int]:
    """The `logprobs` object for `scores` whose first token starts at `offset`, and the offset
    after the last one (where the choice's next chunk continues)."""
    tokens, values, tops, offsets = [], [], [], []
    for s in scores:
        tokens.append(s.text)
        values.append(s.logprob)
        if s.logprob is None:
            tops.append(None)
        else:
            top = dict(s.top)
            top.setdefault(s.text, s.logprob)  # the chosen token is always named, as vLLM does
            tops.append(top)
        offsets.append(offset)
        offset += len(s.text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def split_echo(prompt: str | list[int], text: str, scores: list[TokenLogprob],
               offsets: list[int] | None) -> tuple[list[TokenLogprob], str, list[TokenLogprob]]:
    """An upstream's first echoed event (vLLM: the prompt and the first generated token in one)
    split into the prompt's scores, the generated text and the generated tokens' scores. Prompt
    tokens: as many as the token ids sent, or those that start inside the prompt's text."""
    if isinstance(prompt, list):
        n = len(prompt)
        echo = "".join(s.text for s in scores[:n])
    else:
        n = sum(1 for o in offsets if o < len(prompt)) if offsets else len(scores)
        echo = prompt
    return scores[:n], text[len(echo):] if text.startswith(echo) else "", scores[n:]
