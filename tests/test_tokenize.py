"""vLLM's /tokenize and /detokenize, and its `root`/`max_model_len` model-card fields, on the
engine and through the gateway (which forwards them to its upstream), compared with the
tokenizer itself."""

from __future__ import annotations

import httpx
import pytest

from tests.test_gateway import served

TEXTS = ["Data Science is", " The history of the Roman Empire\n\n", "naïve café ☕", ""]


@pytest.fixture(scope="module", params=["engine", "gateway"])
def url(request, tiny_lm, tiny_model_dir):
    with served(request.param, tiny_lm, tiny_model_dir) as url:
        yield url


def test_tokenize_and_detokenize_match_the_tokenizer(url, tiny_lm):
    tok = tiny_lm.tokenizer
    with httpx.Client(base_url=url, timeout=30) as c:
        for text in TEXTS:
            r = c.post("/tokenize", json={"prompt": text, "return_token_strs": True})
            assert r.status_code == 200, r.text
            ids = tok.encode(text)
            assert r.json() == {"count": len(ids), "max_model_len": tiny_lm.context_length, "tokens": ids,
                                "token_strs": tok.convert_ids_to_tokens(ids)}
            back = c.post("/detokenize", json={"tokens": ids})
            assert back.status_code == 200 and back.json() == {"prompt": tok.decode(ids)}
        plain = c.post("/tokenize", json={"prompt": "Data"}).json()
        assert plain["token_strs"] is None and plain["tokens"] == tok.encode("Data")
        # the original contract's body style: no Content-Type
        assert c.post("/tokenize", content=b'{"prompt":"Data"}').json()["tokens"] == tok.encode("Data")


def test_bad_tokenize_requests_are_clear_400s(url, tiny_lm):
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, body, words in [("/tokenize", {}, "prompt: field required"),
                                  ("/tokenize", {"prompt": 5}, "prompt"),
                                  ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "not served here"),
                                  ("/detokenize", {"tokens": [10**9]}, "token ids must be in"),
                                  ("/detokenize", {"tokens": "abc"}, "tokens"),
                                  ("/tokenize", b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate")]:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.post(path, **kw)
            assert 400 <= r.status_code < 500, (path, body, r.text)
            assert words in r.json()["error"]["message"], (words, r.json())


def test_models_card_has_vllms_root_and_max_model_len(url, tiny_lm, tiny_model_dir):
    card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
    assert card["max_model_len"] == tiny_lm.context_length == card["context_length"]
    assert card["root"] == str(tiny_model_dir)  # the gateway passes on its upstream's root
