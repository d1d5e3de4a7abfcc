"""The web UI's second page, "Score text": where the model was surprised, token by token.

Paste a text or pick a paragraph of the WikiText test split (`--wikitext-file`); the page asks
the API for every token's log-probability (`max_tokens: 0, echo, logprobs`: no generation) and
shades each token by its surprise, -log2 p, white (expected) to red (16 bits or more, about 1
in 65,000). Hovering a token shows p, the bits and the model's top alternatives there. A summary
line gives perplexity and bits per byte. With a second backend (`--compare-api-url`, e.g. the
base model next to the fine-tuned one) both shadings stand side by side, and a third shows the
difference: blue where the main model is less surprised than the other, red where it is more.

Like the first page it talks to the API only over HTTP, through `wikigpt.client`.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import streamlit as st

from wikigpt.client import BackendError, fetch_health, score_text
from wikigpt.scoring import Scored, fmt_p, paragraphs, shade, show_token, spelled, surprise_delta
from wikigpt.settings import UISettings
from wikigpt.ui.common import escape_markdown, show_error

START_HINT = ("Start the backend with `wikigpt serve` (or `make run`), or point the UI at a running one "
              "with `wikigpt ui --api-url URL` (and `--compare-api-url URL` for the second model).")
STYLE = """<style>
.wg-scored {line-height: 1.9; font-size: 1.05rem; white-space: pre-wrap; word-break: break-word;}
.wg-tok {border-radius: 3px; padding: 1px 0; cursor: help; position: relative;}
.wg-tok:hover {outline: 2px solid #1f2937;}
.wg-tok:hover::after {content: attr(data-tip); position: absolute; left: 0; top: 1.7em; z-index: 10;
  white-space: pre; background: #1f2937; color: #fff; font: 0.8rem/1.35 monospace; padding: 6px 8px;
  border-radius: 4px; pointer-events: none;}
.wg-legend {font-size: 0.85rem; color: #555;}
</style>"""


def _red(bits: float | None) -> str:
    return "transparent" if bits is None else f"rgba(220, 38, 38, {0.85 * shade(bits):.3f})"


def _blue_red(delta: float | None, top: float = 8.0) -> str:
    if delta is None:
        return "transparent"
    strength = 0.85 * min(1.0, abs(delta) / top)
    return f"rgba(220, 38, 38, {strength:.3f})" if delta > 0 else f"rgba(37, 99, 235, {strength:.3f})"


def tooltip(scored: Scored, i: int) -> str:
    t = scored.tokens[i]
    if t.logprob is None:
        return f"{show_token(t.text)}: the first token, nothing before it to predict it from"
    alts = "\n".join(f"  {show_token(text)}  p {fmt_p(math.exp(lp))}" for text, lp in t.top)
    return f"{show_token(t.text)}  p {fmt_p(t.p)} · {t.surprise:.2f} bits\nmost likely here:\n{alts}"


def shaded_html(scored: Scored, colours: list[str], tips: list[str]) -> str:
    """The text as spans, one a token, each with its background and hover text."""
    spans = []
    for text, colour, tip in zip(spelled(scored), colours, tips):
        tip = html.escape(tip, quote=True)  # shown on hover by the style above; aria-label for screen readers
        spans.append(f'<span class="wg-tok" style="background:{colour}" data-tip="{tip}" aria-label="{tip}">'
                     f"{html.escape(text)}</span>")
    return STYLE + '<div class="wg-scored">' + "".join(spans) + "</div>"


def surprise_html(scored: Scored) -> str:
    return shaded_html(scored, [_red(t.surprise) for t in scored.tokens],
                       [tooltip(scored, i) for i in range(len(scored.tokens))])


def difference_html(main: Scored, other: Scored) -> str:
    deltas = surprise_delta(other, main)  # main's bits minus the other's: < 0 where main expected it more
    tips = [tooltip(main, i) if d is None else f"{d:+.2f} bits ({main.model} minus {other.model})\n" + tooltip(main, i)
            for i, d in enumerate(deltas)]
    return shaded_html(main, [_blue_red(d) for d in deltas], tips)


@st.cache_data(show_spinner=False)
def _paragraphs(path: str, max_chars: int) -> list[str]:
    return paragraphs(Path(path).read_text(encoding="utf-8"), max_chars=max_chars)


def _context_length(s: UISettings) -> int | None:
    """The served model's context, asked once a session (the paragraph list stays put when the
    backend goes away later)."""
    if st.session_state.get("score_context") is None:
        try:
            n = fetch_health(s).get("context_length")
        except BackendError:
            return None
        st.session_state.score_context = n if isinstance(n, int) else None
    return st.session_state.score_context


def _text_input(s: UISettings) -> str:
    sources = ["Paste text"]
    if s.wikitext_file:
        sources.append("A WikiText paragraph")
    source = st.radio("Text", sources, horizontal=True, label_visibility="collapsed")
    if source == "A WikiText paragraph":
        # byte-level BPE makes at most one token a UTF-8 byte: 3/4 of the context in characters
        # leaves room for WikiText's few multi-byte characters
        max_chars = (_context_length(s) or 1024) * 3 // 4
        try:
            options = _paragraphs(s.wikitext_file, max_chars)
        except (OSError, UnicodeDecodeError) as exc:
            st.error(f"Cannot read the WikiText file `{s.wikitext_file}` (--wikitext-file): {exc}")
            options = []
        if options:
            pick = st.selectbox(f"Paragraph ({Path(s.wikitext_file).name}, those under {max_chars} characters)",
                                range(len(options)), format_func=lambda i: f"{i + 1}. {options[i][:90]}…")
            if st.session_state.get("score_pick") != (s.wikitext_file, pick):  # a new pick, not a rerun
                st.session_state.score_pick = (s.wikitext_file, pick)
                st.session_state.score_text = options[pick]
    elif not s.wikitext_file:
        st.caption("Start the UI with `--wikitext-file PATH/wiki.test.raw` to pick paragraphs of the WikiText test split.")
    return st.text_area("Text to score", key="score_text", height=150,
                        placeholder="Paste a paragraph; the model scores every token given the ones before it.")


def _render(results: list[Scored]) -> None:
    if len(results) == 1:
        st.markdown(f"**{escape_markdown(results[0].summary())}**")
        st.html(surprise_html(results[0]))
    else:
        main, other = results
        cols = st.columns(2)
        for col, (label, scored) in zip(cols, (("Main", main), ("Compared", other))):
            with col:
                st.markdown(f"**{label}:** {escape_markdown(scored.summary())}")
                st.html(surprise_html(scored))
        st.subheader("Difference", divider="gray")
        try:
            st.html(difference_html(main, other))
            st.caption(f"Blue: `{main.model}` was less surprised than `{other.model}`; red: more "
                       "(full colour at 8 bits, 256 times likelier).")
        except ValueError as exc:  # different tokenizers: no token-by-token difference
            st.info(f"{exc}: {main.bits_per_byte:.3f} vs {other.bits_per_byte:.3f} bits per byte.")
    st.html('<div class="wg-legend">Shading: surprise −log₂ p, white 0 bits (certain) to red 16 bits '
            "(1 in 65,000). Hover a token for p and the model's top alternatives. Log-probabilities are of "
            "the model's raw distribution (before temperature, top-k and top-p).</div>")


def score_page() -> None:
    s = UISettings()
    st.set_page_config(page_title="wikigpt · Score text", page_icon=":material/insights:", layout="wide",
                       menu_items={})
    st.session_state.setdefault("score_text", "")
    st.title("Score text")
    st.markdown("How surprised is the model by a text? Every token is shaded by its surprise, −log₂ p: "
                "white where the model expected it, red where it did not.")
    with st.sidebar:
        st.caption(f"Main backend `{s.api_url}`" + (f"  \nCompared with `{s.compare_api_url}`" if s.compare_api_url else ""))
        top = st.slider("Alternatives shown per token", 1, 10, 5, key="score_top")
    text = _text_input(s)
    if st.button("Score", type="primary", icon=":material/insights:", disabled=not text.strip()):
        st.session_state.score_results, st.session_state.score_error = None, None
        try:
            with st.spinner("Scoring…"):
                results = [score_text(s, text, top=top)]
                if s.compare_api_url:
                    results.append(score_text(s, text, top=top, api_url=s.compare_api_url))
            st.session_state.score_results = results
        except BackendError as exc:
            st.session_state.score_error = exc.as_dict()
    if st.session_state.get("score_error"):
        show_error(st.session_state.score_error, start_hint=START_HINT)
    elif st.session_state.get("score_results"):
        _render(st.session_state.score_results)
