"""The surprise math (scoring.py) and the legacy logprobs object (api/logprobs.py) on numbers
worked by hand."""

from __future__ import annotations

import math

import pytest

from wikigpt.api.logprobs import logprobs_object, prompt_scores, split_echo
from wikigpt.outputs import TokenLogprob
from wikigpt.scoring import Scored, paragraphs, shade, surprise_delta

LN2 = math.log(2)


def test_perplexity_bits_per_byte_and_surprise_by_hand():
    # p = 1/2 and 1/8 for " is" and " fun" after "Data": 1 and 3 bits, 4 bits over 7 bytes
    obj = {"tokens": ["Data", " is", " fun"], "token_logprobs": [None, -LN2, -3 * LN2],
           "top_logprobs": [None, {" is": -LN2, " was": -2 * LN2}, {" a": -LN2, " fun": -3 * LN2}],
           "text_offset": [0, 4, 7]}
    s = Scored.from_openai(obj, "m", top_n=1)
    assert s.tokens[0].surprise is None and s.tokens[1].surprise == pytest.approx(1.0)
    assert s.tokens[2].surprise == pytest.approx(3.0) and s.tokens[2].p == pytest.approx(0.125)
    assert s.tokens[2].top == [(" a", -LN2)]  # best first, cut to top_n
    assert s.n_bytes == len(" is fun") == 7
    assert s.perplexity == pytest.approx(2 ** 2)  # exp(mean nats) = 2 ** mean bits = 2 ** 2
    assert s.bits_per_byte == pytest.approx(4 / 7)
    assert "perplexity 4.00" in s.summary() and "0.571 bits per byte" in s.summary()
    with pytest.raises(ValueError, match="differ in length"):
        Scored.from_openai({"tokens": ["a"], "token_logprobs": [], "top_logprobs": []})


def test_difference_needs_the_same_tokens_and_shading_is_bounded():
    a = Scored.from_openai({"tokens": ["x", "y"], "token_logprobs": [None, -LN2], "top_logprobs": [None, {}]})
    b = Scored.from_openai({"tokens": ["x", "y"], "token_logprobs": [None, -4 * LN2], "top_logprobs": [None, {}]})
    assert surprise_delta(a, b) == [None, pytest.approx(3.0)]
    with pytest.raises(ValueError, match="different tokens"):
        surprise_delta(a, Scored.from_openai({"tokens": ["xy"], "token_logprobs": [None], "top_logprobs": [None]}))
    assert (shade(None), shade(0.0), shade(8.0), shade(99.0)) == (0.0, 0.0, 0.5, 1.0)


def test_wikitext_paragraphs_skip_headings_blanks_and_long_ones():
    raw = " = Title = \n \n First paragraph .\n = = Part = = \n" + " long" * 50 + "\n Second one .\n"
    assert paragraphs(raw, max_chars=40) == ["First paragraph .", "Second one ."]
    assert paragraphs(raw, limit=1) == ["First paragraph ."]


def test_logprobs_object_names_the_chosen_token_and_counts_offsets():
    scores = [None, TokenLogprob(" is", -1.0, [(" was", -0.5)]), TokenLogprob(" fun", -2.0, [(" fun", -2.0)])]
    full = prompt_scores("Data is fun", scores)
    obj, end = logprobs_object(full, 0)
    assert obj == {"tokens": ["Data", " is", " fun"], "token_logprobs": [None, -1.0, -2.0],
                   "top_logprobs": [None, {" was": -0.5, " is": -1.0}, {" fun": -2.0}], "text_offset": [0, 4, 7]}
    assert end == 11 and logprobs_object([TokenLogprob("!", -3.0)], end)[0]["text_offset"] == [11]


def test_split_echo_of_an_upstream_s_first_event():
    scores = [TokenLogprob("Data", None), TokenLogprob(" is", -1.0), TokenLogprob(" fun", -2.0)]
    prompt, text, rest = split_echo("Data is", "Data is fun", scores, [0, 4, 7])
    assert [s.text for s in prompt] == ["Data", " is"] and text == " fun" and [s.text for s in rest] == [" fun"]
    prompt, text, rest = split_echo([11, 12], "Data is fun", scores, None)  # token ids: count them
    assert len(prompt) == 2 and text == " fun" and len(rest) == 1


def test_bits_per_byte_counts_the_text_s_bytes_not_replacement_characters():
    # "東" is 3 UTF-8 bytes split into two tokens that each decode alone to U+FFFD
    obj = {"tokens": ["A", "\ufffd", "\ufffd"], "token_logprobs": [None, -LN2, -LN2], "top_logprobs": [None, {}, {}]}
    assert Scored.from_openai(obj, text="A東").n_bytes == 3 and Scored.from_openai(obj).n_bytes == 6
    assert Scored.from_openai(obj, text="A東").bits_per_byte == pytest.approx(2 / 3)


def test_split_characters_are_shown_whole_on_their_first_token():
    from wikigpt.scoring import spelled

    obj = {"tokens": ["A", "\ufffd", "\ufffd", " b", "\ufffd"], "token_logprobs": [None, -1.0, -1.0, -1.0, -1.0],
           "top_logprobs": [None, {}, {}, {}, {}]}
    assert spelled(Scored.from_openai(obj, text="A東 bé")) == ["A", "東", "", " b", "é"]
    assert spelled(Scored.from_openai(obj)) == ["A", "\ufffd", "\ufffd", " b", "\ufffd"]  # no text: the tokens
