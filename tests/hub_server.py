"""A local stand-in for the Hugging Face Hub (there is no network here), for the tests of loading by repo id.

It serves folders as repos at one commit each through the endpoints huggingface_hub's real
download code calls, bound to 127.0.0.1 on a port the OS chooses.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import HfApi, constants


class FakeHub:
    """A local stand-in for the Hub (there is no network here): serves folders as repos at one commit each.

    Answers what huggingface_hub 2.4's ``snapshot_download``/``hf_hub_download`` ask for:
    ``GET /api/models/{repo}/revision/{rev}`` (the commit), ``GET /api/models/{repo}/tree/{commit}``
    (the file list) and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with the headers the client
    requires (``X-Repo-Commit``, ``ETag``, ``Content-Length``). Bound to 127.0.0.1, shut down by
    the fixture that started it (its thread is a daemon, so it never outlives the test run).
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, tuple[str, Path]]] = {}  # repo -> revision -> (commit, folder)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.serve(self, body=True)

            def do_HEAD(self) -> None:
                hub.serve(self, body=False)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, repo: str, folder: Path, revision: str = "main") -> None:
        commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.repos.setdefault(repo, {})[revision] = (commit, folder)

    def commit(self, repo: str, revision: str = "main") -> str:
        return self.repos[repo][revision][0]

    def _lookup(self, repo: str, rev: str) -> tuple[str, Path] | None:
        for commit, folder in self.repos.get(repo, {}).values():
            if rev == commit:
                return commit, folder
        return self.repos.get(repo, {}).get(rev)

    def serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append(f"{request.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            found = self._lookup("/".join(parts[2:4]), parts[5])
            if found is None:
                return self._send(request, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
            commit, folder = found
            files = sorted(p for p in folder.iterdir() if p.is_file())
            if parts[4] == "revision":
                info = {"id": "/".join(parts[2:4]), "sha": commit, "siblings": [{"rfilename": p.name} for p in files]}
            else:
                info = [{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": _sha1(p)} for p in files]
            return self._send(request, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            found = self._lookup("/".join(parts[:2]), parts[3])
            if found is None:
                return self._send(request, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
            commit, folder = found
            file = folder / "/".join(parts[4:])
            if not file.is_file():
                return self._send(request, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body)
            data = file.read_bytes()
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(request, 200, data, headers, body)
        return self._send(request, 404, b"", {}, body)

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict, body: bool) -> None:
        request.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(data)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def intercept_hub(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Intercept HfApi.create_repo / create_branch / create_commit (there is no network here) and record them.

    This is the narrowest seam: everything up to the HTTP requests of those three calls is huggingface_hub's
    own code and ours, and ``calls.files`` holds the bytes that would have been uploaded.

    Offline mode is on, so any other request huggingface_hub tried to make would fail the test.
    """
    calls = SimpleNamespace(repo=None, branch=None, commit=None, files={})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def create_repo(self, repo_id, **kwargs):
        calls.repo = dict(repo_id=repo_id, token=self.token, **kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        calls.branch = dict(repo_id=repo_id, **kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        calls.commit = dict(repo_id=repo_id, token=self.token, **kwargs)
        calls.files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls
