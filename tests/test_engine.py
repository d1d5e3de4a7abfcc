"""The batching engine, driven directly (no HTTP): its text must equal `wikigpt generate`'s."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from wikigpt.engine import Engine
from wikigpt.errors import InvalidRequestError, OverloadedError
from wikigpt.generation import generate
from wikigpt.decoding import SamplingParams

PROMPTS = ["Data science is", "The history of the Roman Empire covers", "Wikipedia", "a b c d e f g h i j k l m n"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture()
def engine(tiny_lm):
    eng = Engine(tiny_lm, max_batch_size=8, queue_size=8).start()
    yield eng
    eng.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def later(engine, prompt, params, delay, **kw):
    await asyncio.sleep(delay)
    return await engine.submit(prompt, params, **kw).text()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_greedy_equals_generate_with_arrivals_and_departures(tiny_lm, engine, penalty):
    """Requests join a running batch at different steps and leave at different steps (short
    max tokens, a stop string), which exercises the cache merge, row removal and cropping."""
    p = GREEDY.model_copy(update={"repetition_penalty": penalty})
    jobs = [(q, p.model_copy(update={"max_new_tokens": n})) for q, n in zip(PROMPTS, (24, 5, 30, 12))]
    want = [generate(tiny_lm, q, params)[len(q):] for q, params in jobs]
    stop = want[2].strip()[4:7]
    jobs.append((PROMPTS[2], p.model_copy(update={"max_new_tokens": 30, "stop": [stop]})))
    want.append(generate(tiny_lm, *jobs[-1])[len(PROMPTS[2]):])

    joins = []  # (rows already running, rows joining) for each step that admits requests
    step = engine._step

    def watch(new):
        if new:
            joins.append((len(engine._running), len(new)))
        step(new)

    engine._step = watch

    async def main():
        out = []
        for i, (q, params) in enumerate(jobs):  # each one starts after the previous one's first token
            chunks = engine.submit(q, params).__aiter__()
            first = await chunks.__anext__()
            out.append(asyncio.create_task(_rest(first, chunks)))
        return await asyncio.gather(*out)

    got = run(main())
    assert got == want
    assert stop not in got[-1] and len(got[-1]) < len(got[2])
    assert sum(1 for running, joining in joins if running > 0) >= 3, joins  # really joined a batch


async def _rest(first, chunks):
    return first.text + "".join([c.text async for c in chunks])


def test_sampling_is_per_request_and_reproducible(engine):
    """A seed gives the same text alone or in a batch of other requests (own torch.Generator)."""
    sp = SamplingParams(max_new_tokens=20, seed=11)

    async def main():
        alone = await engine.submit(PROMPTS[0], sp).text()
        mixed = await asyncio.gather(
            engine.submit(PROMPTS[0], sp).text(),
            engine.submit(PROMPTS[0], GREEDY).text(),
            *[engine.submit(PROMPTS[0], sp.model_copy(update={"seed": s})).text() for s in range(5)],
        )
        return alone, mixed

    alone, mixed = run(main())
    assert mixed[0] == alone
    assert len(set(mixed[2:]) | {alone}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_lm, engine):
    want = generate(tiny_lm, PROMPTS[1], GREEDY)[len(PROMPTS[1]):]

    async def main():
        return await asyncio.gather(
            engine.submit(PROMPTS[1], GREEDY.model_copy(update={"temperature": 1.0, "top_k": 1, "seed": 1})).text(),
            engine.submit(PROMPTS[1], GREEDY.model_copy(update={"temperature": 1.0, "top_p": 1e-6, "seed": 2})).text(),
        )

    assert run(main()) == [want, want]


def test_finish_reasons_token_counts_and_ignore_eos(engine):
    async def main():
        s = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=40, seed=3), ignore_eos=True)
        chunks = [c async for c in s]
        return s, chunks

    s, chunks = run(main())
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert s.completion_tokens == 40 and s.prompt_tokens == len(engine.encode(PROMPTS[0]))


def test_cancel_frees_the_slot_at_once(tiny_lm):
    eng = Engine(tiny_lm, max_batch_size=1, queue_size=4).start()
    try:
        async def main():
            long = eng.submit(PROMPTS[0], SamplingParams(max_new_tokens=200), ignore_eos=True)
            waiting = eng.submit(PROMPTS[1], GREEDY)
            first = await long.__aiter__().__anext__()
            assert first.text and eng.batch_size == 1 and eng.queue_depth == 1
            long.cancel()
            text = await asyncio.wait_for(waiting.text(), 30)
            return text, long

        text, long = run(main())
        assert text and long.completion_tokens < 200
        for _ in range(100):  # the worker drops the finished row right after its last chunk
            if eng.batch_size == 0:
                break
            time.sleep(0.05)
        assert eng.batch_size == 0 and eng.queue_depth == 0
    finally:
        eng.stop()


def test_full_queue_and_too_long_prompt_are_refused(tiny_lm):
    eng = Engine(tiny_lm, max_batch_size=1, queue_size=1)  # not started: nothing leaves the queue

    async def main():
        eng.submit(PROMPTS[0], GREEDY)
        with pytest.raises(OverloadedError, match="queue size 1"):
            eng.submit(PROMPTS[0], GREEDY)
        with pytest.raises(InvalidRequestError, match=r"prompt has \d+ tokens and max_tokens is 250.*256"):
            eng.submit("Data science is " * 20, SamplingParams(max_new_tokens=250))
        with pytest.raises(InvalidRequestError, match="empty"):
            eng.submit("", GREEDY)

    run(main())


def test_bfloat16_serving_stays_close_to_float32(tiny_lm):
    """An engine serving in bf16 (the CLI's choice where the CPU multiplies bf16 faster) runs
    the same forward on half-size weights: its greedy text starts like float32's."""
    eng = Engine(tiny_lm, max_batch_size=4, dtype=torch.bfloat16).start()
    try:
        async def main():
            return await asyncio.gather(*[eng.submit(q, GREEDY.model_copy(update={"max_new_tokens": 4})).text()
                                          for q in PROMPTS])

        texts = run(main())
    finally:
        eng.stop()
    assert eng.forward.dtype == torch.bfloat16 and eng.info()["dtype"] == "bfloat16"
    assert all(texts)


def test_an_engine_whose_build_fails_half_way_refuses_requests_with_a_clear_error(tiny_lm, monkeypatch):
    """A failure after the forward exists (here the warm-up) must not leave a half-built engine
    that then fails each request with an internal TypeError."""
    from wikigpt.errors import EngineError

    def boom(self):
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr(Engine, "_warm_up", boom)
    engine = Engine(tiny_lm, max_batch_size=2, queue_size=2, quantization="int8").start()
    try:
        assert engine.ready.wait(60)

        async def complete():
            return await engine.submit("Data science is", SamplingParams(max_new_tokens=2)).text()

        with pytest.raises(EngineError, match="could not be prepared"):
            asyncio.run(complete())
    finally:
        engine.stop()
