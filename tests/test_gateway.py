"""`wikigpt serve --upstream`: the API in front of another OpenAI-compatible server, here a real
`wikigpt serve` subprocess on 127.0.0.1. The whole API battery goes through the gateway; the
upstream is killed mid-stream, kept busy past the read timeout, and watched for disconnects."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tests.conftest import free_port, require
from tests.test_api import BAD, LiveServer, metric
from wikigpt.api.upstream import UpstreamClient
from wikigpt.generation import generate
from wikigpt.textfilter import clean_continuation
from wikigpt.decoding import SamplingParams
from wikigpt.settings import ServeSettings


# float32 weights, as the in-process test servers: the gateway sends a request's prompts and n
# choices as separate upstream requests, so they share a batch there or not. bf16 rounding (a CPU
# with native bf16 would serve it) and FBGEMM's int8 (one activation scale per call; "auto"
# chooses int8 where the start-up timing says so) make a row's numbers depend on its batch, and
# so does a prefix-cache hit (the rest of the prompt is one matmul of fewer rows, another
# rounding): the random tiny model's two best tokens are often within 1e-6 of each other.
BATCH_INVARIANT = ("--dtype", "float32", "--quantization", "none", "--no-prefix-caching")


class Upstream:
    """`wikigpt serve` in a subprocess on a free loopback port, ready when constructed."""

    def __init__(self, model_dir, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WIKIGPT_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wikigpt.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--log-level", "warning", *args], env={**env, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "the upstream did not become ready"
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def running(self) -> float:
        return metric(httpx.get(self.url + "/metrics", timeout=10).text, "wikigpt_running_sequences")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stderr.close()


@contextmanager
def served(mode: str, lm, model_dir, **settings):
    """The URL of a live API on `lm`: the in-process engine ("engine"), or a gateway in front of
    a real `wikigpt serve` upstream on `model_dir` in float32 ("gateway"); for tests run in both."""
    if mode == "engine":
        srv = LiveServer(lm, **settings)
        try:
            yield srv.url
        finally:
            srv.close()
        return
    up = Upstream(model_dir, *BATCH_INVARIANT)
    srv = gateway(up.url, **settings)
    try:
        yield srv.url
    finally:
        srv.close()
        up.kill()


def gateway(upstream_url: str, wait_ready: bool = True, **settings) -> LiveServer:
    settings = {"upstream": upstream_url, **settings}
    return LiveServer(client=UpstreamClient(ServeSettings(**settings)), wait_ready=wait_ready, **settings)


@contextmanager
def sent_upstream(srv: LiveServer):
    """The bodies a gateway sends to its upstream's /v1/completions, as they leave (a request
    hook on its real httpx client)."""
    sent: list[dict] = []

    async def record(request: httpx.Request) -> None:
        if request.url.path == "/v1/completions":
            sent.append(json.loads(request.content))

    hooks = srv.engine._http.event_hooks["request"]
    hooks.append(record)
    try:
        yield sent
    finally:
        hooks.remove(record)


def streamed(c: httpx.Client, body: dict) -> tuple[list[str], list[str | None], dict | None]:
    """`body` asked for as a stream: each choice's text and finish_reason, and the usage."""
    texts, finishes, usage = defaultdict(str), {}, None
    with c.stream("POST", "/v1/completions",
                  json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                for ch in event["choices"]:
                    texts[ch["index"]] += ch["text"]
                    finishes[ch["index"]] = ch["finish_reason"] or finishes.get(ch["index"])
                usage = event.get("usage") or usage
    return [texts[i] for i in range(len(texts))], [finishes[i] for i in range(len(texts))], usage


def scored_both_ways(srv: LiveServer, **args) -> tuple[list[dict], object, str, list, list]:
    """A completion with `logprobs` through the gateway, whole and streamed (the `openai`
    client): the bodies sent upstream, the whole choice, the stream's text, tokens and scores."""
    import openai

    oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with sent_upstream(srv) as sent:
        whole = oc.completions.create(**args).choices[0]
        text, tokens, values = "", [], []
        for chunk in oc.completions.create(**args, stream=True):
            for ch in chunk.choices:
                text += ch.text
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
    return sent, whole, text, tokens, values


@pytest.fixture(scope="module")
def upstream(tiny_model_dir):
    up = Upstream(tiny_model_dir, *BATCH_INVARIANT)
    yield up
    up.kill()


@pytest.fixture(scope="module")
def gw(upstream):
    srv = gateway(upstream.url, max_body_bytes=100_000)
    yield srv
    srv.close()


@pytest.fixture()
def client(gw):
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        yield c


def test_cli_gateway_answers_the_original_curl_call(upstream, tiny_model_dir):
    require(shutil.which("curl"), "curl is not installed (.ci/run installs it)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIKIGPT_")}
    proc = subprocess.Popen([sys.executable, "-m", "wikigpt.cli", "serve", "--upstream", upstream.url,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**env, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["curl", "-sf", f"http://localhost:{port}/ready"], capture_output=True).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.2)
        out = subprocess.run(["curl", "-s", "-X", "POST", f"http://localhost:{port}/predict",
                              "-d", '{"text":"Data Science is"}'], capture_output=True, text=True, timeout=60)
        answer = json.loads(out.stdout)
        assert answer["predictions"].startswith("Data Science is") and answer["model"] == str(tiny_model_dir)
        assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] > 0
        root = json.loads(subprocess.run(["curl", "-s", f"http://localhost:{port}/"], capture_output=True,
                                         text=True, timeout=30).stdout)
        assert root["ready"] is True and root["upstream"] == upstream.url and root["context_length"] == 256
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "Data Science" not in err and "POST /predict 200" in err


