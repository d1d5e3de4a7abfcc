"""A server that runs for weeks (api/server.py, the stream backlog): SIGTERM drains and exits 0,
and a client that stops reading its stream is aborted and its slot freed. Real `wikigpt serve`
processes on 127.0.0.1, in both serving modes (the gateway in front of a real upstream)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from benchmarks.common import ServerProcess
from tests.test_api import metric

LONG = {"prompt": "Data", "max_tokens": 4096, "ignore_eos": True}  # ~6 s of decoding here
ENV = {"WIKIGPT_COMPILE": "false"}


@contextmanager
def served(mode: str, model_dir, tmp_path, *args: str):
    """(the server the client talks to, the one that decodes): the same process in engine mode;
    in gateway mode a `serve --upstream` in front of a `wikigpt serve`."""
    with ExitStack() as stack:
        if mode == "engine":
            srv = stack.enter_context(ServerProcess(["--model", str(model_dir), *args], tmp_path / "srv.log", ENV))
            yield srv, srv
        else:
            up = stack.enter_context(ServerProcess(["--model", str(model_dir)], tmp_path / "up.log", ENV))
            gw = stack.enter_context(ServerProcess(["--upstream", up.url, *args], tmp_path / "gw.log", ENV))
            yield gw, up


def running(srv: ServerProcess) -> float:
    return metric(httpx.get(srv.url + "/metrics", timeout=10).text, "wikigpt_running_sequences")


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def events(lines) -> list:
    """The SSE payloads of `lines`: dicts, and the final "[DONE]"."""
    return [json.loads(x[6:]) if x[6:].startswith("{") else x[6:] for x in lines if x.startswith("data: ")]


@pytest.mark.parametrize("mode", ["engine", "gateway"])
def test_sigterm_drains_finishes_what_fits_ends_the_rest_cleanly_and_exits_0(mode, long_model_dir, tmp_path):
    with served(mode, long_model_dir, tmp_path, "--shutdown-grace", "2.5") as (srv, decoder), \
            httpx.Client(base_url=srv.url, timeout=60) as a, httpx.Client(base_url=srv.url, timeout=60) as b:
        t = time.monotonic()
        a.post("/v1/completions", json={**LONG, "max_tokens": 200}).raise_for_status()
        short_tokens = max(50, int(100 / (time.monotonic() - t)))  # ~0.5 s of decoding alone
        whole: dict = {}
        waiter = threading.Thread(target=lambda: whole.update(r=httpx.post(srv.url + "/v1/completions", json=LONG,
                                                                           timeout=60)))
        waiter.start()
        wait_for(lambda: running(decoder) == 1, "the whole-answer request decoding")
        with a.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as long_stream, \
                b.stream("POST", "/v1/completions", json={**LONG, "max_tokens": short_tokens, "stream": True}) as short:
            long_lines, short_lines = long_stream.iter_lines(), short.iter_lines()
            got_long, got_short = [next(long_lines)], [next(short_lines)]  # both decoding
            started = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = httpx.post(srv.url + "/predict", json={"text": "new"}, timeout=10)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "overloaded_error"
            assert httpx.get(srv.url + "/ready", timeout=10).status_code == 503
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # alive while it drains
            assert "wikigpt_http_requests_total" in httpx.get(srv.url + "/metrics", timeout=10).text
            short_events = events(got_short + list(short_lines))  # in flight at the signal, done within grace
            long_events = events(got_long + list(long_lines))
        waiter.join(30)
        assert srv.proc.wait(20) == 0
        took = time.monotonic() - started
    assert short_events[-1] == "[DONE]" and not any("error" in e for e in short_events[:-1]), short_events[-3:]
    assert [c["finish_reason"] for e in short_events[:-1] for c in e["choices"]][-1] == "length"
    # the long ones outlived the 2.5 s grace: ended with a clear error, nothing cut off mid-event
    assert long_events[-1] == "[DONE]" and "shutting down" in long_events[-2]["error"]["message"], long_events[-3:]
    assert whole["r"].status_code == 503 and "shutting down" in whole["r"].json()["error"]["message"]
    assert 2.5 <= took < 15
    log = (tmp_path / ("srv.log" if mode == "engine" else "gw.log")).read_text()
    assert "Traceback" not in log, log


def stalled_stream(url: str, body: dict) -> socket.socket:
    """A streamed request on a socket whose owner never reads (a 4 KB receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    return sock


@pytest.mark.parametrize("mode", ["engine", "gateway"])
def test_a_reader_that_stops_reading_is_aborted_and_its_slot_freed(mode, long_model_dir, tmp_path):
    with served(mode, long_model_dir, tmp_path, "--stream-backlog", "16") as (srv, decoder):
        # 4 x 4,096 tokens of ~1.5 kB events: more than the socket buffers on both sides hold
        sock = stalled_stream(srv.url, {**LONG, "stream": True, "logprobs": 20, "n": 4})
        try:
            wait_for(lambda: running(decoder) == 4, "the request decoding")
            # connected, not reading: the backlog fills and the request is aborted long before
            # its 4,096 tokens, while the connection stays open
            wait_for(lambda: running(decoder) == 0, "the stalled request's slot freed", seconds=60)
            assert httpx.post(srv.url + "/predict", json={"text": "next", "max_new_tokens": 3}, timeout=30).status_code == 200
            sock.settimeout(30)
            raw = b""
            while not raw.endswith(b"data: [DONE]\r\n\r\n") and not raw.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(1 << 16)
                assert chunk, raw[-300:]
                raw += chunk
        finally:
            sock.close()
    text = raw.decode("utf-8", "replace")
    assert "did not read its stream" in text and "--stream-backlog" in text, text[-500:]
    assert text.count('"finish_reason":"length"') == 0  # it never got to finish


def test_compose_gives_the_drain_its_grace_before_killing():
    import yaml

    from tests.conftest import REPO

    backend = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["backend"]
    grace = float(backend["environment"]["WIKIGPT_SHUTDOWN_GRACE"])
    assert backend["stop_grace_period"].endswith("s") and float(backend["stop_grace_period"][:-1]) >= grace + 3
    assert backend["init"] is True  # tini passes the SIGTERM on to wikigpt
