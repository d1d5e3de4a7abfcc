"""The web UI's logic, driven by Streamlit's AppTest against HTTP servers on 127.0.0.1.

The happy path runs against the real API (`wikigpt.api` on the tiny model, real uvicorn). The
failure paths need a backend that fails on cue (refuses, stalls, answers an error, breaks a
stream), which the real API cannot be told to do: `ScriptedBackend` is a small real HTTP server
speaking the same wire format (chunked server-sent events, OpenAI-style error JSON).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from wikigpt.ui import common, continue_page
from wikigpt.cli import main as cli_main
from wikigpt.cli import streamlit_command
from wikigpt.evalreport import summarize
from wikigpt.settings import UISettings

from .conftest import free_port

UI_FILE = str(Path(continue_page.__file__).with_name("app.py"))  # what `wikigpt ui` runs
# What GET / of `wikigpt serve` sends (api: "eval" is evalreport.eval_summary of the model folder).
HEALTH = {"status": "ok", "model": "tiny-wiki", "n_params": 124_439_808, "context_length": 1024,
          "device": "cpu", "dtype": "bfloat16", "quantization": "int8",
          "eval": summarize({"format": 1, "latest": {"perplexity": 31.25, "data": "wikitext-103-raw", "split": "test",
                                                     "n_tokens": 280_000, "complete": True, "window": 1024}})}


class ScriptedBackend:
    """GET / answers `health`; POST /v1/completions does what `mode` says:
    ("stream", pieces) | ("error", status, body) | ("stall",) | ("break", pieces, error) | ("cut", pieces).
    A stall holds the response open until `release` is set (at the latest on close) and then sets `stalled_out`."""

    def __init__(self, port: int | None = None) -> None:
        self.health, self.health_status = dict(HEALTH), 200
        self.mode: tuple = ("stream", [" an", " interdisciplinary", " field", "\n\n= = History = ="])
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.release, self.stalled_out = threading.Event(), threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _event(self, payload: str) -> None:
                data = f"data: {payload}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def do_GET(self) -> None:
                self._json(backend.health_status, backend.health)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                backend.requests.append(body)
                backend.auth.append(self.headers.get("Authorization"))
                kind, *args = backend.mode
                if kind == "error":
                    return self._json(*args)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if kind == "stall":
                    backend.release.wait(60)
                    backend.stalled_out.set()
                    return
                for piece in args[0]:
                    self._event(json.dumps({"object": "text_completion", "choices": [
                        {"index": 0, "text": piece, "finish_reason": None}]}))
                if kind == "break":
                    self._event(json.dumps({"error": {"message": args[1], "type": "server_error"}} if args[1]
                                           else ["not", "a", "chunk"]))
                if kind in ("stream", "break"):
                    self._event(json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                                            "usage": {"completion_tokens": len(args[0])}}))
                    self._event("[DONE]")
                if kind != "cut":
                    self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend():
    b = ScriptedBackend()
    yield b
    b.close()


@pytest.fixture
def app(monkeypatch, backend):
    monkeypatch.setenv("WIKIGPT_API_URL", backend.url)
    monkeypatch.setenv("WIKIGPT_STATUS_INTERVAL", "0")
    monkeypatch.delenv("WIKIGPT_NOTEBOOKS_DIR", raising=False)
    return AppTest.from_file(UI_FILE, default_timeout=30)


@pytest.fixture(scope="module")
def evaluated_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with an eval_report.json in the format `wikigpt evaluate` writes."""
    d = tmp_path_factory.mktemp("evaluated") / "tiny"
    shutil.copytree(tiny_model_dir, d)
    latest = {"model": str(d), "data": "wikitext-2-raw", "split": "test", "n_tokens": 4096, "complete": False,
              "perplexity": 498.7, "word_perplexity": float("nan"), "bits_per_byte": 2.9}
    (d / "eval_report.json").write_text(json.dumps({"format": 1, "model": str(d), "latest": latest,
                                                    "results": [latest], "others": []}))
    return d


