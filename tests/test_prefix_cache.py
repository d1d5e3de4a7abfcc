"""Prefix caching: a prompt starts from the longest prefix a batch slot holds. With caching on,
every answer must equal caching off (greedy text exactly, scores within float rounding), and
the cache must stay inside its preallocated buffers."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest
import torch

from tests.conftest import require
from tests.test_api import LiveServer, metric
from wikigpt.engine import Engine
from wikigpt.engine.kv_cache import SlotKVCache
from wikigpt.decoding import SamplingParams

TEXT = ("The history of the Roman Empire covers the history of ancient Rome from the fall of the "
        "Roman Republic in 27 BC until the abdication of Romulus Augustulus in AD 476 in the West.")
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def answer(engine, prompt, params=GREEDY, **kw):
    """(text, cached tokens, generated tokens' logprobs, prompt logprobs) of one request."""
    stream = engine.submit(prompt, params, **kw)
    chunks = [c async for c in stream]
    scores = [t.logprob for c in chunks for t in c.logprobs]
    prompt_scores = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs), None)
    return "".join(c.text for c in chunks), stream.cached_tokens, scores, prompt_scores


@pytest.fixture(scope="module")
def engines(tiny_lm):
    on = Engine(tiny_lm, max_batch_size=4, queue_size=64).start()
    off = Engine(tiny_lm, max_batch_size=4, queue_size=64, prefix_caching=False).start()
    assert on.ready.wait(60) and off.ready.wait(60)
    yield on, off
    on.stop()
    off.stop()


def test_the_flag_and_info(engines):
    on, off = engines
    assert on.info()["prefix_caching"] is True and off.info()["prefix_caching"] is False
    assert run(answer(off, TEXT))[1] == run(answer(off, TEXT))[1] == 0


# split points in characters: inside a word (a prefix that ends inside a token's bytes), at a
# word boundary, the whole text (the same prompt again), and a prompt that is a prefix of the
# cached one (turn 2 shorter than turn 1)
@pytest.mark.parametrize("split", [23, 47, 60, len(TEXT), -40])
def test_a_growing_conversation_equals_caching_off(engines, split):
    on, off = engines
    on.forward.cache.forget()
    first, second = (TEXT[:split], TEXT) if split > 0 else (TEXT, TEXT[:split])
    logprobs = {"logprobs": 2}
    run(answer(on, first, **logprobs))
    text, cached, scores, _ = run(answer(on, second, **logprobs))
    want, _, want_scores, _ = run(answer(off, second, **logprobs))
    assert text == want
    assert scores == pytest.approx(want_scores, abs=1e-4)
    ids_first, ids_second = on.encode(first), on.encode(second)
    shared = next((i for i, (a, b) in enumerate(zip(ids_first, ids_second)) if a != b), min(map(len, (ids_first, ids_second))))
    assert cached == min(shared, len(ids_second) - 1) > 0  # all of the shared ids but the last prompt token


def test_a_turn_also_reuses_the_generated_tokens(engines):
    """Turn 2 = turn 1's prompt + its answer + more: the answer's keys were cached too."""
    on, off = engines
    on.forward.cache.forget()
    reply = run(answer(on, TEXT[:60]))[0]
    ids = on.encode(TEXT[:60]) + on.encode(reply)  # the ids the slot held, whatever BPE would re-merge
    ids += on.encode(" and then")
    text, cached, _, _ = run(answer(on, ids))
    assert text == run(answer(off, ids))[0]
    assert cached >= len(on.encode(TEXT[:60])) + len(on.encode(reply)) - 2


def test_n_copies_of_one_prompt_in_a_batch_prefill_it_once(engines):
    on, off = engines
    on.forward.cache.forget()
    n = len(on.encode(TEXT))
    sampled = SamplingParams(max_new_tokens=8, seed=5)

    async def batch(engine):
        streams = [engine.submit(TEXT, sampled) for _ in range(4)]  # admitted in one step
        return [await s.text() for s in streams], [s.cached_tokens for s in streams]

    texts, cached = run(batch(on))
    assert sum(n - c for c in cached) == n + 3  # computed once, then only the last token of each copy
    assert sorted(cached) == [0, n - 1, n - 1, n - 1]
    assert texts == run(batch(off))[0]