def test_predict_through_the_gateway_matches_generate_and_the_upstream(client, upstream, tiny_lm):
    greedy = {"text": "The history of", "max_new_tokens": 12, "temperature": 0.0}
    assert client.post("/predict", json=greedy).json()["predictions"] == generate(
        tiny_lm, "The history of", SamplingParams(max_new_tokens=12, temperature=0.0))
    hot = {"text": "The history of", "max_new_tokens": 12, "temperature": 1.5, "seed": 3, "min_p": 1.0}
    assert client.post("/predict", json=hot).json()["predictions"] == generate(  # min_p reaches the upstream
        tiny_lm, "The history of", SamplingParams(max_new_tokens=12, temperature=0.0))
    seeded = {"text": "Data science is", "seed": 7, "stop": ["\n\n"]}
    via = client.post("/predict", json=seeded).json()
    assert via["predictions"] == httpx.post(upstream.url + "/predict", json=seeded, timeout=60).json()["predictions"]
    assert 0 < via["usage"]["completion_tokens"] <= 64  # our default length


def test_openai_client_streams_through_the_gateway(gw, upstream, tiny_lm):
    import openai

    oc = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    direct = openai.OpenAI(base_url=upstream.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = [m.id for m in oc.models.list()]
    seeded = dict(model=model, prompt="Wikipedia is", max_tokens=20, seed=5, top_p=0.9)
    whole = oc.completions.create(**seeded).choices[0].text
    assert whole == direct.completions.create(**seeded).choices[0].text
    pieces, finish, usage = [], None, None
    for chunk in oc.completions.create(**seeded, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            pieces.append(ch.text)
            finish = ch.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == whole and len(pieces) > 1 and finish in {"stop", "length"}
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0

    many = oc.completions.create(model=model, prompt=["Data science is", "The history of"], n=2,
                                 max_tokens=8, seed=1, echo=True)
    same = direct.completions.create(model=model, prompt=["Data science is", "The history of"], n=2,
                                     max_tokens=8, seed=1, echo=True)
    assert [c.text for c in many.choices] == [c.text for c in same.choices]
    assert many.usage.prompt_tokens == same.usage.prompt_tokens


def test_the_upstreams_cached_tokens_pass_through(tiny_lm):
    """usage.prompt_tokens_details.cached_tokens is the upstream's (our engine with prefix
    caching, as here, or vLLM), in a JSON answer and in a stream's last event."""
    up = LiveServer(tiny_lm)
    gw = gateway(up.url)
    try:
        with httpx.Client(base_url=gw.url, timeout=60) as client:
            body = {"prompt": "The history of the Roman Empire covers the history of ancient Rome", "max_tokens": 4,
                    "temperature": 0}
            client.post("/v1/completions", json=body)
            usage = client.post("/v1/completions", json=body).json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1 > 0
            assert streamed(client, body)[2]["prompt_tokens_details"] == usage["prompt_tokens_details"]
    finally:
        gw.close()
        up.close()


def test_a_client_that_does_not_stream_gets_one_non_streamed_upstream_answer(gw, client):
    """/predict and /v1/completions without `stream` ask the upstream for one JSON answer, not an
    event per token; text, finish_reason and usage equal those of the same request streamed.
    Our stop strings go upstream either way (the first prompt's greedy text meets "T", the
    second's does not). Greedy: sampled text may change with how the upstream batches."""
    body = {"prompt": ["Data science is", "The history of"], "n": 2, "max_tokens": 24, "temperature": 0,
            "stop": ["T"]}
    with sent_upstream(gw) as sent:
        whole = client.post("/v1/completions", json=body).json()
        texts, finishes, usage = streamed(client, body)
        predict = client.post("/predict", json={"text": "Data science is", "stop": ["T"]})
    assert [b["stream"] for b in sent] == [False] * 4 + [True] * 4 + [False]
    assert [b.get("stream_options") for b in sent] == [None] * 4 + [{"include_usage": True}] * 4 + [None]
    assert [b["stop"] for b in sent] == [["T"]] * 9
    assert [c["text"] for c in whole["choices"]] == texts
    assert [c["finish_reason"] for c in whole["choices"]] == finishes == ["stop", "stop", "length", "length"]
    assert whole["usage"] == usage and usage["completion_tokens"] > 0
    assert predict.status_code == 200 and predict.json()["usage"]["completion_tokens"] > 0


RAW = ["Rome", " was\n", " \n\n", "\n built", " \t\n\n\n", "in a day", ". The", " END", " of it"]


class Scripted:
    """An OpenAI-compatible upstream on 127.0.0.1 that answers every completion with the raw
    pieces RAW (streamed: an event a piece, then usage, as vLLM sends them; else one JSON) and
    keeps the bodies it got. Blank-line runs and a stop string it does not honour, split
    across two events: what a real upstream sends only by chance."""

    def __init__(self) -> None:
        import uvicorn

        app, self.bodies = FastAPI(), []
        usage = {"prompt_tokens": 1, "completion_tokens": len(RAW), "total_tokens": len(RAW) + 1}

        @app.get("/v1/models")
        def models() -> dict:
            return {"data": [{"id": "scripted"}]}

        @app.post("/v1/completions")
        async def complete(request: Request):
            self.bodies.append(body := await request.json())
            if not body["stream"]:
                return {"choices": [{"index": 0, "text": "".join(RAW), "finish_reason": "length"}], "usage": usage}
            events = [{"choices": [{"index": 0, "text": t, "finish_reason": None if i < len(RAW) - 1 else "length"}]}
                      for i, t in enumerate(RAW)] + [{"choices": [], "usage": usage}]
            return StreamingResponse(iter([*(f"data: {json.dumps(e)}\n\n" for e in events), "data: [DONE]\n\n"]),
                                     media_type="text/event-stream")

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def test_a_whole_answer_is_cleaned_as_a_stream_is():
    """The filter on the one non-streamed answer gives the text of the streamed relay: blank-line
    runs collapsed, cut at our stop string where the upstream ignores it (finish "stop")."""
    up = Scripted()
    srv = gateway(up.url)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for stop, finish in (([], "length"), (["The END"], "stop")):
                body = {"prompt": "Data", "stop": stop}
                whole = c.post("/v1/completions", json=body).json()
                assert "choices" in whole, whole
                texts, finishes, usage = streamed(c, body)
                want = clean_continuation("".join(RAW), stop)
                assert whole["choices"][0]["text"] == texts[0] == want and "\n\n\n" not in want
                assert whole["choices"][0]["finish_reason"] == finishes[0] == finish
                assert whole["usage"]["completion_tokens"] == len(RAW)  # the upstream's count
                if not stop:
                    assert whole["usage"] == usage
        assert [b["stream"] for b in up.bodies] == [False, True, False, True]
    finally:
        srv.close()
        up.close()


def test_bad_requests_through_the_gateway_are_clear_4xx(client):
    """The same battery as the native API: our own checks answer locally, the upstream's
    refusals (context length, token ids) come back with its status and message."""
    for method, path, body, status, words in BAD:
        kw = {"json": body} if isinstance(body, (dict, list)) else {"content": body}
        r = client.request(method, path, **kw)
        assert r.status_code == status, (method, path, body, r.text)
        err = r.json()["error"]
        assert words in err["message"], (words, err)
        assert err["type"] in {"invalid_request_error", "not_found_error"} and "param" in err
        assert "Traceback" not in r.text
    long = client.post("/predict", json={"text": "Data science is " * 120}).json()["error"]["message"]
    assert "max_new_tokens is 64" in long and "max_tokens" not in long  # the field /predict takes
    assert client.post("/predict", json={"text": "still alive"}).status_code == 200


def test_32_concurrent_clients_through_the_gateway(gw, upstream, tiny_lm):
    prompts = [f"{w} is" for w in ("Data", "Rome", "Wikipedia", "Science")] * 8
    want = {p: generate(tiny_lm, p, SamplingParams(max_new_tokens=16, temperature=0.0)) for p in set(prompts)}
    before = httpx.get(gw.url + "/metrics").text

    def call(p):
        with httpx.Client(base_url=gw.url, timeout=120) as c:
            return c.post("/predict", json={"text": p, "max_new_tokens": 16, "temperature": 0.0})

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, prompts))
    assert [a.status_code for a in answers] == [200] * 32
    assert [a.json()["predictions"] for a in answers] == [want[p] for p in prompts]
    after = httpx.get(gw.url + "/metrics").text
    moved = metric(after, "wikigpt_upstream_request_duration_seconds_count", outcome="ok") - metric(
        before, "wikigpt_upstream_request_duration_seconds_count", outcome="ok")
    assert moved == 32  # upstream latency, one observation per forwarded completion


