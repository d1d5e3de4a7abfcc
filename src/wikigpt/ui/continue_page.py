"""The web UI's first page, "Continue text": the model behind `wikigpt serve` continues your text.

Run it with `wikigpt ui` (or `make run`, which starts the API as well). The page talks to the
API only over HTTP (no torch, no transformers, nothing of wikigpt that loads a model), so the
UI image installs `wikigpt[ui]` alone. Every way the backend can fail (down, slow, an error
answer, a broken stream) ends as a message in the page that says what failed, the URL tried
and how to start the backend, with a retry button; the HTTP timeouts bound every wait.

Streamlit runs the page (app.py's navigation calls `continue_page`) top to bottom on every interaction.
The HTTP client is `wikigpt.client` (no Streamlit); what the health route says about the
model's evaluation is `wikigpt.evalreport.EvalSummary`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import streamlit as st

from wikigpt.client import BackendError, Completion, fetch_health, stream_completion
from wikigpt.evalreport import EvalSummary
from wikigpt.decoding import KNOBS, SamplingParams
from wikigpt.settings import UISettings
from wikigpt.ui.common import escape_markdown, show_error

EXAMPLES = (
    "Data Science is",
    "The history of the Roman Empire",
    "Alan Turing was",
    "In 1969, the Apollo 11 mission",
    "The city of Paris",
)
NOTEBOOKS = (
    ("train.ipynb", "Training notebook", "Fine-tune the model on WikiText with the wikigpt package."),
    ("inference.ipynb", "Inference notebook", "Load a model and generate text with the wikigpt package."),
)


def find_notebook(s: UISettings, name: str) -> tuple[Path | None, list[Path]]:
    """The notebook file and the places looked at: the configured directory, else the source
    checkout's notebooks/ (editable installs), else ./notebooks (a container's work dir)."""
    if s.notebooks_dir:
        places = [Path(s.notebooks_dir)]
    else:
        places = [Path(__file__).resolve().parents[3] / "notebooks", Path.cwd() / "notebooks"]
    for place in places:
        if (place / name).is_file():
            return place / name, places
    return None, places


# ---------------------------------------------------------------- page helpers

def highlight_prompt(prompt: str) -> str:
    """The prompt as highlighted bold text (line by line: a directive cannot span lines)."""
    def one(line: str) -> str:  # spaces stay outside: `** x**` would not be bold
        core = line.strip()
        lead, trail = line[: len(line) - len(line.lstrip())], line[len(line.rstrip()):]
        return f"{lead}:blue-background[**{escape_markdown(core)}**]{trail}" if core else ""

    return "  \n".join(one(line) for line in prompt.split("\n"))


def sampling_request(state) -> dict:
    """The sidebar's sampling settings as /v1/completions fields (OpenAI names, vLLM extras)."""
    seed = state.get("seed")
    body = {"max_tokens": int(state["max_new_tokens"])}
    for name in KNOBS:  # the field's own type: top_k stays an int
        body[name] = SamplingParams.model_fields[name].annotation(state[name])
    if seed is not None:
        body["seed"] = int(seed)
    return body


def describe_size(n: object) -> str | None:
    if not isinstance(n, int | float) or n <= 0:
        return None
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


# ---------------------------------------------------------------- the page


def _field_help(name: str) -> str:
    return SamplingParams.model_fields[name].description or ""


def _sidebar_settings() -> None:
    defaults = SamplingParams()
    st.header("Sampling", divider="gray")
    st.slider(
        "Max new tokens", 1, 512, defaults.max_new_tokens,
        key="max_new_tokens", help=_field_help("max_new_tokens"),
    )
    for name, knob in KNOBS.items():
        lo, hi, step = knob.ui
        widget = st.number_input if SamplingParams.model_fields[name].annotation is int else st.slider
        widget(knob.label[0].upper() + knob.label[1:], lo, hi, getattr(defaults, name), step, key=name,
               help=_field_help(name))
    st.number_input(
        "Seed", 0, 2**31 - 1, None, key="seed", placeholder="random", help=_field_help("seed") + " Empty: random.",
    )


def _queue_prompt(prompt: str, drop_turn: int | None = None) -> None:
    if drop_turn is not None and drop_turn < len(st.session_state.turns):
        st.session_state.turns.pop(drop_turn)
    st.session_state.pending = prompt


def _clear() -> None:
    st.session_state.turns = []
    st.session_state.pending = None


def _model_panel(health: dict) -> None:
    st.markdown(f"**Model** `{health.get('model', 'unknown')}`")
    facts = []
    size = describe_size(health.get("n_params"))
    if size:
        facts.append(f"{size} parameters")
    if health.get("context_length"):
        facts.append(f"context {health['context_length']} tokens")
    if health.get("device"):
        facts.append(f"{health['device']} · {health.get('dtype', '')}".rstrip(" ·")
                     + (" · int8 weights" if health.get("quantization") == "int8" else ""))
    if facts:
        st.caption(" · ".join(facts))
    report: EvalSummary = health.get("eval") or {}
    ppl = report.get("perplexity") if isinstance(report, dict) else None
    if isinstance(ppl, int | float):
        where = " ".join(str(x) for x in (Path(str(report.get("data") or "held-out text")).name, report.get("split")) if x)
        if isinstance(report.get("n_tokens"), int):
            where += f", {report['n_tokens']:,} tokens" + ("" if report.get("complete", True) else " (part of the split)")
        st.metric("Perplexity", f"{ppl:.2f}", help=f"Measured by `wikigpt evaluate` on {where}; lower is better.")
        st.caption(f"on {where}")
    else:
        st.caption("Perplexity: no evaluation report in the model directory (`wikigpt evaluate` writes one).")


def _status_panel(s: UISettings) -> None:
    """The live backend indicator and model panel. A fragment: it re-checks every
    `status_interval` seconds on its own, and reruns the whole page when the backend goes
    up or down so the main area agrees with it."""
    try:
        health, error = fetch_health(s), None
    except BackendError as exc:
        health, error = None, exc.as_dict()
    was_up = st.session_state.get("backend_up")
    up = health is not None and health.get("status", "ok") == "ok" and health.get("ready") is not False
    st.session_state.health, st.session_state.health_error = health, error
    st.session_state.backend_up = up
    if up:
        st.success(f"Backend ready  \n`{s.api_url}`", icon=":material/check_circle:")
        _model_panel(health)
    elif health is not None:
        state = "warming up the model" if health.get("status", "ok") == "ok" else escape_markdown(str(health.get("status")))
        st.warning(f"Backend starting ({state})  \n`{s.api_url}`", icon=":material/hourglass_top:")
    else:
        label = "Backend starting" if error["kind"] == "not_ready" else "Backend unavailable"
        st.error(f"{label}  \n`{s.api_url}`", icon=":material/cloud_off:")
    if was_up is not None and was_up != up and st.session_state.get("in_fragment_run"):
        st.rerun(scope="app")


def _notebook_buttons(s: UISettings) -> None:
    st.header("Notebooks", divider="gray")
    for name, label, what in NOTEBOOKS:
        path, places = find_notebook(s, name)
        data = None
        if path is not None:
            try:
                data = path.read_bytes()
            except OSError:
                data = None
        if data is None:
            looked = ", ".join(f"`{p}`" for p in places)
            st.download_button(
                label, b"", file_name=name, disabled=True, key=f"nb-{name}", icon=":material/download:",
                help=f"{name} is not available in this installation (looked in {looked}; set WIKIGPT_NOTEBOOKS_DIR).",
            )
        else:
            st.download_button(
                label, data, file_name=name, mime="application/x-ipynb+json", key=f"nb-{name}",
                on_click="ignore", icon=":material/download:", help=what,
            )


def _caption_for(turn: dict) -> str:
    bits = []
    usage = turn.get("usage") or {}
    n = usage.get("completion_tokens")
    if n:
        bits.append(f"{n} tokens in {turn['seconds']:.1f} s ({n / max(turn['seconds'], 1e-9):.1f} tok/s)")
    elif turn.get("seconds"):
        bits.append(f"{turn['seconds']:.1f} s")
    reason = {"length": "stopped at max new tokens", "stop": "the model ended the text"}.get(turn.get("finish_reason"))
    if reason:
        bits.append(reason)
    p = turn["sampling"]
    knobs = SamplingParams(**{k: p[k] for k in KNOBS if k in p})
    bits.append(knobs.describe().replace(", ", " · "))
    bits.append(f"seed {p['seed']}" if "seed" in p else "random seed")
    return " · ".join(bits)


