"""`wikigpt serve --upstream` in front of a real vLLM (its CPU build, in its own virtualenv:
`make vllm-venv`; the tests find its python through WIKIGPT_VLLM_PYTHON, which `.ci/run` sets).

vLLM serves a tiny random GPT-2 saved by our own `save_model`; everything is compared with what
vLLM answers directly, cleaned as our filter cleans it. vLLM takes a minute or two to start
(it compiles its forward), once per module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import REPO, free_port, make_tiny_model, require
from tests.test_api import metric
from tests.test_gateway import gateway, scored_both_ways, sent_upstream
from wikigpt.textfilter import clean_continuation

OUR_DEFAULTS = {"max_tokens": 64, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}


class VLLM:
    def __init__(self, python: str, model_dir, log_path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                 "--dtype", os.environ.get("WIKIGPT_VLLM_DTYPE", "bfloat16"), "--max-model-len", "1024",
                 "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--enable-log-requests",
                 "--enable-prompt-tokens-details"],  # usage.prompt_tokens_details.cached_tokens (its prefix cache)
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            assert self.proc.poll() is None, "vLLM exited:\n" + self.log_tail()
            assert time.monotonic() < deadline, "vLLM did not answer within 600 s:\n" + self.log_tail()
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(line for line in f.readlines()[-40:] if "Attempted to load weight" not in line)

    def metric(self, name: str, **labels) -> float:
        return metric(httpx.get(self.url + "/metrics", timeout=10).text, name, **labels)

    def complete(self, **body) -> dict:
        r = httpx.post(self.url + "/v1/completions", json={"model": self.model, **body}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    python = os.environ.get("WIKIGPT_VLLM_PYTHON", "")
    require(python and os.access(python, os.X_OK),
            "no vLLM: set WIKIGPT_VLLM_PYTHON to the python of a vllm-cpu virtualenv (`make vllm-venv`)")
    tmp = tmp_path_factory.mktemp("vllm")
    # head size 64 (128 / 2 heads), a context of 1,024 tokens: shapes vLLM's CPU kernels take
    model_dir = make_tiny_model(tmp / "tiny", n_embd=128, n_positions=1024)
    server = VLLM(python, model_dir, tmp / "vllm.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(vllm):
    srv = gateway(vllm.url)
    yield srv
    srv.close()


def test_the_original_contract_with_our_defaults_served_by_vllm(gw, vllm):
    """The original call, no Content-Type: vLLM got our decoding defaults, not its own
    (temperature 1, 16 tokens), and the answer is its text through our filter."""
    r = httpx.post(gw.url + "/predict", content=b'{"text":"Data Science is","seed":3}', timeout=120)
    assert r.status_code == 200, r.text
    direct = vllm.complete(prompt="Data Science is", seed=3, **OUR_DEFAULTS)["choices"][0]
    assert r.json()["predictions"] == "Data Science is" + clean_continuation(direct["text"])
    assert r.json()["model"] == vllm.model and r.json()["finish_reason"] == direct["finish_reason"]
    root = httpx.get(gw.url + "/").json()
    assert root["ready"] is True and root["context_length"] == 1024 and root["upstream"] == vllm.url
    assert [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]] == [vllm.model]


def test_vllms_cached_prompt_tokens_pass_through(gw, vllm):
    """vLLM's automatic prefix caching reports the whole blocks it reused (128 tokens each on its
    CPU backend: the prompt is longer); the gateway relays its count as
    usage.prompt_tokens_details.cached_tokens."""
    body = {"prompt": "The history of the Roman Empire covers the history of ancient Rome " * 16, "max_tokens": 2,
            "temperature": 0}
    vllm.complete(**body)
    direct = vllm.complete(**body)["usage"]["prompt_tokens_details"]["cached_tokens"]
    via = httpx.post(gw.url + "/v1/completions", json=body, timeout=120).json()["usage"]
    assert via["prompt_tokens_details"]["cached_tokens"] == direct > 0


def test_openai_client_streams_vllm_text_through_our_filter(gw, vllm):
    import openai

    oc = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    seeded = dict(model=vllm.model, prompt="The history of", max_tokens=40, seed=11, stop=["\n\n\n"])
    with sent_upstream(gw) as sent:
        whole = oc.completions.create(**seeded)
        pieces, finishes, usage = [], [], None
        for chunk in oc.completions.create(**seeded, stream=True, stream_options={"include_usage": True}):
            for ch in chunk.choices:
                pieces.append(ch.text)
                finishes += [ch.finish_reason] if ch.finish_reason else []
            usage = chunk.usage or usage
    direct = vllm.complete(**{**OUR_DEFAULTS, **seeded})["choices"][0]
    assert whole.choices[0].text == clean_continuation(direct["text"], ["\n\n\n"])
    assert [(b["stream"], b["stop"]) for b in sent] == [(False, ["\n\n\n"]), (True, ["\n\n\n"])]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    assert finishes == [direct["finish_reason"]] and usage == whole.usage


def test_scores_and_echo_from_vllm_streamed_or_not(gw, vllm):
    """vLLM echoes differently streamed (its first event: the prompt and the first token) and
    not (one text); both come out as vLLM's own non-streamed answer, cleaned."""
    greedy = dict(prompt="Data science is", max_tokens=6, echo=True, logprobs=2, temperature=0)
    sent, whole, text, tokens, values = scored_both_ways(
        gw, model=vllm.model, **greedy, extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
    assert [b["stream"] for b in sent] == [False, True]
    direct = vllm.complete(**greedy, repetition_penalty=1.0, ignore_eos=True)["choices"][0]
    prompt = greedy["prompt"]
    assert whole.text == text == prompt + clean_continuation(direct["text"][len(prompt):])
    assert whole.logprobs.tokens == tokens == direct["logprobs"]["tokens"] and values[0] is None
    assert values[1:] == pytest.approx(direct["logprobs"]["token_logprobs"][1:], abs=1e-3)
    assert whole.logprobs.token_logprobs[1:] == pytest.approx(values[1:], abs=1e-3)


def test_vllm_refusals_are_our_4xx_with_its_message(gw):
    for body in ({"prompt": [99999], "max_tokens": 4}, {"prompt": [99999], "max_tokens": 4, "stream": True},
                 {"prompt": "Data", "max_tokens": 2000}):
        r = httpx.post(gw.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "Traceback" not in r.text
        assert ("out of vocabulary" in err["message"]) or ("max_model_len" in err["message"]), err
    assert httpx.post(gw.url + "/predict", json={"text": "still alive", "max_new_tokens": 4}).status_code == 200


def test_a_client_that_goes_away_aborts_the_vllm_request(gw, vllm):
    """vLLM says so itself: with --enable-log-requests it logs "Aborted request(s) ..." when a
    request's connection closes (1,000 tokens with EOS ignored: seconds of work left), for a
    streamed request and for a non-streamed one (its client gone while vLLM generates)."""
    long = {"prompt": "Data", "max_tokens": 1000, "ignore_eos": True}

    def wait_aborted(before: int, what: str) -> None:
        deadline = time.monotonic() + 30
        while vllm.log_text().count("Aborted request") == before:
            assert time.monotonic() < deadline, f"vLLM never aborted the {what} request:\n" + vllm.log_tail()
            time.sleep(0.2)

    aborted = vllm.log_text().count("Aborted request")
    with httpx.Client(base_url=gw.url, timeout=120) as c, c.stream(
            "POST", "/v1/completions", json={**long, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    wait_aborted(aborted, "streamed")
    log = vllm.log_text()
    aborted, received, body = log.count("Aborted request"), log.count("Received request"), json.dumps(long).encode()
    with socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        gw.wait(lambda: vllm.log_text().count("Received request") > received, "vLLM never got the request")
    wait_aborted(aborted, "non-streamed")


def test_32_concurrent_clients_through_the_gateway_to_vllm(gw, vllm):
    """All answered, each with exactly the tokens asked for (texts are not compared: vLLM's
    bf16 kernels need not give the same greedy token alone and in a batch of 32)."""
    before = httpx.get(gw.url + "/metrics").text

    def call(i):
        return httpx.post(gw.url + "/v1/completions", json={"prompt": f"Data {i} is", "max_tokens": 16,
                                                           "ignore_eos": True, "seed": i}, timeout=300)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(32)))
    assert [a.status_code for a in answers] == [200] * 32, [a.text for a in answers if a.status_code != 200][:1]
    assert [a.json()["usage"]["completion_tokens"] for a in answers] == [16] * 32
    after = httpx.get(gw.url + "/metrics").text
    name = "wikigpt_upstream_request_duration_seconds_count"
    assert metric(after, name, outcome="ok") - metric(before, name, outcome="ok") == 32


def test_make_run_with_upstream_serves_the_ui_and_the_original_contract_from_vllm(vllm):
    """The README's command for this mode, as a user runs it: `make run UPSTREAM=<vLLM>` starts
    the API in upstream mode and the web UI; the original call is answered with vLLM's text."""
    api, ui = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIKIGPT_")}
    proc = subprocess.Popen(["make", "--no-print-directory", "run", f"UPSTREAM={vllm.url}", f"API_PORT={api}",
                             f"UI_PORT={ui}"], cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "make run exited:\n" + proc.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "make run: API or UI not up within 180 s"
            try:
                ready = httpx.get(f"http://127.0.0.1:{api}/ready", timeout=5).status_code == 200
                ui_up = httpx.get(f"http://127.0.0.1:{ui}/_stcore/health", timeout=5).text == "ok"
                if ready and ui_up:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{api}/predict", content=b'{"text":"Data Science is"}', timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"].startswith("Data Science is") and r.json()["model"] == vllm.model
        assert httpx.get(f"http://127.0.0.1:{api}/").json()["upstream"] == vllm.url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make's trap stops the API and the UI
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    # make can exit on SIGTERM while its recipe's trap still waits for the API and the UI to
    # finish shutting down: wait for every process it started, then nothing may be listening
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, "make run: processes left 30 s after SIGTERM"
        time.sleep(0.2)
    for port in (api, ui):  # both gone: nothing left listening
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