LONG = {"prompt": "Data", "max_tokens": 4000, "ignore_eos": True}


def test_disconnects_reach_the_upstream_and_a_slow_upstream_is_a_504(long_model_dir):
    up = Upstream(long_model_dir, "--max-batch-size", "1")
    srv = None
    try:
        srv = gateway(up.url)  # the default read timeout: a non-streamed answer arrives only at its end
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                lines = r.iter_lines()  # kept: a dropped iterator closes the response
                assert next(lines).startswith("data: ")
                assert up.running() == 1
            srv.wait(lambda: up.running() == 0, "a streamed disconnect did not reach the upstream", seconds=20)
            # a non-streamed client that goes away while its answer is being generated
            body = json.dumps(LONG).encode()
            conn = socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])), timeout=30)
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            srv.wait(lambda: up.running() == 1, "the upstream never ran the request")
            conn.close()
            srv.wait(lambda: up.running() == 0, "a non-streamed disconnect did not reach the upstream", seconds=20)
        assert metric(httpx.get(srv.url + "/metrics").text, "wikigpt_upstream_request_duration_seconds_count",
                      outcome="cancelled") == 2
        # the upstream's only slot is busy, and its queue holds another 4,096 tokens ahead of
        # us: seconds, far past a gateway's read timeout of 0.5 s
        impatient = gateway(up.url, upstream_read_timeout=0.5)
        busy = {**LONG, "max_tokens": 4096, "stream": True}
        with httpx.Client(base_url=up.url, timeout=60) as direct, direct.stream(
                "POST", "/v1/completions", json=busy) as first, direct.stream(
                "POST", "/v1/completions", json=busy) as second:
            assert next(first.iter_lines()).startswith("data: ") and second.status_code == 200
            r = httpx.post(impatient.url + "/predict", json={"text": "Data"}, timeout=60)
            assert r.status_code == 504, r.text
            assert up.url in r.json()["error"]["message"] and "--upstream-read-timeout" in r.text
        impatient.close()
    finally:
        if srv is not None:
            srv.close()
        up.kill()


