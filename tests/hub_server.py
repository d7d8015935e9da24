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
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from huggingface_hub import HfApi, constants


class FakeHub:
    """A local stand-in for the Hub (there is no network here): serves folders as repos at one commit each.

    Answers what huggingface_hub 2.4's ``snapshot_download``/``hf_hub_download`` ask for:
    ``GET /api/models/{repo}/revision/{rev}`` (the commit, and every file as a sibling),
    ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (the entries of the folder or of ``path``, files and
    directories, everything below it with ``?recursive=true`` as snapshot_download asks; paths relative
    to the repo root, ``member0/config.json``) and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (files in
    subfolders too) with the headers the client requires (``X-Repo-Commit``, ``ETag``,
    ``Content-Length``). As the real Hub, an unknown repo answers 404 ``RepoNotFound``, an unknown
    revision of a served repo ``RevisionNotFound`` and a missing path ``EntryNotFound``. A revision is
    a name given to :meth:`add` or its commit. Bound to 127.0.0.1, shut down by the fixture that
    started it (its thread is a daemon, so it never outlives the test run).
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
        self.repos.setdefault(repo, {})[revision] = (commit, Path(folder))

    def commit(self, repo: str, revision: str = "main") -> str:
        return self.repos[repo][revision][0]

    def _lookup(self, repo: str, rev: str) -> tuple[str, Path] | str:
        """``(commit, folder)``, or the Hub's error code when the repo or the revision is unknown."""
        if repo not in self.repos:
            return "RepoNotFound"
        for commit, folder in self.repos[repo].values():
            if rev == commit:
                return commit, folder
        return self.repos[repo].get(rev, "RevisionNotFound")

    def serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(request.path)
        # split before unquoting: a revision comes quoted whole (refs%2Fpr%2F1), a file path keeps its slashes
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.requests.append(f"{request.command} /{'/'.join(parts)}")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            found = self._lookup("/".join(parts[2:4]), parts[5])
            if isinstance(found, str):
                return self._send(request, 404, b"{}", {"X-Error-Code": found}, body)
            commit, folder = found
            if parts[4] == "revision":
                files = [_path(p, folder) for p in sorted(folder.rglob("*")) if p.is_file()]
                info = {"id": "/".join(parts[2:4]), "sha": commit, "siblings": [{"rfilename": f} for f in files]}
            else:
                base = _inside(folder, "/".join(parts[6:]))
                if base is None or not base.is_dir():
                    return self._send(request, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("true", "1")
                info = [_entry(p, folder) for p in sorted(base.rglob("*") if recursive else base.iterdir())]
            return self._send(request, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            found = self._lookup("/".join(parts[:2]), parts[3])
            if isinstance(found, str):
                return self._send(request, 404, b"", {"X-Error-Code": found}, body)
            commit, folder = found
            file = _inside(folder, "/".join(parts[4:]))
            if file is None or not file.is_file():
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


def _inside(folder: Path, path: str) -> Path | None:
    """``folder / path``, or None when ``path`` would leave the folder."""
    target = (folder / path).resolve()
    return target if target.is_relative_to(folder.resolve()) else None


def _path(p: Path, folder: Path) -> str:
    """A file's path in the repo, as the Hub writes it: relative to the root, with forward slashes."""
    return p.relative_to(folder).as_posix()


def _entry(p: Path, folder: Path) -> dict:
    """A tree entry as the Hub lists it: a file with its size and blob id, or a directory with a tree id."""
    path = _path(p, folder)
    if p.is_dir():
        return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
    return {"type": "file", "path": path, "size": p.stat().st_size, "oid": _sha1(p)}


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
