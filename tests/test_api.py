"""The HTTP API on a real uvicorn server bound to 127.0.0.1 (ephemeral ports), driven by curl,
httpx and the official `openai` client."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import require
from wikigpt.generation import generate
from wikigpt.decoding import SamplingParams
from wikigpt.settings import ServeSettings

REPO = Path(__file__).resolve().parents[1]


class LiveServer:
    """`create_app` served by uvicorn in a thread, on a socket bound to 127.0.0.1:0: the native
    engine on `lm`, or any other `EngineClient` (the upstream client) given as `client`."""

    def __init__(self, lm=None, *, client=None, wait_ready: bool = True, **settings) -> None:
        import uvicorn

        from wikigpt.api import create_app

        if client is None:
            from wikigpt.engine import Engine

            s = ServeSettings(model=lm.name, **settings)
            # the loaded dtype (float32), so batched greedy text can be compared with `generate`
            client = Engine(lm, max_batch_size=s.max_batch_size, queue_size=s.queue_size)
        else:
            s = ServeSettings(**settings)
        self.engine = client
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = create_app(s, self.engine)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.wait(lambda: self.server.started and (self.engine.ready.is_set() or not wait_ready), "server did not start")

    def wait(self, condition, what: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline and self.thread.is_alive(), what
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def server(tiny_lm):
    # float32 only, so batched greedy text can be compared with `generate` exactly
    srv = LiveServer(tiny_lm, max_body_bytes=100_000)
    yield srv
    srv.close()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name and (not labels or ",".join(sorted((m[2] or "").split(","))) == want):
            total += float(m[3])
    return total


def test_cli_serve_answers_the_original_curl_call(tiny_model_dir):
    """`wikigpt serve` in a subprocess; the README's exact curl call, without Content-Type."""
    require(shutil.which("curl"), "curl is not installed (.ci/run installs it)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WIKIGPT_API_KEY": ""}
    env.pop("WIKIGPT_API_KEY")
    proc = subprocess.Popen([sys.executable, "-m", "wikigpt.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        port, lines = None, []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "server exited:\n" + "".join(lines)
            lines.append(line)
            if m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m[1])
        assert port, "".join(lines)
        out = subprocess.run(["curl", "-s", "-i", "-X", "POST", f"http://localhost:{port}/predict",
                              "-d", '{"text":"Data Science is"}'], capture_output=True, text=True, timeout=60)
        head, _, body = out.stdout.partition("\n\n")  # text mode turned \r\n into \n
        assert head.startswith("HTTP/1.1 200"), out.stdout
        answer = json.loads(body)
        assert answer["predictions"].startswith("Data Science is") and len(answer["predictions"]) > 15
        health = subprocess.run(["curl", "-s", f"http://localhost:{port}/"], capture_output=True, text=True, timeout=30)
        assert json.loads(health.stdout)["status"] == "ok"
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it so the exit status says so
    assert proc.returncode == 0 and "Application shutdown complete" in rest, rest  # SIGTERM drains, exits 0
    assert "Data Science" not in "".join(lines) + rest  # request logs never carry prompt text
    assert "POST /predict 200" in rest


def test_predict_form_encoded_body_and_sampling_fields(client, tiny_lm):
    r = client.post("/predict", content=b'{"text": "Data Science is"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["predictions"].startswith("Data Science is")
    p = SamplingParams(max_new_tokens=12, temperature=0.0)
    r = client.post("/predict", json={"text": "The history of", "max_new_tokens": 12, "temperature": 0.0})
    assert r.json()["predictions"] == generate(tiny_lm, "The history of", p)
    assert r.json()["usage"]["completion_tokens"] <= 12
    # min_p 1 keeps only the most likely token: sampling hot is then greedy
    hot = {"text": "The history of", "max_new_tokens": 12, "temperature": 1.5, "seed": 3}
    assert client.post("/predict", json=hot | {"min_p": 1.0}).json()["predictions"] == generate(tiny_lm, "The history of", p)
    assert client.post("/predict", json=hot).json()["predictions"] != generate(tiny_lm, "The history of", p)


def test_health_ready_and_models(client, tiny_lm):
    root = client.get("/").json()
    assert root["status"] == "ok" and root["model"] == tiny_lm.name and root["ready"] is True
    assert root["context_length"] == 256 and root["n_params"] == tiny_lm.n_params
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_lm.name
    assert models["data"][0]["context_length"] == 256


def test_openai_client_completions_models_and_streaming(server, tiny_lm):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = [m.id for m in oc.models.list()]
    c = oc.completions.create(model=model, prompt="Data science is", max_tokens=16, temperature=0)
    want = generate(tiny_lm, "Data science is", SamplingParams(max_new_tokens=16, temperature=0.0))
    assert "Data science is" + c.choices[0].text == want
    assert c.usage.completion_tokens <= 16 and c.usage.prompt_tokens > 0 and c.choices[0].finish_reason

    seeded = dict(model=model, prompt="Wikipedia is", max_tokens=20, seed=5, top_p=0.9)
    whole = oc.completions.create(**seeded).choices[0].text
    pieces, finish, usage = [], None, None
    for chunk in oc.completions.create(**seeded, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            pieces.append(ch.text)
            finish = ch.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == whole and len(pieces) > 1 and finish in {"stop", "length"}
    assert usage.completion_tokens > 0

    many = oc.completions.create(model=model, prompt=["Data science is", "The history of"], n=2,
                                 max_tokens=8, seed=1, echo=True)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text.startswith("Data science is") and many.choices[3].text.startswith("The history of")
    assert many.choices[0].text != many.choices[1].text  # n choices get different seeds


def test_raw_sse_stream_ends_with_done(client):
    with client.stream("POST", "/v1/completions", json={"prompt": "Data", "max_tokens": 6, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in {"stop", "length"}


BAD = [
    # (method, path, body bytes or json, status, words in the message)
    ("POST", "/predict", b'{"text": "Data', 400, "not valid JSON"),
    ("POST", "/predict", b'["Data"]', 400, "JSON object"),
    ("POST", "/predict", b"", 400, "empty"),
    # a lone UTF-16 surrogate is valid JSON but no character: the tokenizer cannot encode it
    ("POST", "/predict", b'{"text": "\\ud800 hello"}', 400, "text contains a lone UTF-16 surrogate"),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800 hello"}', 400, "prompt contains a lone UTF-16 surrogate"),
    ("POST", "/v1/completions", b'{"prompt": "a", "stream": true, "stop": ["\\udc00"]}', 400,
     "stop[0] contains a lone UTF-16 surrogate"),
    # nesting deep enough to exhaust the JSON decoder's recursion, and some less deep
    ("POST", "/predict", b'{"text": "a", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400, "x is nested more than"),
    ("POST", "/v1/completions", b'{"prompt": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001, 400,
     "prompt is nested more than"),
    ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "prompt is nested more than"),
    ("POST", "/predict", {}, 400, "text: field required"),
    ("POST", "/predict", {"text": ""}, 400, "text"),
    ("POST", "/predict", {"text": 42}, 400, "text: Input should be a valid string"),
    ("POST", "/predict", {"text": "a", "max_new_tokens": "ten"}, 400, "max_new_tokens"),
    ("POST", "/predict", {"text": "a", "temperature": -1}, 400, "temperature"),
    ("POST", "/predict", {"text": "a", "top_p": 0}, 400, "top_p"),
    ("POST", "/predict", {"text": "a", "tempreature": 0.5}, 400, "tempreature: unknown field"),
    ("POST", "/predict", {"text": "a", "stop": [""]}, 400, "stop"),
    ("POST", "/predict", b'{"text": "a", "temperature": NaN}', 400, "NaN"),
    ("POST", "/predict", b'{"text": "caf\xe9"}', 400, "UTF-8"),
    ("POST", "/predict", b'{"text": "' + b"a" * 100_001 + b'"}', 413, "larger than 100000 bytes"),
    ("POST", "/predict", {"text": "Data science is " * 120}, 400, "context of 256 tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n:"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs: Input should be less than or equal to 20"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": -1}, 400, "logprobs: Input should be greater than or equal to 0"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": True}, 400, "logprobs: Input should be a valid integer"),
    ("POST", "/v1/completions", {"prompt": [99999]}, 400, "token ids must be in"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 300}, 400, "max_tokens is 300"),
    ("POST", "/v1/completions", {"prompt": ["a"] * 20, "n": 2}, 400, "asks for 40 completions"),
    ("GET", "/predict", None, 405, "method GET is not allowed on /predict"),
    ("DELETE", "/v1/completions", None, 405, "not allowed"),
    ("GET", "/v2/nothing", None, 404, "no route GET /v2/nothing"),
    ("GET", "/v1/models/gpt-4", None, 404, "not served here"),
]


def test_bad_requests_are_clear_4xx_and_the_server_survives(client):
    assert len(BAD) >= 15
    for method, path, body, status, words in BAD:
        kw = {"json": body} if isinstance(body, (dict, list)) else {"content": body}
        r = client.request(method, path, **kw)
        assert r.status_code == status, (method, path, body, r.text)
        err = r.json()["error"]
        assert words in err["message"], (words, err)
        assert err["type"] in {"invalid_request_error", "not_found_error"} and "param" in err
        assert "Traceback" not in r.text
    assert client.get("/health").status_code == 200
    assert client.post("/predict", json={"text": "still alive"}).status_code == 200


def test_32_concurrent_clients_are_batched_and_all_correct(server, tiny_lm):
    prompts = [f"{w} is" for w in ("Data", "Rome", "Wikipedia", "Science")] * 8
    want = {p: generate(tiny_lm, p, SamplingParams(max_new_tokens=16, temperature=0.0)) for p in set(prompts)}
    before = httpx.get(server.url + "/metrics").text

    def call(p):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/predict", json={"text": p, "max_new_tokens": 16, "temperature": 0.0})

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, prompts))
    assert time.monotonic() - t0 < 90
    assert [a.status_code for a in answers] == [200] * 32
    assert [a.json()["predictions"] for a in answers] == [want[p] for p in prompts]
    after = httpx.get(server.url + "/metrics").text
    # some decoding steps ran many sequences at once
    big_steps = metric(after, "wikigpt_batch_size_count") - metric(after, "wikigpt_batch_size_bucket", le="4.0")
    big_before = metric(before, "wikigpt_batch_size_count") - metric(before, "wikigpt_batch_size_bucket", le="4.0")
    assert big_steps > big_before


def test_metrics_change_as_requests_are_served(client):
    before = client.get("/metrics").text
    client.post("/predict", json={"text": "Data science is", "max_new_tokens": 5})
    after = client.get("/metrics").text
    labels = {"route": "/predict", "method": "POST", "status": "200"}
    assert metric(after, "wikigpt_http_requests_total", **labels) == metric(before, "wikigpt_http_requests_total", **labels) + 1
    assert metric(after, "wikigpt_generated_tokens_total") > metric(before, "wikigpt_generated_tokens_total")
    assert metric(after, "wikigpt_time_to_first_token_seconds_count") > metric(before, "wikigpt_time_to_first_token_seconds_count")
    assert metric(after, "wikigpt_prompt_tokens_total") > metric(before, "wikigpt_prompt_tokens_total")
    assert metric(after, "wikigpt_batch_size_count") > metric(before, "wikigpt_batch_size_count")  # steps ran
    # the gauges' values moving is checked while requests decode and wait (test_full_queue_503...)


@pytest.fixture(scope="module")
def long_context_lm(tmp_path_factory):
    """A small model with an 8,192-token context: a request for 4,000 tokens keeps it busy for
    many seconds (4 layers of width 256, ~1 ms a token here) while the test fills the queue."""
    from tests.conftest import make_tiny_model

    from wikigpt.modeling import load_model
    from wikigpt.settings import ModelSettings

    path = make_tiny_model(tmp_path_factory.mktemp("models") / "long", n_layer=4, n_embd=256,
                           n_positions=8192)
    return load_model(ModelSettings(model=str(path), device="cpu"))


def test_full_queue_503_and_disconnect_frees_the_slot(long_context_lm):
    srv = LiveServer(long_context_lm, max_batch_size=1, queue_size=1, retry_after=7)
    long = {"prompt": "Data", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as a, httpx.Client(base_url=srv.url, timeout=60) as b:
            with a.stream("POST", "/v1/completions", json=long) as ra:
                lines_a = ra.iter_lines()  # kept: a dropped iterator closes the response
                first = next(lines_a)  # A is decoding: it holds the only batch slot
                assert ra.status_code == 200 and first.startswith("data: "), first
                with b.stream("POST", "/v1/completions", json={**long, "max_tokens": 5}) as rb:
                    assert rb.status_code == 200  # B is queued
                    state = (srv.engine.queue_depth, srv.engine.batch_size)
                    assert state == (1, 1), state
                    busy = httpx.get(srv.url + "/metrics").text
                    assert metric(busy, "wikigpt_queue_depth") == 1 and metric(busy, "wikigpt_running_sequences") == 1
                    r = httpx.post(srv.url + "/predict", json={"text": "C"}, timeout=30)
                    assert r.status_code == 503 and r.headers["retry-after"] == "7"
                    assert r.json()["error"]["type"] == "overloaded_error"
                    ra.close()  # A's client goes away mid-stream ...
                    t0 = time.monotonic()
                    lines = [x for x in rb.iter_lines() if x.startswith("data: ")]  # ... so B runs
                    assert lines[-1] == "data: [DONE]" and time.monotonic() - t0 < 30
        deadline = time.monotonic() + 10
        while srv.engine.batch_size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.engine.batch_size == 0 and srv.engine.queue_depth == 0
        idle = httpx.get(srv.url + "/metrics").text
        assert metric(idle, "wikigpt_queue_depth") == 0 and metric(idle, "wikigpt_running_sequences") == 0
        assert httpx.post(srv.url + "/predict", json={"text": "D", "max_new_tokens": 3}, timeout=30).status_code == 200
    finally:
        srv.close()


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "x", path)  # /v1/models/{model_id:path} -> /v1/models/x


def test_api_key_guards_every_route_but_health(tiny_lm):
    """Every route the app has, FastAPI's /docs, /redoc and /openapi.json included, answers 401
    without the key or with a wrong one; only /, /health and /ready stay open."""
    import openai

    srv = LiveServer(tiny_lm, api_key="s3cret")
    try:
        routes = [(m, _concrete(r.path)) for r in srv.app.routes for m in sorted(getattr(r, "methods", None) or ())]
        paths = {p for _, p in routes}
        assert {"/docs", "/redoc", "/openapi.json", "/predict", "/metrics"} <= paths, paths
        open_paths = {"/", "/health", "/ready"}
        assert open_paths <= paths
        for method, path in routes:
            if path in open_paths:
                assert httpx.request(method, srv.url + path).status_code == 200, (method, path)
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.request(method, srv.url + path, headers=headers, json={"text": "a"})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert r.json()["error"]["type"] == "authentication_error"
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/openapi.json", headers=key).json()["info"]["title"] == "wikigpt"
        assert httpx.get(srv.url + "/docs", headers=key).status_code == 200
        oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        c = oc.completions.create(model=tiny_lm.name, prompt="Data science is", max_tokens=6, temperature=0)
        want = generate(tiny_lm, "Data science is", SamplingParams(max_new_tokens=6, temperature=0.0))
        assert "Data science is" + c.choices[0].text == want and c.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        srv.close()


def _sse_events(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_streamed_n_and_prompt_lists_match_the_non_streamed_answer(client):
    """Per index, the streamed text equals the non-streamed one with the same seed; one
    finish_reason per index; `[DONE]` last."""
    body = {"prompt": ["Data science is", "The history of", "Wikipedia"], "n": 2, "max_tokens": 12, "seed": 3,
            "stop": ["\n\n"]}
    whole = client.post("/v1/completions", json=body).json()
    want = {ch["index"]: (ch["text"], ch["finish_reason"]) for ch in whole["choices"]}
    assert sorted(want) == list(range(6)) and len({t for t, _ in want.values()}) > 1
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = _sse_events(r)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    texts: dict[int, str] = {i: "" for i in want}
    finishes: dict[int, list[str]] = {i: [] for i in want}
    for e in events[:-1]:
        for ch in json.loads(e)["choices"]:
            texts[ch["index"]] += ch["text"]
            if ch["finish_reason"]:
                finishes[ch["index"]].append(ch["finish_reason"])
    assert {i: (texts[i], finishes[i]) for i in want} == {i: (t, [f]) for i, (t, f) in want.items()}


def test_a_decoding_step_that_raises_fails_its_requests_cleanly_and_the_next_succeeds(client, monkeypatch):
    """Fault injection in the engine's per-step method: the requests in that step get a clear
    error (JSON, or an SSE error event then [DONE]) without a traceback; the server goes on."""
    from wikigpt.engine import Engine

    failures = {"left": 0}
    real_step = Engine._step

    def failing_step(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected fault in a decoding step")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_step", failing_step)
    failures["left"] = 1
    r = client.post("/v1/completions", json={"prompt": "Data science is", "n": 2, "max_tokens": 8})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert "internal error while generating" in r.json()["error"]["message"]
    assert "Traceback" not in r.text and "injected" not in r.text and failures["left"] == 0

    failures["left"] = 1
    with client.stream("POST", "/v1/completions", json={"prompt": ["Data", "Rome"], "max_tokens": 8,
                                                        "stream": True}) as s:
        assert s.status_code == 200
        events = _sse_events(s)
    assert events[-1] == "[DONE]" and failures["left"] == 0
    errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
    assert errors and all("internal error while generating" in e["message"] for e in errors), events
    assert not any("Traceback" in e or "injected" in e for e in events)

    for path, body in (("/predict", {"text": "Still", "max_new_tokens": 4}),
                       ("/v1/completions", {"prompt": "Still", "max_tokens": 4, "n": 2})):
        assert client.post(path, json=body).status_code == 200


def test_a_non_streamed_request_whose_client_goes_away_frees_its_slot(long_context_lm):
    srv = LiveServer(long_context_lm, max_batch_size=1, queue_size=4)
    try:
        body = json.dumps({"prompt": "Data", "max_tokens": 4000, "ignore_eos": True}).encode()
        conn = socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])), timeout=30)
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        srv.wait(lambda: srv.engine.batch_size == 1, "the request never started decoding")
        conn.close()  # the client goes away while its 4,000 tokens are being generated
        srv.wait(lambda: srv.engine.batch_size == 0, "the slot was not freed", seconds=20)
        r = httpx.post(srv.url + "/predict", json={"text": "D", "max_new_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        srv.close()


def test_ready_is_503_until_the_engine_is_warmed_up(tiny_lm):
    """The engine's start (model preparation and warm-up) is held until the test lets it go;
    meanwhile the server is up and says it is not ready."""
    from wikigpt.engine import Engine

    gate = threading.Event()

    class HeldEngine(Engine):
        def start(self):
            threading.Thread(target=lambda: gate.wait(60) and Engine.start(self), daemon=True).start()
            return self

    engine = HeldEngine(tiny_lm, max_batch_size=4)
    srv = LiveServer(client=engine, model=tiny_lm.name, wait_ready=False, retry_after=4)
    try:
        r = httpx.get(srv.url + "/ready", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "4", r.text
        assert "loading" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/").json()["ready"] is False
        gate.set()
        srv.wait(engine.ready.is_set, "the engine never became ready")
        assert httpx.get(srv.url + "/ready").status_code == 200
        assert httpx.post(srv.url + "/predict", json={"text": "Data", "max_new_tokens": 3}).status_code == 200
    finally:
        gate.set()
        srv.close()


def test_serve_with_a_missing_model_exits_2_with_one_line_before_opening_a_port(tmp_path):
    from tests.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIKIGPT_")}
    proc = subprocess.run([sys.executable, "-m", "wikigpt.cli", "serve", "--model", str(tmp_path / "missing"),
                           "--port", str(port)], capture_output=True, text=True, timeout=120,
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wikigpt: error:") and "missing" in lines[0], lines
    assert "Uvicorn" not in proc.stderr
