"""The engine's text path: tokens in, exactly the text `wikigpt generate` shows out."""

from __future__ import annotations

import asyncio
import random

import pytest

from wikigpt.engine import Engine, Detokenizer
from wikigpt.generation import generate
from wikigpt.textfilter import clean_continuation
from wikigpt.decoding import SamplingParams

from .conftest import CORPUS


def engine_text(out: Detokenizer, tokens: list[int], max_new_tokens: int) -> str:
    """What the engine streams for these tokens: its calls to the output object, in order."""
    text = ""
    for t in tokens:
        text += out.append(t)
        if out.stopped:
            return text
        if len(out.tokens) >= max_new_tokens:
            return text + out.finish()
    return text + out.finish()


@pytest.mark.parametrize(("pieces", "stop", "want"), [
    (["Hello", " The"], ["e "], "Hello The"),  # a held-back stop prefix at the length limit
    (["Hello", " world\n"], [], "Hello world"),  # held-back trailing whitespace at the limit
    (["Hello", " world", "\n\n\n", "x"], [], "Hello world\n\nx"),
    (["a", "b", "c"], ["bc"], "a"),
])
def test_each_piece_reaches_the_filter_once(pieces, stop, want):
    out = Detokenizer(lambda ids: "".join(pieces[i] for i in ids), stop)
    assert engine_text(out, list(range(len(pieces))), len(pieces)) == want


def test_random_tokens_stops_and_lengths_match_generate(tiny_lm):
    """Random ids (including byte pieces of multi-byte characters), random stop strings and
    length limits: the streamed text equals the filter applied to the whole decoded text."""
    tok, rng = tiny_lm.tokenizer, random.Random(0)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    for _ in range(300):
        tokens = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))]
        limit = rng.randint(1, len(tokens))
        whole = decode(tokens[:limit])
        stop = []
        if whole and rng.random() < 0.6:
            i = rng.randrange(len(whole))
            stop = [whole[i:i + rng.randint(1, 4)]]
        got = engine_text(Detokenizer(decode, stop), tokens, limit)
        assert got == clean_continuation(whole, stop), (tokens, limit, stop)


def test_engine_text_equals_generate_at_every_length_and_stop(tiny_lm):
    """Through the real engine: greedy continuations cut at random lengths, with stop strings
    inside them or whose first character ends them (held back at the length limit), equal
    `wikigpt generate`'s."""
    rng = random.Random(1)
    words = CORPUS.split()
    jobs = []
    for _ in range(24):
        start = rng.randrange(len(words) - 6)
        prompt = " ".join(words[start:start + rng.randint(1, 6)])
        params = SamplingParams(max_new_tokens=rng.randint(1, 24), temperature=0.0, repetition_penalty=1.0)
        full = generate(tiny_lm, prompt, params)[len(prompt):]
        kind = rng.choice(["none", "inside", "held at the end"])
        if full.strip() and kind == "inside":
            i = rng.randrange(len(full))
            params = params.model_copy(update={"stop": [full[i:i + rng.randint(1, 3)]]})
        elif full.strip() and kind == "held at the end":  # the filter holds back the last character
            params = params.model_copy(update={"stop": [full.rstrip()[-1] + "\u2603"]})
        jobs.append((prompt, params, generate(tiny_lm, prompt, params)[len(prompt):]))
    eng = Engine(tiny_lm, max_batch_size=8).start()
    try:
        async def main():
            return await asyncio.gather(*[eng.submit(p, params).text() for p, params, _ in jobs])

        got = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        eng.stop()
    assert got == [want for _, _, want in jobs]
