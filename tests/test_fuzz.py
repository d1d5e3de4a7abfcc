"""Property-based: arbitrary JSON in every field of every route that reads a body, in both
serving modes (the engine, and the gateway in front of a real upstream), never gets a 5xx, and
the server answers normally afterwards. Values include lone UTF-16 surrogates, huge and
negative numbers, NaN spelled out, nesting, wrong types and unknown fields."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_gateway import served
from wikigpt.api.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, PredictRequest, TokenizeRequest

# every route that reads a body: its schema and a valid body each odd value is put into
ROUTES = {"/predict": (PredictRequest, {"text": "Data science is", "max_new_tokens": 4}),
          "/v1/completions": (CompletionRequest, {"prompt": "Data science is", "max_tokens": 4}),
          "/v1/chat/completions": (ChatRequest, {"messages": [{"role": "user", "content": "Data science is"}],
                                                 "max_tokens": 4}),
          "/tokenize": (TokenizeRequest, {"prompt": "Data science is"}),
          "/detokenize": (DetokenizeRequest, {"tokens": [1, 2, 3]})}

# surrogates (U+D800-U+DFFF) are valid in JSON's \\u escapes and in a Python str, not in UTF-8
surrogate_rich = st.characters(min_codepoint=0xD700, max_codepoint=0xE100, exclude_categories=())
text = st.one_of(st.text(max_size=40), st.text(surrogate_rich, min_size=1, max_size=4),
                 st.sampled_from(["\x00", "<|endoftext|>", " " * 50]))
numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.integers(-3, 300))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(text, inner, max_size=3)), max_leaves=12)


def bodies(route: str) -> st.SearchStrategy[str]:
    """A valid body with one or two fields (any of the schema's, or an unknown one) set to an
    arbitrary value, so each odd value reaches as far into the server as it can; and raw texts."""
    schema, base = ROUTES[route]
    required = next(iter(base))
    names = st.one_of(st.sampled_from(sorted(schema.model_fields)), text)
    edits = st.one_of(st.dictionaries(names, st.one_of(scalars, values), min_size=1, max_size=2),
                      st.builds(lambda v: {required: v}, st.one_of(text, values)))  # the prompt most of all
    raw = st.sampled_from(['{"text": NaN}', '{"prompt": "a", "max_tokens": Infinity}', "[", "null", '"x"',
                           '{"prompt": ' + "[" * 200 + "]" * 200 + "}"])
    return st.one_of(st.builds(lambda e: json.dumps({**base, **e}), edits), raw)


@pytest.fixture(scope="module", params=["engine", "gateway"])
def url(request, tiny_lm, tiny_model_dir):
    with served(request.param, tiny_lm, tiny_model_dir, max_body_bytes=100_000) as url:
        yield url


@pytest.mark.parametrize("route", list(ROUTES))
def test_arbitrary_bodies_never_get_a_5xx(url, route):
    with httpx.Client(base_url=url, timeout=60) as c:

        @settings(max_examples=200, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(bodies(route))
        def check(body: str) -> None:
            r = c.post(route, content=body.encode("utf-8", "surrogatepass"))
            assert r.status_code < 500, (body, r.status_code, r.text)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert err["message"] and "Traceback" not in r.text

        check()
        assert c.get("/health").status_code == 200
        assert c.post("/predict", json={"text": "still alive", "max_new_tokens": 3}).status_code == 200
