"""A Hugging Face Hub stand-in on 127.0.0.1: the network boundary, and nothing more, is faked.

It serves one repository from a local directory with the same URLs, headers and error codes
as huggingface.co, so `from_pretrained("fake-org/tiny-gpt2")` runs the real huggingface_hub
download, caching and error-handling code (point HF_ENDPOINT at `url`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """`commits`: the repository's history, newest first (the head of 'main' first); every
    commit holds the same files, and a download names the commit it was served from."""

    def __init__(self, repo_id: str, folder: Path, commits: tuple[str, ...] = (COMMIT,)) -> None:
        self.repo_id, self.folder, self.commits = repo_id, Path(folder), list(commits)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def _send(self, h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _error(self, h, status: int, code: str, body: bool) -> None:
        msg = json.dumps({"error": code}).encode()
        self._send(h, status, msg, {"X-Error-Code": code, "X-Error-Message": code,
                                    "Content-Type": "application/json"}, body)

    def _handle(self, h, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            if not rest.startswith(self.repo_id):
                return self._error(h, 401, "RepositoryNotFound", body)
            tail = rest[len(self.repo_id):].strip("/")
            if tail.startswith("commits/"):
                items = [{"id": c, "authors": [{"user": "someone"}], "date": "2022-06-01T00:00:00.000Z",
                          "title": f"commit {i}", "message": ""} for i, c in enumerate(self.commits)]
                return self._send(h, 200, json.dumps(items).encode(), {"Content-Type": "application/json"}, body)
            if tail.startswith("tree/"):
                sub = tail.split("/", 2)[2] if tail.count("/") >= 2 else ""
                items = [
                    {"type": "file", "path": str(p.relative_to(self.folder)), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                    for p in self._files() if str(p.relative_to(self.folder)).startswith(sub)
                ]
                if sub and not items:
                    return self._error(h, 404, "EntryNotFound", body)
                return self._send(h, 200, json.dumps(items).encode(), {"Content-Type": "application/json"}, body)
            info = {"id": self.repo_id, "modelId": self.repo_id, "sha": self.commits[0], "private": False,
                    "siblings": [{"rfilename": str(p.relative_to(self.folder))} for p in self._files()]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        prefix = f"/{self.repo_id}/resolve/"
        if not path.startswith(prefix):
            return self._error(h, 401, "RepositoryNotFound", body)
        revision, filename = path[len(prefix):].split("/", 1)
        if revision != "main" and revision not in self.commits:
            return self._error(h, 404, "RevisionNotFound", body)
        target = self.folder / filename
        if not target.is_file():
            return self._error(h, 404, "EntryNotFound", body)
        data = target.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        commit = self.commits[0] if revision == "main" else revision
        self._send(h, 200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                                  "Content-Type": "application/octet-stream"}, body)
