"""Token log-probabilities from the engine equal a direct forward pass of the same model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from wikigpt.engine import Engine
from wikigpt.errors import InvalidRequestError
from wikigpt.decoding import SamplingParams

PROMPT = "The history of the Roman Empire covers"


@pytest.fixture()
def engine(tiny_lm):
    eng = Engine(tiny_lm, max_batch_size=4).start()
    yield eng
    eng.stop()


def collect(engine, prompt, params, **kw):
    async def main():
        return [c async for c in engine.submit(prompt, params, **kw)]

    return asyncio.run(asyncio.wait_for(main(), 60))


def reference(lm, ids):
    """log_softmax of transformers' logits: row i scores the token after ids[:i + 1]."""
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_generated_and_prompt_logprobs_equal_a_direct_forward(tiny_lm, engine):
    params = SamplingParams(max_new_tokens=8, seed=5, repetition_penalty=1.3, temperature=0.9)
    chunks = collect(engine, PROMPT, params, logprobs=3, echo=True, ignore_eos=True)
    prompt_ids = engine.encode(PROMPT)
    scored = [t for c in chunks for t in c.logprobs]
    gen_ids = [t.token_id for t in scored]
    assert len(scored) == 8 == chunks[-1].completion_tokens
    ref = reference(tiny_lm, prompt_ids + gen_ids)
    # the raw distribution: before the penalty and temperature that chose the tokens
    want = ref[len(prompt_ids) - 1:-1].gather(1, torch.tensor(gen_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in scored]), want, rtol=1e-4, atol=1e-4)
    top = ref[len(prompt_ids) - 1].topk(3)
    assert [v for _, v in scored[0].top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [text for text, _ in scored[0].top] == [tiny_lm.tokenizer.decode([i]) for i in top.indices.tolist()]
    prompt_scores = chunks[0].prompt_logprobs
    assert prompt_scores[0] is None and len(prompt_scores) == len(prompt_ids)
    want = ref[:len(prompt_ids) - 1].gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in prompt_scores[1:]]), want, rtol=1e-4, atol=1e-4)
    assert all(c.prompt_logprobs is None for c in chunks[1:])


def test_score_only_generates_nothing_and_plain_requests_carry_no_scores(tiny_lm, engine):
    chunks = collect(engine, PROMPT, SamplingParams(max_new_tokens=5), score_only=True)
    assert len(chunks) == 1 and chunks[0].text == "" and chunks[0].finish_reason == "length"
    assert chunks[0].completion_tokens == 0 and len(chunks[0].prompt_logprobs) == len(engine.encode(PROMPT))
    plain = collect(engine, PROMPT, SamplingParams(max_new_tokens=5, seed=1), echo=True)
    assert all(c.logprobs == [] and c.prompt_logprobs is None for c in plain)


def test_logprobs_out_of_range_is_refused(engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="logprobs") as exc:
            engine.submit(PROMPT, SamplingParams(), logprobs=21)
        assert exc.value.param == "logprobs"

    asyncio.run(main())


def test_an_eos_that_ends_the_output_keeps_its_score(tiny_lm):
    """lm-eval reads one generated score after the prompt; when that token is EOS it must be
    there (as vLLM returns it), with no text. EOS is made the certain choice by lifting its
    logit in the LM head, the only part of the model this test changes."""
    eng = Engine(tiny_lm, max_batch_size=2).start()
    try:
        eng.ready.wait(60)
        head = eng.forward.head
        eng.forward.head = lambda x: head(x).index_add_(
            1, torch.tensor([eng.eos_id]), torch.full((x.shape[0], 1), 50.0, dtype=x.dtype))
        chunks = collect(eng, PROMPT, SamplingParams(max_new_tokens=4, temperature=0.0), logprobs=1, echo=True)
    finally:
        eng.stop()
    scored = [t for c in chunks for t in c.logprobs]
    assert chunks[-1].finish_reason == "stop" and "".join(c.text for c in chunks) == ""
    assert [t.token_id for t in scored] == [eng.eos_id] and scored[0].text == ""
    assert scored[0].logprob > -1e-3 and len(chunks[0].prompt_logprobs) == len(eng.encode(PROMPT))
