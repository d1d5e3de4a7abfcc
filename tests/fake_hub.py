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
    """`commits`: the repository's history, newest first (the head of 'main' first). Every
    commit holds the folder's files except those `hidden` names for it; a download names the
    commit it was served from. `pulls`: open pull requests, each {"num", "author", "title",
    "commits"} (its own history, newest first), served at refs/pr/<num>."""

    def __init__(self, repo_id: str, folder: Path, commits: tuple[str, ...] = (COMMIT,),
                 hidden: dict[str, set[str]] | None = None, pulls: list[dict] | None = None) -> None:
        self.repo_id, self.folder, self.commits = repo_id, Path(folder), list(commits)
        self.hidden, self.pulls = hidden or {}, pulls or []
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

    def _history(self, revision: str) -> list[str] | None:
        """The commits reachable from `revision` (a branch, a pull request or a commit), newest first."""
        if revision == "main":
            return self.commits
        for pr in self.pulls:
            if revision == f"refs/pr/{pr['num']}" or revision in pr["commits"][:1]:
                return pr["commits"]
        return self.commits[self.commits.index(revision):] if revision in self.commits else None

    def _files(self, revision: str) -> list[Path]:
        commit = self._history(revision)[0]
        return sorted(p for p in self.folder.rglob("*")
                      if p.is_file() and str(p.relative_to(self.folder)) not in self.hidden.get(commit, set()))

    def _send(self, h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _json(self, h, value, body: bool) -> None:
        self._send(h, 200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

    def _error(self, h, status: int, code: str, body: bool) -> None:
        msg = json.dumps({"error": code}).encode()
        self._send(h, status, msg, {"X-Error-Code": code, "X-Error-Message": code,
                                    "Content-Type": "application/json"}, body)

    def _handle(self, h, body: bool) -> None:
        raw = urlparse(h.path).path
        self.requests.append(f"{h.command} {unquote(raw)}")
        parts = [unquote(x) for x in raw.strip("/").split("/")]  # each segment unquoted: refs%2Fpr%2F1
        org_name = self.repo_id.split("/")
        if parts[:2] == ["api", "models"]:
            if parts[2:4] != org_name:
                return self._error(h, 401, "RepositoryNotFound", body)
            kind, rest = (parts[4], parts[5:]) if len(parts) > 4 else ("", [])
            if kind == "discussions":
                items = [{"num": pr["num"], "title": pr["title"], "author": {"name": pr["author"]},
                          "createdAt": "2023-06-01T00:00:00.000Z", "status": "open", "isPullRequest": True,
                          "repo": {"name": self.repo_id, "type": "model"}} for pr in self.pulls]
                return self._json(h, {"discussions": items, "count": len(items), "start": 0}, body)
            history = self._history(rest[0] if rest else "main")
            if history is None:
                return self._error(h, 404, "RevisionNotFound", body)
            revision = rest[0] if rest else "main"
            if kind == "commits":
                return self._json(h, [{"id": c, "authors": [{"user": "someone"}], "date": "2022-06-01T00:00:00.000Z",
                                       "title": f"commit {i}", "message": ""} for i, c in enumerate(history)], body)
            files = self._files(revision)
            if kind == "tree":
                sub = "/".join(rest[1:])
                items = [{"type": "file", "path": str(p.relative_to(self.folder)), "size": p.stat().st_size,
                          "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                         for p in files if str(p.relative_to(self.folder)).startswith(sub)]
                if sub and not items:
                    return self._error(h, 404, "EntryNotFound", body)
                return self._json(h, items, body)
            return self._json(h, {"id": self.repo_id, "modelId": self.repo_id, "sha": history[0], "private": False,
                                  "siblings": [{"rfilename": str(p.relative_to(self.folder))} for p in files]}, body)
        if parts[:2] != org_name or len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 401, "RepositoryNotFound", body)
        revision, filename = parts[3], "/".join(parts[4:])
        history = self._history(revision)
        if history is None:
            return self._error(h, 404, "RevisionNotFound", body)
        target = self.folder / filename
        if target not in self._files(revision):
            return self._error(h, 404, "EntryNotFound", body)
        data = target.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        self._send(h, 200, data, {"X-Repo-Commit": history[0], "ETag": f'"{etag}"',
                                  "Content-Type": "application/octet-stream"}, body)