@pytest.mark.parametrize("together", [False, True])
def test_scoring_one_context_with_several_continuations(engines, together):
    """lm-eval's multiple choice: echo + logprobs, one context, four continuations; the context's
    scores come from the cache (sequentially, or from the first of one batch)."""
    on, off = engines
    on.forward.cache.forget()
    prompts = [TEXT + end for end in (" It was", " The end.", " Rome fell", " So it goes.")]

    async def score(engine):
        if together:
            streams = [engine.submit(p, GREEDY, logprobs=1, score_only=True) for p in prompts]
            out = []
            for s in streams:
                chunks = [c async for c in s]
                out.append((s.cached_tokens, chunks[0].prompt_logprobs))
            return out
        return [(c, lp) for _, c, _, lp in [await answer(engine, p, logprobs=1, score_only=True) for p in prompts]]

    got, want = run(score(on)), run(score(off))
    assert [c for c, _ in got][1:] == [len(on.encode(TEXT)) - 1] * 3
    for (_, a), (_, b) in zip(got, want):
        assert [t.token_id for t in a[1:]] == [t.token_id for t in b[1:]]
        assert [t.logprob for t in a[1:]] == pytest.approx([t.logprob for t in b[1:]], abs=1e-4)
        assert [[x for x, _ in t.top] for t in a[1:]] == [[x for x, _ in t.top] for t in b[1:]]


def test_int8_with_caching_equals_int8_without(tiny_lm, monkeypatch):
    """Int8 products where a row's numbers never depend on its batch (our kernel at every row
    count), so caching must change nothing but rounding."""
    from wikigpt import quantize

    why = quantize.unavailable() or quantize.backends().q8_why
    require(not why, f"wikigpt's int8 kernel does not run here ({why})")
    real = quantize.backends()
    monkeypatch.setattr(quantize, "backends", lambda: dataclasses.replace(real, q8_rows=1 << 30))
    on = Engine(tiny_lm, max_batch_size=2, quantization="int8").start()
    off = Engine(tiny_lm, max_batch_size=2, quantization="int8", prefix_caching=False).start()
    try:
        run(answer(on, TEXT[:50], logprobs=1))
        text, cached, scores, _ = run(answer(on, TEXT, logprobs=1))
        want, _, want_scores, _ = run(answer(off, TEXT, logprobs=1))
        assert on.info()["quantization"] == "int8" and cached > 0
        assert text == want and scores == pytest.approx(want_scores, abs=1e-4)
    finally:
        on.stop()
        off.stop()


def test_a_remembered_slot_below_a_running_one_keeps_its_keys(engines):
    """A free slot below the highest running one rides along in decoding steps as a dummy row;
    its remembered keys must stay as they were (a dummy row writing its position 0 broke them)."""
    on, off = engines
    on.forward.cache.forget()
    short, long = TEXT[:70], "Wikipedia is a free encyclopedia " * 3

    async def pair():  # the short one ends in slot 0 while the long one decodes on in slot 1
        # 16 tokens: the short one is still running when the long one is admitted, even on a
        # loaded machine (with 4 it could finish first and leave slot 0 to the long one)
        a = on.submit(short, GREEDY.model_copy(update={"max_new_tokens": 16}), ignore_eos=True).__aiter__()
        await a.__anext__()  # running in slot 0: the long one takes slot 1
        b = on.submit(long, GREEDY.model_copy(update={"max_new_tokens": 40}), ignore_eos=True)
        return [c async for c in a], await b.text()

    run(pair())
    held, n = len(on.forward.cache.held[0]), len(on.encode(short))
    run(answer(off, short, GREEDY.model_copy(update={"max_new_tokens": 1})))  # off's slot 0: the same keys, fresh
    # compared directly: the tiny random model's attention is so flat that one wrong key moves
    # its logprobs by less than 1e-6
    assert held > n and on.forward.cache.held[1][:len(on.encode(long))] == on.encode(long)
    assert torch.allclose(on.forward.cache.kv[:, :, 0, :, :n], off.forward.cache.kv[:, :, 0, :, :n], atol=1e-5)
    follow_up = short + " and"
    text, cached, _, _ = run(answer(on, follow_up))
    assert cached > 0 and text == run(answer(off, follow_up))[0]


