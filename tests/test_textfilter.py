"""The continuation filter: stop strings and blank-line runs, the same text whatever the chunking."""

import pytest

from wikigpt.textfilter import ContinuationFilter, clean_continuation, collapse_blank_lines


def test_blank_line_runs_collapse_to_one():
    assert collapse_blank_lines("a\n\n\n\n\nb") == "a\n\nb"
    assert collapse_blank_lines("a\n \n\t\n  \nb") == "a\n\nb"
    assert collapse_blank_lines("a\n\nb\nc") == "a\n\nb\nc"  # one blank line is kept
    assert clean_continuation(" text\n\n\n\n\n") == " text"  # trailing runs dropped


@pytest.mark.parametrize("raw, stop, want", [
    (" one. two. three", ["two"], " one."),
    (" a\n\n\n\nb\n\n\nc END d", ["END"], " a\n\nb\n\nc"),
    (" no stop here", ["zzz"], " no stop here"),
    (" x\n\ny", ["\n\n"], " x"),
])
def test_filter_gives_the_same_text_whatever_the_chunking(raw, stop, want):
    assert clean_continuation(raw, stop) == want
    for size in (1, 2, 3, 7):
        f = ContinuationFilter(stop)
        out = "".join(f.feed(raw[i:i + size]) for i in range(0, len(raw), size)) + f.finish()
        assert out == want, size


def test_filter_never_shows_a_partial_stop_string():
    f = ContinuationFilter(["STOP"])
    assert f.feed(" hello ST") == " hello"
    assert f.feed("O") == ""
    assert f.feed("P and more") == "" and f.done
