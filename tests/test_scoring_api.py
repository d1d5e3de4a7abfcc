"""Token log-probabilities through the real API: the `openai` client with `logprobs`/`echo`
against a real uvicorn server on the fp32 tiny model, numbers equal to a direct forward pass,
bad values refused naming the field, and `wikigpt score` printing the same numbers."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from tests.test_api import LiveServer
from wikigpt.cli import main as cli_main

TEXT = "Data science is an interdisciplinary field that uses statistics and algorithms"


@pytest.fixture(scope="module")
def server(tiny_lm):
    srv = LiveServer(tiny_lm)  # the loaded dtype: float32, like the reference below
    yield srv
    srv.close()


@pytest.fixture()
def oc(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(lm, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits: row i is the distribution after ids[:i + 1]."""
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_scores_the_prompt_as_a_direct_forward_pass(oc, tiny_lm):
    model = oc.models.list().data[0].id
    c = oc.completions.create(model=model, prompt=TEXT, max_tokens=0, echo=True, logprobs=3)
    ch = c.choices[0]
    ids = tiny_lm.tokenizer(TEXT)["input_ids"]
    lp = ch.logprobs
    assert ch.text == TEXT and ch.finish_reason == "length"
    assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == 0
    assert lp.tokens == [tiny_lm.tokenizer.decode([i]) for i in ids] and "".join(lp.tokens) == TEXT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    ref = reference(tiny_lm, ids)
    want = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), want, rtol=1e-4, atol=1e-4)
    for i in range(1, len(ids)):
        best = ref[i - 1].topk(3)
        top = lp.top_logprobs[i]
        want_top = {tiny_lm.tokenizer.decode([j]): v for j, v in zip(best.indices.tolist(), best.values.tolist())}
        want_top[lp.tokens[i]] = lp.token_logprobs[i]  # the chosen token is always named
        assert top.keys() == want_top.keys()
        assert list(top.values()) == pytest.approx(list(want_top.values()), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_generated_tokens_scored_in_answers_and_streams_alike(oc, tiny_lm):
    """Greedy without a penalty picks each step's most likely token, so a direct forward pass
    predicts both the tokens and their log-probabilities."""
    prompt = "The history of the Roman Empire"
    args = dict(model=oc.models.list().data[0].id, prompt=prompt, max_tokens=6, temperature=0,
                extra_body={"repetition_penalty": 1.0, "ignore_eos": True}, logprobs=2)
    whole = oc.completions.create(**args).choices[0]
    ids = tiny_lm.tokenizer(prompt)["input_ids"]
    want_ids, want_lp = [], []
    for _ in range(6):
        row = reference(tiny_lm, ids + want_ids)[-1]
        want_ids.append(int(row.argmax()))
        want_lp.append(float(row.max()))
    lp = whole.logprobs
    assert lp.tokens == [tiny_lm.tokenizer.decode([i]) for i in want_ids]
    assert lp.token_logprobs == pytest.approx(want_lp, abs=1e-4)
    assert all(v == max(top.values()) for v, top in zip(lp.token_logprobs, lp.top_logprobs))  # greedy
    assert lp.text_offset[0] == 0  # no echo: offsets count from the completion's start

    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    text = ""
    for chunk in oc.completions.create(**args, stream=True, echo=True):
        for ch in chunk.choices:
            text += ch.text
            for key in streamed:
                streamed[key] += getattr(ch.logprobs, key)
    assert text == prompt + whole.text
    n = len(ids)
    assert streamed["tokens"] == [tiny_lm.tokenizer.decode([i]) for i in ids] + lp.tokens
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][n:] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert streamed["text_offset"] == [sum(len(t) for t in streamed["tokens"][:i]) for i in range(n + 6)]


def test_token_id_prompts_as_lm_eval_sends_them(oc, tiny_lm):
    """lm-eval's local-completions: token ids, echo, max_tokens 1, logprobs 1, several prompts."""
    a, b = tiny_lm.tokenizer(TEXT)["input_ids"], tiny_lm.tokenizer("Wikipedia is free")["input_ids"]
    c = oc.completions.create(model=oc.models.list().data[0].id, prompt=[a, b], max_tokens=1, echo=True,
                              logprobs=1, temperature=0, extra_body={"ignore_eos": True})
    for ch, ids in zip(sorted(c.choices, key=lambda ch: ch.index), (a, b)):
        assert len(ch.logprobs.token_logprobs) == len(ids) + 1
        want = reference(tiny_lm, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert ch.logprobs.token_logprobs[1:len(ids)] == pytest.approx(want.tolist(), abs=1e-4)


@pytest.mark.parametrize("body, param, words", [
    ({"logprobs": 99}, "logprobs", "less than or equal to 20"),
    ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ({"logprobs": "5"}, "logprobs", "valid integer"),
    ({"max_tokens": 0}, "max_tokens", "only allowed with echo"),
    ({"max_tokens": -1, "echo": True}, "max_tokens", "greater than or equal to 0"),
])
def test_bad_values_are_400_naming_the_field(oc, body, param, words):
    with pytest.raises(openai.BadRequestError) as exc:
        oc.completions.create(model=oc.models.list().data[0].id, prompt="Data science", extra_body=body)
    err = exc.value.body
    assert exc.value.status_code == 400 and err["param"] == param and words in err["message"], err
    assert param in err["message"]


def test_cli_score_prints_the_table_perplexity_and_bits_per_byte(server, oc, tiny_lm, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert cli_main(["score", str(path), "--api-url", server.url, "--top-logprobs", "2", "--plain"]) == 0
    out = capsys.readouterr().out
    ids = tiny_lm.tokenizer(TEXT)["input_ids"]
    ref = reference(tiny_lm, ids)
    lps = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    ppl = math.exp(-sum(lps) / len(lps))
    bpb = -sum(lps) / (math.log(2) * len(TEXT[len(tiny_lm.tokenizer.decode([ids[0]])):].encode()))
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["#", "token", "p", "surprise"]
    assert len(lines) == 1 + len(ids) + 1
    assert lines[2].split()[0] == "1" and repr(tiny_lm.tokenizer.decode([ids[1]])) in lines[2]
    assert f"{math.exp(lps[0]):.3f}" in lines[2] and f"{-lps[0] / math.log(2):.2f}" in lines[2]
    assert f"perplexity {ppl:,.2f}" in lines[-1] and f"{bpb:.3f} bits per byte" in lines[-1]

    assert cli_main(["score", "unused", "--api-url", "http://127.0.0.1:9", "--connect-timeout", "2"]) == 1
    assert "Cannot reach the backend" in capsys.readouterr().err
