"""An HTTP client for `wikigpt serve`, without Streamlit: the web UI's and `wikigpt score`'s,
usable from a script or a notebook. GET / for the health facts, POST /v1/completions streamed
as server-sent events, and scoring a text (its tokens' log-probabilities).

Every way the backend can fail (down, slow, an error answer, a broken stream) is raised as a
BackendError that says what failed, why, and the URL tried; the connect and read timeouts of
UISettings bound every wait.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import requests

from .errors import WikigptError
from .scoring import Scored
from .settings import UISettings


class BackendError(WikigptError):
    """A backend failure told for a person: what failed, why, and the URL tried (a WikigptError,
    so `wikigpt score` exits with its code and message)."""

    def __init__(self, title: str, detail: str, url: str, *, kind: str = "error") -> None:
        super().__init__(f"{title}: {detail} ({url})")
        self.title, self.detail, self.url, self.kind = title, detail, url, kind

    def as_dict(self) -> dict:
        return {"title": self.title, "detail": self.detail, "url": self.url, "kind": self.kind}


@dataclass
class Completion:
    """What a streamed completion reported besides its text."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    seconds: float = 0.0


def _headers(s: UISettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}


def _request_failure(exc: requests.RequestException, url: str, s: UISettings) -> BackendError:
    # requests raises ReadTimeout before the response starts, but a stream that stalls later
    # surfaces as ConnectionError wrapping urllib3's ReadTimeoutError: both are "too slow".
    if isinstance(exc, requests.ConnectTimeout):
        return BackendError(
            "The backend did not accept the connection",
            f"No answer within {s.connect_timeout:g} s (--connect-timeout). Is the host right and up?",
            url, kind="timeout",
        )
    if isinstance(exc, requests.ReadTimeout) or "timed out" in str(exc).lower():
        return BackendError(
            "The backend is too slow",
            f"Nothing arrived for {s.read_timeout:g} s (--read-timeout). It may be overloaded or "
            "still loading the model; retry in a moment.",
            url, kind="timeout",
        )
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return BackendError(
            "The backend closed the stream early", "The connection dropped mid-answer: did the backend stop?",
            url, kind="unreachable",
        )
    if isinstance(exc, requests.ConnectionError):
        return BackendError(
            "Cannot reach the backend", "The connection was refused or dropped. Is wikigpt serve running?",
            url, kind="unreachable",
        )
    return BackendError("The request to the backend failed", type(exc).__name__, url)


def _http_error(resp: requests.Response, url: str) -> BackendError:
    """The API's JSON error ({"error": {"message", "type", "param"}}), or the start of the body."""
    try:
        err = resp.json()["error"]
        detail = str(err["message"])
        if err.get("param"):
            detail += f" (parameter: {err['param']})"
    except (ValueError, KeyError, TypeError):
        detail = resp.text.strip()[:300] or resp.reason or "no details"
    kind = {401: "auth", 503: "not_ready"}.get(resp.status_code, "http")
    return BackendError(f"The backend answered HTTP {resp.status_code}", detail, url, kind=kind)


def _answer(s: UISettings, method: str, url: str, read_timeout: float, **kwargs) -> requests.Response:
    """One request read whole; a transport failure or a status other than 200 as a BackendError."""
    try:
        resp = requests.request(method, url, headers=_headers(s), timeout=(s.connect_timeout, read_timeout),
                                **kwargs)
    except requests.RequestException as exc:
        raise _request_failure(exc, url, s) from None
    if resp.status_code != 200:
        raise _http_error(resp, url)
    return resp


def fetch_health(s: UISettings) -> dict:
    """GET / of the API: {"status": "ok", "model": ..., ...}; BackendError when it is not healthy."""
    url = s.api_url + "/"
    resp = _answer(s, "GET", url, read_timeout=min(s.read_timeout, 10.0))
    try:
        health = resp.json()
    except ValueError:
        health = None
    if not isinstance(health, dict):
        raise BackendError(
            "Something else answers at this URL", "Its GET / is not the wikigpt health JSON.", url,
            kind="protocol",
        )
    return health


def _sse_data(resp: requests.Response) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event stream.

    Parsed by hand: the OpenAI-style stream uses only `data:` fields and the framing is a dozen
    lines, not worth a dependency in the UI image. Comments (`: ping`) and other fields are
    skipped; multi-line data is joined with newlines as the SSE spec says.
    """
    data: list[str] = []
    for raw in resp.iter_lines():
        line = raw.decode("utf-8", errors="replace")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def stream_completion(
    s: UISettings, prompt: str, sampling: dict, out: Completion, model: str | None = None
) -> Iterator[str]:
    """Stream the continuation of `prompt` from POST /v1/completions, piece by piece.

    Fills `out` as it goes (text, finish reason, usage), so a caller keeps the partial text
    when the stream fails; every failure is raised as a BackendError.
    """
    url = s.api_url + "/v1/completions"
    body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **sampling}
    if model:
        body["model"] = model
    started = time.perf_counter()
    try:
        with requests.post(
            url, json=body, headers=_headers(s), stream=True, timeout=(s.connect_timeout, s.read_timeout)
        ) as resp:
            if resp.status_code != 200:
                raise _http_error(resp, url)
            if "text/event-stream" not in resp.headers.get("content-type", ""):
                raise BackendError(
                    "The backend did not stream", "Expected server-sent events (text/event-stream).", url,
                    kind="protocol",
                )
            for data in _sse_data(resp):
                if data.strip() == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise BackendError(
                        "The backend sent an unreadable event", data[:200], url, kind="protocol"
                    ) from None
                if not isinstance(chunk, dict) or not all(isinstance(c, dict) for c in chunk.get("choices") or ()):
                    raise BackendError("The backend sent an unexpected event", data[:200], url, kind="protocol")
                if chunk.get("error"):
                    err = chunk["error"]
                    detail = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    raise BackendError("The backend failed while generating", detail, url)
                out.usage = chunk.get("usage") or out.usage
                for choice in chunk.get("choices") or ():
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                    piece = str(choice.get("text") or "")
                    if piece:
                        out.text += piece
                        out.seconds = time.perf_counter() - started
                        yield piece
    except requests.RequestException as exc:
        raise _request_failure(exc, url, s) from None
    finally:
        out.seconds = time.perf_counter() - started
    raise BackendError(
        "The backend closed the stream early", "The answer stopped before its end marker ([DONE]).", url,
        kind="protocol",
    )


def score_text(s: UISettings, text: str, top: int = 5, api_url: str | None = None) -> Scored:
    """The model's surprise at every token of `text`: POST /v1/completions with `max_tokens: 0,
    echo: true, logprobs: top` (OpenAI's way to score a prompt; vLLM answers it too).

    `api_url` overrides `s.api_url` (the UI's second backend). A text longer than the model's
    context is the backend's 400, raised as a BackendError that quotes it."""
    url = (api_url or s.api_url).rstrip("/") + "/v1/completions"
    body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": top, "temperature": 0}
    resp = _answer(s, "POST", url, read_timeout=s.read_timeout, json=body)
    try:
        answer = resp.json()
        choice = answer["choices"][0]
        return Scored.from_openai(choice["logprobs"], str(answer.get("model") or ""), top_n=top, text=text)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BackendError("The backend's answer has no token scores",
                           f"Expected OpenAI's logprobs object in choices[0] ({type(exc).__name__}: {exc}).",
                           url, kind="protocol") from None