def _render_turn(i: int, turn: dict) -> None:
    with st.chat_message("wikigpt", avatar=":material/edit_note:"):
        st.markdown(highlight_prompt(turn["prompt"]) + escape_markdown(turn["text"]))
        if turn["status"] == "streaming":  # a rerun (a click, a new prompt) cut this one short
            turn["status"] = "stopped"
        if turn["status"] == "stopped":
            st.caption("Stopped before the end.")
        elif turn["status"] == "done":
            st.caption(_caption_for(turn))
        if turn.get("error"):
            show_error(turn["error"], retry_label="Retry", key=f"retry-{i}", on_retry=_queue_prompt,
                        args=(turn["prompt"], i))


def _run_turn(s: UISettings, prompt: str) -> None:
    sampling = sampling_request(st.session_state)
    turn = {"prompt": prompt, "text": "", "status": "streaming", "sampling": sampling, "error": None,
            "seconds": 0.0, "usage": None, "finish_reason": None}
    st.session_state.turns.append(turn)  # saved first: a rerun mid-stream keeps the partial text
    out = Completion()
    model = (st.session_state.get("health") or {}).get("model")

    def pieces() -> Iterator[str]:
        yield highlight_prompt(prompt)
        for piece in stream_completion(s, prompt, sampling, out, model=model):
            turn["text"] = out.text
            yield escape_markdown(piece)

    with st.chat_message("wikigpt", avatar=":material/edit_note:"):
        try:
            st.write_stream(pieces())
            turn["status"] = "done"
        except BackendError as exc:
            turn["status"], turn["error"] = "error", exc.as_dict()
        turn.update(text=out.text, seconds=out.seconds, usage=out.usage, finish_reason=out.finish_reason)
        if turn["error"]:
            show_error(turn["error"], retry_label="Retry", key=f"retry-{len(st.session_state.turns) - 1}",
                        on_retry=_queue_prompt, args=(prompt, len(st.session_state.turns) - 1))
        else:
            st.caption(_caption_for(turn))


def continue_page() -> None:
    s = UISettings()
    st.set_page_config(page_title="wikigpt", page_icon=":material/edit_note:", menu_items={})
    for key, value in {"turns": [], "pending": None, "backend_up": None}.items():
        st.session_state.setdefault(key, value)

    @st.fragment(run_every=s.status_interval or None)
    def status_fragment() -> None:
        _status_panel(s)
        st.session_state.in_fragment_run = True  # later runs of this fragment are its own timer's

    with st.sidebar:
        st.session_state.in_fragment_run = False
        status_fragment()
        _sidebar_settings()
        st.button("Clear conversation", on_click=_clear, icon=":material/delete:", width="stretch")
        st.header("Examples", divider="gray")
        for example in EXAMPLES:
            st.button(example, key=f"ex-{example}", on_click=_queue_prompt, args=(example,), width="stretch")
        _notebook_buttons(s)

    st.title("wikigpt")
    st.markdown(
        "The model behind this page is a GPT-2-family language model (wikigpt fine-tunes DistilGPT2 on "
        "Wikipedia articles, WikiText-103). It **continues** the text you start: it is not a chat assistant, it does not answer "
        "questions or follow instructions, and what it writes may read well and still be false. "
        f"Your prompt is {highlight_prompt('highlighted')}; the plain text after it is the model's continuation."
    )
    error = st.session_state.get("health_error")
    if error and not st.session_state.turns:
        show_error(error, retry_label="Check again", key="check-again", on_retry=lambda: None)

    for i, turn in enumerate(st.session_state.turns):
        _render_turn(i, turn)

    typed = st.chat_input("Start a sentence for the model to continue, e.g. “Data Science is”")
    prompt = typed or st.session_state.pending
    st.session_state.pending = None
    if prompt and prompt.strip():
        _run_turn(s, prompt)