def test_real_api_answer_streams_into_the_page_with_its_model_facts(monkeypatch, evaluated_model_dir):
    from tests.test_api import LiveServer
    from wikigpt.modeling import load_model
    from wikigpt.settings import ModelSettings

    server = LiveServer(load_model(ModelSettings(model=str(evaluated_model_dir), device="cpu")))
    try:
        monkeypatch.setenv("WIKIGPT_API_URL", server.url)
        monkeypatch.setenv("WIKIGPT_STATUS_INTERVAL", "0")
        at = AppTest.from_file(UI_FILE, default_timeout=60).run()
        assert "Backend ready" in at.sidebar.success[0].value
        assert str(evaluated_model_dir) in "\n".join(m.value for m in at.sidebar.markdown)
        assert at.sidebar.metric[0].value == "498.70"  # from the report, through GET /
        assert "(part of the split)" in "\n".join(c.value for c in at.sidebar.caption)
        at.sidebar.number_input(key="seed").set_value(3)
        at = send(at.run(), "Data Science is")
        turn = at.session_state.turns[0]
        assert turn["status"] == "done", turn["error"]
        assert turn["text"].strip() and turn["usage"]["completion_tokens"] >= 1
        assert turn["finish_reason"] in {"length", "stop"}
        at = send(at, "Data Science is")  # same seed, same settings: the same continuation
        assert at.session_state.turns[1]["text"] == turn["text"]
        assert not at.exception
    finally:
        server.close()


def page_text(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "error", "warning", "success", "info")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def send(at: AppTest, prompt: str) -> AppTest:
    return at.chat_input[0].set_value(prompt).run()


def test_page_shows_backend_model_and_says_what_the_model_is(app):
    at = app.run()
    assert not at.exception
    sidebar = "\n".join(str(e.value) for e in at.sidebar.success) + "\n".join(m.value for m in at.sidebar.markdown)
    assert "Backend ready" in sidebar and "tiny-wiki" in sidebar
    assert "124.4 M parameters" in "\n".join(c.value for c in at.sidebar.caption)
    assert "cpu · bfloat16 · int8 weights" in "\n".join(c.value for c in at.sidebar.caption)
    assert at.sidebar.metric[0].value == "31.25"  # perplexity from the model's eval report
    assert "on wikitext-103-raw test, 280,000 tokens" in "\n".join(c.value for c in at.sidebar.caption)
    assert "not a chat assistant" in page_text(at)
    assert [b.label for b in at.sidebar.button][:2] == ["Clear conversation", "Data Science is"]


def test_prompt_streams_into_the_conversation_with_the_sidebar_settings(app, backend):
    at = app.run()
    at.sidebar.slider(key="temperature").set_value(0.0)
    at.sidebar.number_input(key="seed").set_value(7)
    at.sidebar.slider(key="min_p").set_value(0.1)
    at = send(at.run(), "Data Science is")
    assert not at.exception
    turn = at.session_state.turns[0]
    assert turn["status"] == "done" and turn["error"] is None
    assert turn["text"] == " an interdisciplinary field\n\n= = History = ="
    body = backend.requests[0]
    assert body["prompt"] == "Data Science is" and body["stream"] is True and body["model"] == "tiny-wiki"
    assert body["temperature"] == 0.0 and body["seed"] == 7 and body["max_tokens"] == 64
    assert body["top_p"] == 0.95 and body["top_k"] == 50 and body["repetition_penalty"] == 1.1
    assert body["min_p"] == 0.1 and [s.label for s in at.sidebar.slider][1:] == [
        "Temperature", "Top-p", "Min-p", "Repetition penalty"]
    text = page_text(at)
    # The prompt is highlighted, the continuation plain, and wiki markup is escaped, not rendered.
    assert ":blue-background[**Data Science is**] an interdisciplinary field" in text
    assert r"\= \= History \= \=" in text
    assert "greedy" in text and "seed 7" in text and "stopped at max new tokens" in text


def test_example_button_sends_it_and_clear_empties_the_conversation(app, backend):
    at = app.run()
    at = at.sidebar.button(key="ex-Alan Turing was").click().run()
    assert backend.requests[-1]["prompt"] == "Alan Turing was"
    assert len(at.session_state.turns) == 1 and len(at.chat_message) == 1
    at = at.sidebar.button[0].click().run()  # Clear conversation
    assert at.session_state.turns == [] and len(at.chat_message) == 0


def test_backend_down_says_what_failed_and_how_to_start_it_then_retry_works(monkeypatch):
    port = free_port()  # nothing listens here yet
    monkeypatch.setenv("WIKIGPT_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WIKIGPT_STATUS_INTERVAL", "0")
    at = AppTest.from_file(UI_FILE, default_timeout=30).run()
    assert not at.exception
    assert "Backend unavailable" in at.sidebar.error[0].value
    assert "Check again" in [b.label for b in at.button]
    at = send(at, "Data Science is")
    err = at.session_state.turns[0]["error"]
    assert err["kind"] == "unreachable" and err["url"] == f"http://127.0.0.1:{port}/v1/completions"
    message = at.main.error[-1].value
    assert "Cannot reach the backend" in message and f"127.0.0.1:{port}" in message
    assert "wikigpt serve" in message and "make run" in message
    assert not at.exception

    backend = ScriptedBackend(port)  # the backend comes up: Retry re-sends the same prompt
    try:
        at = at.button(key="retry-0").click().run()
        assert [t["status"] for t in at.session_state.turns] == ["done"]
        assert at.session_state.turns[0]["prompt"] == "Data Science is"
        assert "Backend ready" in at.sidebar.success[0].value
    finally:
        backend.close()


def test_error_answer_shows_the_apis_message(app, backend):
    backend.mode = ("error", 400, {"error": {"message": "prompt is too long: 2000 tokens, the model takes 1024",
                                             "type": "invalid_request_error", "param": "prompt"}})
    at = send(app.run(), "x" * 50)
    assert "HTTP 400" in at.main.error[-1].value
    # The API's words are shown as text (Markdown-escaped), with the parameter it named.
    assert at.session_state.turns[0]["error"]["detail"] == (
        "prompt is too long: 2000 tokens, the model takes 1024 (parameter: prompt)")
    assert r"prompt is too long\: 2000 tokens" in at.main.error[-1].value
    assert not at.exception


def test_missing_api_key_says_how_to_give_one(app, backend):
    backend.mode = ("error", 401, {"error": {"message": "missing or wrong API key", "type": "authentication_error",
                                             "param": None}})
    at = send(app.run(), "Data Science is")
    assert at.session_state.turns[0]["error"]["kind"] == "auth"
    assert "HTTP 401" in at.main.error[-1].value and "WIKIGPT_API_KEY" in at.main.error[-1].value


def test_api_key_is_sent_as_a_bearer_token(monkeypatch, app, backend):
    monkeypatch.setenv("WIKIGPT_API_KEY", "s3cret")
    send(app.run(), "Data Science is")
    assert backend.auth == ["Bearer s3cret"]


def test_stalled_backend_times_out_instead_of_freezing(monkeypatch, app, backend):
    monkeypatch.setenv("WIKIGPT_READ_TIMEOUT", "0.5")
    backend.mode = ("stall",)
    at = send(app.run(), "Data Science is")
    assert backend.requests and not backend.stalled_out.is_set()  # the page gave up while the backend still held on
    err = at.session_state.turns[0]["error"]
    assert err["kind"] == "timeout" and "--read-timeout" in err["detail"]
    assert "too slow" in at.main.error[-1].value and "wikigpt serve" in at.main.error[-1].value


@pytest.mark.parametrize("mode, title", [
    (("break", [" an", " inter"], "engine failed: out of memory"), "failed while generating"),
    (("cut", [" an", " inter"]), "closed the stream early"),
    (("break", [" an", " inter"], None), "unexpected event"),  # an event that is not a completion chunk
])
def test_broken_stream_keeps_the_partial_text_and_says_so(app, backend, mode, title):
    backend.mode = mode
    at = send(app.run(), "Data Science is")
    turn = at.session_state.turns[0]
    assert turn["status"] == "error" and turn["text"] == " an inter"
    assert title in at.main.error[-1].value
    assert not at.exception


def test_backend_still_loading_is_a_warning_not_a_crash(app, backend):
    backend.health_status = 503
    backend.health = {"error": {"message": "the model is still loading", "type": "overloaded_error"}}
    at = app.run()
    assert "Backend starting" in at.sidebar.error[0].value
    assert "still loading" in at.main.error[0].value and "HTTP 503" in at.main.error[0].value
    assert not at.exception


def test_backend_warming_up_is_shown_as_starting(app, backend):
    backend.health = dict(HEALTH, ready=False)
    at = app.run()
    assert "Backend starting (warming up the model)" in at.sidebar.warning[0].value
    assert not at.exception


def test_notebook_buttons_download_what_exists_and_disable_what_does_not(monkeypatch, app, tmp_path):
    (tmp_path / "train.ipynb").write_text('{"cells": []}')
    monkeypatch.setenv("WIKIGPT_NOTEBOOKS_DIR", str(tmp_path))
    at = app.run()
    buttons = {b.label: b for b in at.sidebar.get("download_button")}
    assert not buttons["Training notebook"].disabled
    assert buttons["Inference notebook"].disabled
    assert not at.exception


def test_notebooks_are_found_in_the_checkout_by_default(monkeypatch):
    monkeypatch.delenv("WIKIGPT_NOTEBOOKS_DIR", raising=False)
    repo_notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    present = [name for name, *_ in continue_page.NOTEBOOKS if (repo_notebooks / name).is_file()]
    assert present == [name for name, *_ in continue_page.NOTEBOOKS]  # the notebooks are part of the checkout
    for name in present:
        assert continue_page.find_notebook(UISettings(), name)[0] == repo_notebooks / name


def test_markdown_escaping_round_trips_wiki_text():
    assert common.escape_markdown("= = A * b [c](d) $5 :x:\n") == r"\= \= A \* b \[c\]\(d\) \$5 \:x\:" + "  \n"
    assert continue_page.highlight_prompt("a\n\nb ") == ":blue-background[**a**]  \n  \n:blue-background[**b**] "


def test_ui_runs_without_torch_or_transformers(tmp_path):
    """The UI image installs wikigpt[ui] only: the page must not import model code."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({UI_FILE!r}, default_timeout=30).run()\n"
        "assert not at.exception, at.exception\n"
        "assert 'Backend unavailable' in at.sidebar.error[0].value\n"
        "from wikigpt.cli import main, streamlit_command\n"  # `wikigpt ui` in the UI image
        "from wikigpt.settings import UISettings\n"
        "assert streamlit_command(UISettings())[0][2:4] == ['streamlit', 'run']\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WIKIGPT_API_URL": f"http://127.0.0.1:{free_port()}",
           "WIKIGPT_STATUS_INTERVAL": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_ui_runs_streamlit_with_our_flags_and_settings():
    argv, env = streamlit_command(UISettings(api_url="http://backend:5000/", port=8600, host="0.0.0.0"))
    assert argv[1:5] == ["-m", "streamlit", "run", UI_FILE]
    flags = dict(zip(argv[5::2], argv[6::2], strict=True))
    assert flags["--server.address"] == "0.0.0.0" and flags["--server.port"] == "8600"
    assert flags["--browser.gatherUsageStats"] == "false" and flags["--server.headless"] == "true"
    assert flags["--client.showErrorDetails"] == "none"
    assert env["WIKIGPT_API_URL"] == "http://backend:5000" and env["WIKIGPT_PORT"] == "8600"


def test_cli_ui_rejects_a_bad_api_url(capsys):
    assert cli_main(["ui", "--api-url", "backend:5000"]) == 2
    assert "--api-url" in capsys.readouterr().err
