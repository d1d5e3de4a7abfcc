"""Token log-probabilities through `serve --upstream`: the gateway forwards `logprobs`/`echo`
(and `max_tokens: 0`) to a real `wikigpt serve` subprocess and relays its scores; what a
client gets through the gateway equals what it gets from the upstream directly."""

from __future__ import annotations

import httpx
import pytest

from tests.test_gateway import gw, scored_both_ways, upstream  # noqa: F401 - gw, upstream: fixtures

TEXT = "Data science is an interdisciplinary field that uses statistics"


def both(gw, upstream, body: dict) -> tuple[dict, dict]:
    answers = []
    for url in (gw.url, upstream.url):
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return answers[0], answers[1]


def test_scores_through_the_gateway_equal_the_upstream_s(gw, upstream, tiny_lm):
    ids = tiny_lm.tokenizer(TEXT)["input_ids"]
    greedy = {"temperature": 0, "repetition_penalty": 1.0, "ignore_eos": True}
    for body in ({"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 3},  # score a text
                 {"prompt": [ids, ids[:5]], "max_tokens": 1, "echo": True, "logprobs": 1, **greedy},  # lm-eval's
                 {"prompt": TEXT, "max_tokens": 5, "logprobs": 2, **greedy}):  # generated tokens only
        via, direct = both(gw, upstream, body)
        for a, b in zip(via["choices"], direct["choices"], strict=True):
            assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
            assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"]
            assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-5)
            for x, y in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
                assert (x is None and y is None) or x == pytest.approx(y, abs=1e-5)
    assert via["choices"][0]["logprobs"]["text_offset"][0] == 0


def test_streamed_echo_with_scores_through_the_gateway(gw, upstream):
    model = httpx.get(gw.url + "/v1/models").json()["data"][0]["id"]
    sent, whole, text, tokens, values = scored_both_ways(
        gw, model=model, prompt=TEXT, max_tokens=4, echo=True, logprobs=2, temperature=0,
        extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
    assert [b["stream"] for b in sent] == [False, True]  # the whole answer: one upstream JSON
    assert text == whole.text and text.startswith(TEXT)
    assert tokens == whole.logprobs.tokens and values[0] is None
    assert values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)