def test_memory_stays_in_the_slots_and_the_least_recently_used_is_forgotten(tiny_lm):
    engine = Engine(tiny_lm, max_batch_size=2).start()
    try:
        engine.ready.wait(60)
        cache = engine.forward.cache
        buffers = [(t.data_ptr(), t.shape) for t in cache.keys + cache.values]
        a, b, c = (TEXT, "Data science is the study of data " * 3, "Wikipedia is a free encyclopedia " * 3)
        for prompt in (a, b, c):  # three conversations, two slots: a is the least recently used
            run(answer(engine, prompt))
        assert run(answer(engine, b + " more"))[1] > 0
        assert run(answer(engine, c + " more"))[1] > 0
        assert run(answer(engine, a + " more"))[1] == 0
        assert [(t.data_ptr(), t.shape) for t in cache.keys + cache.values] == buffers
        assert len(cache.held) == 2 and all(len(h) <= cache.keys[0].shape[2] for h in cache.held)
    finally:
        engine.stop()


def test_slot_cache_copies_the_longest_prefix_into_the_lowest_free_slot():
    cache = SlotKVCache(1, 3, 1, 16, 2, torch.float32, torch.device("cpu"))
    s0 = cache.allocate()
    cache.keys[0][s0, 0, :4] = torch.arange(8.).view(4, 2)
    cache.lengths[s0] = 4
    cache.remember(s0, [1, 2, 3, 4])
    cache.release(s0, [1, 2, 3, 4, 9])  # lengths (4) bound what it holds
    assert cache.held[s0] == [1, 2, 3, 4]
    slot, n = cache.allocate_for([1, 2, 3, 7])
    assert (slot, n) == (0, 3) and cache.lengths[0] == 3  # in place: the lowest free slot held it
    other = cache.allocate()  # slot 1, empty
    cache.release(slot, [1, 2, 3])
    slot, n = cache.allocate_for([1, 2, 9])  # slot 0 is free again and holds [1, 2, 3]
    assert (slot, n) == (0, 2)
    assert torch.equal(cache.keys[0][0, 0, :2], torch.arange(4.).view(2, 2))
    cache.release(other)
    assert cache.held[other] == []


def test_usage_metrics_and_root_report_cached_tokens(tiny_lm):
    srv = LiveServer(tiny_lm)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get("/").json()["prefix_caching"] is True
            body = {"prompt": TEXT, "max_tokens": 4, "temperature": 0}
            first = c.post("/v1/completions", json=body).json()["usage"]
            again = c.post("/v1/completions", json=body).json()["usage"]
            n = first["prompt_tokens"]
            assert first["prompt_tokens_details"]["cached_tokens"] == 0
            assert again["prompt_tokens_details"]["cached_tokens"] == n - 1
            chat = {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 4, "temperature": 0}
            c.post("/v1/chat/completions", json=chat)
            chat_usage = c.post("/v1/chat/completions", json=chat).json()["usage"]
            assert chat_usage["prompt_tokens_details"]["cached_tokens"] == chat_usage["prompt_tokens"] - 1
            usage = None
            with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        usage = httpx.Response(200, content=line[6:]).json().get("usage") or usage
            assert usage["prompt_tokens_details"]["cached_tokens"] == n - 1
            text = c.get("/metrics").text
            assert metric(text, "wikigpt_prompt_tokens_cached_total") >= 3 * (n - 1)
            assert metric(text, "wikigpt_prompt_tokens_computed_total") + metric(
                text, "wikigpt_prompt_tokens_cached_total") == metric(text, "wikigpt_prompt_tokens_total")
    finally:
        srv.close()