def test_upstream_killed_mid_stream_is_a_clear_error_and_not_ready(long_model_dir):
    up = Upstream(long_model_dir)
    srv = None
    try:
        srv = gateway(up.url)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                up.kill()
                events = [x[6:] for x in lines if x.startswith("data: ")]
            assert events[-1] == "[DONE]"
            err = json.loads(events[-2])["error"]
            assert err["type"] == "upstream_error" and up.url in err["message"], err
            ready = c.get("/ready")
            assert ready.status_code == 503 and up.url in ready.json()["error"]["message"], ready.text
            r = c.post("/predict", json={"text": "Data"})
            assert r.status_code == 503 and up.url in r.json()["error"]["message"], r.text
            assert "Traceback" not in r.text and c.get("/health").status_code == 200
    finally:
        if srv is not None:
            srv.close()
        up.kill()


def test_model_picks_one_of_the_upstreams_models(upstream, tiny_model_dir):
    wrong = gateway(upstream.url, model="gpt-4", wait_ready=False)
    try:
        wrong.wait(lambda: "not 'gpt-4'" in wrong.engine.not_ready_reason, "the watcher never looked")
        r = httpx.get(wrong.url + "/ready")
        assert r.status_code == 503 and str(tiny_model_dir) in r.json()["error"]["message"], r.text
    finally:
        wrong.close()
    right = gateway(upstream.url, model=str(tiny_model_dir), served_model_name="wiki")
    try:
        assert [m["id"] for m in httpx.get(right.url + "/v1/models").json()["data"]] == ["wiki"]
        r = httpx.post(right.url + "/v1/completions", json={"model": "wiki", "prompt": "Data", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "wiki", r.text
    finally:
        right.close()


def test_an_upstream_that_is_down_from_the_start(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    srv = gateway(url, upstream_connect_timeout=1, wait_ready=False)
    try:
        srv.wait(lambda: "unreachable" in srv.engine.not_ready_reason, "the watcher never tried")
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.get("/ready")
            assert r.status_code == 503 and url in r.json()["error"]["message"] and r.headers["retry-after"]
            r = c.post("/predict", json={"text": "Data"})
            assert r.status_code == 503 and url in r.json()["error"]["message"], r.text
            assert c.get("/").json()["ready"] is False
    finally:
        srv.close()


def test_the_vllm_compose_override_runs_vllm_and_the_backend_in_upstream_mode():
    """docker-compose.vllm.yml as Compose merges it over docker-compose.yml (the Docker test of
    the GPU stack needs GPUs; this checks what the file says)."""
    import yaml

    from tests.conftest import REPO

    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    over = yaml.safe_load((REPO / "docker-compose.vllm.yml").read_text())["services"]
    vllm, backend = over["vllm"], over["backend"]
    script = vllm["entrypoint"][-1]
    assert "vllm.entrypoints.openai.api_server" in script and "--port 8000" in script
    for flag, var in (("--data-parallel-size", "VLLM_DP"), ("--tensor-parallel-size", "VLLM_TP")):
        assert f'{flag} "$${var}"' in script and vllm["environment"][var] == f"${{{var}:-1}}"
    assert vllm["environment"]["WIKIGPT_MODEL"] == base["backend"]["environment"]["WIKIGPT_MODEL"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert backend["command"][backend["command"].index("--upstream") + 1] == "http://vllm:8000"
    assert backend["build"]["dockerfile"] == "docker/gateway.Dockerfile"  # the slim image: no torch
    assert "/ready" in " ".join(backend["healthcheck"]["test"]) and "ui" not in over  # the UI unchanged
    assert base["ui"]["depends_on"]["backend"]["condition"] == "service_healthy"


def test_the_gateway_imports_no_torch_transformers_or_engine():
    """`serve --upstream` is a relay: a fresh interpreter that loads everything it runs (the CLI,
    the app, the upstream client, the server) has not loaded torch, transformers or the engine."""
    code = ("import sys\n"
            "from wikigpt.cli import main, run_serve\n"
            "from wikigpt.api import create_app\n"
            "from wikigpt.api.upstream import UpstreamClient\n"
            "from wikigpt.api.server import serve\n"
            "from wikigpt.settings import ServeSettings\n"
            "create_app(ServeSettings(upstream='http://127.0.0.1:9'), UpstreamClient(ServeSettings(upstream='http://127.0.0.1:9')))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'tokenizers', 'numpy', "
            "'safetensors'} or m.startswith('wikigpt.engine') or m in {'wikigpt.modeling', 'wikigpt.generation'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
