"""What both pages of the web UI share: the Markdown escaping of model text, the hints, and
the error box every backend failure ends in (what failed, the URL tried, how to fix it)."""

from __future__ import annotations

import re

import streamlit as st

AUTH_HINT = "The API wants a key: give the UI the same one with `wikigpt ui --api-key` or `WIKIGPT_API_KEY`."
START_HINT = (
    "Start the backend with `wikigpt serve` (or `make run`, which starts the API and this UI "
    "together), or point the UI at a running one with `wikigpt ui --api-url URL` / `WIKIGPT_API_URL`."
)

# Backslash-escape every character Markdown (or Streamlit's :color[] / $math$ directives)
# could read as syntax: the model writes raw text, and wiki text is full of = # * [ ] | $.
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$=^&])")


def escape_markdown(text: str) -> str:
    return _MARKDOWN_SYNTAX.sub(r"\\\1", text).replace("\n", "  \n")


def show_error(err: dict, *, start_hint: str = START_HINT, retry_label: str | None = None, key: str | None = None,
               on_retry=None, args=()) -> None:
    """A `wikigpt.client` failure (its `as_dict()`) as an error box, with a retry button when given one."""
    hint = {"unreachable": start_hint, "timeout": start_hint, "auth": AUTH_HINT}.get(err["kind"])
    st.error(f"**{err['title']}.** {escape_markdown(err['detail'])}  \nURL tried: `{err['url']}`"
             + (f"  \n{hint}" if hint else ""), icon=":material/error:")
    if retry_label:
        st.button(retry_label, key=key, on_click=on_retry, args=args, icon=":material/refresh:")
