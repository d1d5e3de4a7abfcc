"""`POST /v1/chat/completions` for a base model, with the official openai client's chat API,
streamed and not, on the engine and through the gateway (which renders the transcript here
and sends it upstream as a completion)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.test_gateway import served
from wikigpt.api.chat import render
from wikigpt.generation import generate
from wikigpt.decoding import SamplingParams

MESSAGES = [{"role": "system", "content": "You answer questions about Wikipedia."},
            {"role": "user", "content": "What is data science?"},
            {"role": "assistant", "content": "A field that extracts knowledge from data."},
            {"role": "user", "content": [{"type": "text", "text": "And the Roman Empire?"}]}]
TRANSCRIPT = ("You answer questions about Wikipedia.\n\nUser: What is data science?\n"
              "Assistant: A field that extracts knowledge from data.\nUser: And the Roman Empire?\nAssistant:")


@pytest.fixture(scope="module", params=["engine", "gateway"])
def url(request, tiny_lm, tiny_model_dir):
    with served(request.param, tiny_lm, tiny_model_dir) as url:
        yield url


def test_a_base_model_gets_the_plain_transcript():
    class NoTemplate:
        chat_template = None

    assert render(MESSAGES, NoTemplate()) == (TRANSCRIPT, ["\nUser:"])
    assert render(MESSAGES, None) == (TRANSCRIPT, ["\nUser:"])


def test_a_model_with_a_chat_template_uses_it(tiny_lm):
    import copy

    tok = copy.deepcopy(tiny_lm.tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    prompt, stops = render(MESSAGES[:2], tok)
    assert prompt == "<system>You answer questions about Wikipedia.<user>What is data science?<assistant>" and stops == []


def test_openai_chat_client_whole_and_streamed(url, tiny_lm):
    oc = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = oc.models.list().data[0].id
    args = dict(model=model, messages=MESSAGES, max_tokens=24, temperature=0.0, stop=["Roman"])
    whole = oc.chat.completions.create(**args)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    # the reply is the model's greedy continuation of the transcript, cut at "\nUser:", stripped
    want = generate(tiny_lm, TRANSCRIPT, SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.1,
                                                          stop=["Roman", "\nUser:"]))[len(TRANSCRIPT):].lstrip()
    assert choice.message.content == want
    assert choice.finish_reason in {"stop", "length"}
    assert whole.usage.prompt_tokens == len(tiny_lm.tokenizer.encode(TRANSCRIPT))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(oc.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_n_seed_and_logprobs(url):
    oc = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = oc.models.list().data[0].id
    args = dict(model=model, messages=MESSAGES[1:2], max_tokens=12, seed=7, logprobs=True, top_logprobs=3)
    # one choice each: through the gateway, n choices are n upstream requests that may share a
    # decoding step or not, and the upstream's bf16 numbers depend on the batch
    a, b = oc.chat.completions.create(**args), oc.chat.completions.create(**args)
    assert a.choices[0].message.content == b.choices[0].message.content  # seeded
    two = oc.chat.completions.create(**{**args, "n": 2})
    assert [c.index for c in two.choices] == [0, 1] and two.usage.prompt_tokens == a.usage.prompt_tokens
    lp = a.choices[0].logprobs.content
    # at most 3 alternatives: through the gateway they come from the legacy object, a dict keyed
    # by token text, where two tokens spelled alike (partial characters, "\ufffd") are one entry
    assert lp and all(t.logprob <= 0 and 0 < len(t.top_logprobs) <= 3 for t in lp)
    assert sum(len(t.top_logprobs) == 3 for t in lp) >= len(lp) / 2
    assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in lp if "\ufffd" not in t.token)


def test_bad_chat_requests_are_clear_400s(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        for body, words in [({"messages": []}, "messages"),
                            ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
                            ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                             "only text parts"),
                            ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs logprobs"),
                            ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools: unknown field"),
                            ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, "not served here")]:
            r = c.post("/v1/chat/completions", json=body)
            assert 400 <= r.status_code < 500, (body, r.text)
            assert words in r.json()["error"]["message"], (words, r.json())
