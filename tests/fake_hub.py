"""A Hugging Face Hub stand-in on 127.0.0.1: the network boundary, and nothing more, is faked.

It serves one repository from a local directory with the same URLs, headers and error codes
as huggingface.co, so `from_pretrained("fake-org/tiny-gpt2")` runs the real huggingface_hub
download, caching and error-handling code (point HF_ENDPOINT at `url`).

With `token`, it also takes uploads as the Hub's API does, for the real `HfApi.create_repo` /
`create_commit` (`wikigpt push`): whoami, repository creation (409 when it exists), README
metadata validation, preupload and the ndjson commit, each refusing any other token with 401.
Every file is answered "regular" at preupload (base64 in the commit) where the Hub would take
large ones through LFS/Xet: the client's code up to the commit is the same, the blob transfer
is not exercised. A commit writes its files into the folder and becomes the head of 'main'.
"""

from __future__ import annotations

import base64
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
                 hidden: dict[str, set[str]] | None = None, pulls: list[dict] | None = None,
                 token: str | None = None, user: str = "fake-org") -> None:
        """No `commits`: the repository does not exist until created (uploads need `token`)."""
        self.repo_id, self.folder, self.commits = repo_id, Path(folder), list(commits)
        self.hidden, self.pulls = hidden or {}, pulls or []
        self.token, self.user = token, user
        self.exists, self.private = bool(commits), False
        self.requests: list[str] = []
        self.commit_messages: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_POST(self) -> None:
                hub._write(self)

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
        if parts == ["api", "whoami-v2"]:
            return self._whoami(h, body)
        org_name = self.repo_id.split("/")
        if parts[:2] == ["api", "models"]:
            if parts[2:4] != org_name or not self.exists:
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
        if parts[:2] != org_name or len(parts) < 5 or parts[2] != "resolve" or not self.exists:
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

    # ---- uploads --------------------------------------------------------------------------------
    def _write(self, h) -> None:
        raw = urlparse(h.path).path
        self.requests.append(f"POST {unquote(raw)}")
        data = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if self.token is None or h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "Invalid credentials in Authorization header", True)
        parts = [unquote(x) for x in raw.strip("/").split("/")]
        if parts == ["api", "repos", "create"]:
            req = json.loads(data)
            if f"{req.get('organization') or self.user}/{req['name']}" != self.repo_id:
                return self._error(h, 403, "You don't have the rights to create a model under this namespace", True)
            if self.exists:
                return self._send(h, 409, json.dumps({"error": "You already created this model repo",
                                                      "url": f"{self.url}/{self.repo_id}"}).encode(),
                                  {"Content-Type": "application/json"}, True)
            self.exists, self.private = True, req.get("visibility") == "private"
            return self._json(h, {"url": f"{self.url}/{self.repo_id}", "name": self.repo_id}, True)
        if parts == ["api", "validate-yaml"]:
            import yaml

            content = json.loads(data)["content"]
            try:
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                assert isinstance(meta, dict)
            except Exception as exc:  # noqa: BLE001 - the Hub answers 400 with the reason
                return self._send(h, 400, json.dumps({"errors": [{"message": f"invalid YAML: {exc}"}]}).encode(),
                                  {"Content-Type": "application/json"}, True)
            return self._json(h, {"errors": [], "warnings": []}, True)
        if parts[:2] != ["api", "models"] or parts[2:4] != self.repo_id.split("/") or not self.exists:
            return self._error(h, 404, "RepositoryNotFound", True)
        if parts[4:5] == ["preupload"]:
            files = json.loads(data)["files"]
            return self._json(h, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                             "oid": None} for f in files]}, True)
        if parts[4:5] == ["commit"]:
            lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            for item in lines:
                if item["key"] == "header":
                    self.commit_messages.append(item["value"]["summary"])
                elif item["key"] == "file":
                    target = self.folder / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
                else:
                    return self._error(h, 400, f"unexpected commit item {item['key']}", True)
            commit = hashlib.sha1(data).hexdigest()
            self.commits.insert(0, commit)
            return self._json(h, {"commitUrl": f"{self.url}/{self.repo_id}/commit/{commit}", "commitOid": commit,
                                  "success": True}, True)
        return self._error(h, 404, "EntryNotFound", True)

    def _whoami(self, h, body: bool) -> None:
        if self.token is None or h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "Invalid credentials in Authorization header", body)
        return self._json(h, {"type": "user", "name": self.user, "auth": {"type": "access_token",
                                                                          "accessToken": {"role": "write"}}}, body)
