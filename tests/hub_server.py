"""In-process fake of the Hugging Face Hub HTTP API, for tests that must not touch the network.

It implements just enough of the Hub for the real, unmodified ``huggingface_hub`` client to create a model repo,
commit files to ``main`` (``upload_folder`` / ``create_commit``) and download them back (``hf_hub_download`` /
``snapshot_download``) into the standard cache layout. Everything lives in memory and every commit gets a 40-hex sha.

Only the "regular" upload path exists: the preupload endpoint answers ``uploadMode: "regular"`` for every file, so the
client sends contents inline (base64) in the commit call. Xet is not implemented, so the client must have it disabled:
``HF_HUB_DISABLE_XET=1`` in the environment before ``huggingface_hub`` is imported, or
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` at runtime. Model repos only; no LFS, branches, tags or PRs.

Endpoints::

    POST      /api/repos/create
    POST      /api/validate-yaml
    POST      /api/models/{repo_id}/preupload/{revision}
    POST      /api/models/{repo_id}/commit/{revision}
    GET       /api/models/{repo_id}[/revision/{revision}]
    GET       /api/models/{repo_id}/tree/{revision}[/{path}]
    GET/HEAD  /{repo_id}/resolve/{revision}/{path}

Usage::

    with local_hub() as hub:
        HfApi(endpoint=hub.url, token="test-token").create_repo("user/geo")
        ...
        hub.repos["user/geo"][-1].files  # {path: bytes} of the latest commit
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob holding ``data`` (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


class HubError(Exception):
    """An error answered the way the Hub does: status code plus the ``X-Error-Code`` header the client dispatches on."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class FakeHub:
    """The in-memory state: ``repos`` maps a repo id to its commits, oldest first; ``main`` is the last one."""

    url: str = ""
    repos: dict[str, list[Commit]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_stop: Callable[[], None] | None = None

    def stop(self) -> None:
        """Stop serving now, as when the Hub is out of reach (the state stays readable; a second call does nothing)."""
        if self.on_stop is not None:
            self.on_stop()
            self.on_stop = None

    def commits(self, repo_id: str) -> list[Commit]:
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return self.repos[repo_id]

    def resolve(self, repo_id: str, revision: str) -> Commit:
        commits = self.commits(repo_id)
        if revision == "main" and commits:
            return commits[-1]
        for commit in commits:
            if commit.sha == revision:
                return commit
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def head_files(self, repo_id: str, revision: str) -> dict[str, bytes]:
        """Files at the tip of ``main``, which is the only branch commits can go to (empty before the first commit)."""
        commits = self.commits(repo_id)
        if revision != "main":
            raise HubError(404, "RevisionNotFound", f"Can only commit to main, not {revision}")
        return dict(commits[-1].files) if commits else {}

    def add_commit(self, repo_id: str, revision: str, ndjson: bytes) -> Commit:
        files, message = self.head_files(repo_id, revision), ""
        for line in filter(None, ndjson.splitlines()):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, "BadRequest", f"Unsupported commit operation: {key}")
        commits = self.commits(repo_id)
        state = [repo_id, len(commits), message, sorted((p, git_blob_sha(d)) for p, d in files.items())]
        commit = Commit(hashlib.sha1(json.dumps(state).encode()).hexdigest(), message, files)
        commits.append(commit)
        return commit


def _tree_entries(commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """The ``list_repo_tree`` entries under ``prefix``: direct children, or the whole subtree if ``recursive``."""
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, data in sorted(commit.files.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base) :].split("/")
        folders = [base + "/".join(parts[:i]) for i in range(1, len(parts))]
        for folder in folders if recursive else folders[:1]:
            entries.setdefault(folder, {"type": "directory", "oid": git_blob_sha(folder.encode()), "size": 0, "path": folder})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
    if base and not entries:
        raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {commit.sha}")
    return list(entries.values())


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), "tree"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to ``FakeHub``. HTTP/1.0, so every connection closes: a stopped server serves nothing more."""

    server: _Server

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_GET

    def _dispatch(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        method = "GET" if self.command == "HEAD" else self.command
        try:
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if match and route_method == method:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.server.hub.lock:
                        getattr(self, f"_{name}")(body=body, query=parse_qs(url.query), **args)
                    return
            raise HubError(404, "NotFound", f"No route for {self.command} {url.path}")
        except HubError as err:
            headers = {"X-Error-Code": err.code, "X-Error-Message": err.message, **err.headers}
            self._send(err.status, {"error": err.message}, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _create_repo(self, body: bytes, **_: Any) -> None:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "BadRequest", "This fake hub only hosts model repos")
        repo_id = "/".join(filter(None, [payload.get("organization"), payload["name"]]))
        url = f"{self.server.hub.url}/{repo_id}"
        if repo_id in self.server.hub.repos:  # with exist_ok=True the client reads `url` from this 409 answer
            self._send(409, {"error": "You already created this model repo", "url": url})
            return
        self.server.hub.repos[repo_id] = []
        self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, **_: Any) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, body: bytes, repo: str, rev: str, **_: Any) -> None:
        current = self.server.hub.head_files(repo, rev)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": _oid(current.get(f["path"]))}
            for f in json.loads(body)["files"]
        ]
        self._send(200, {"files": files})

    def _commit(self, body: bytes, repo: str, rev: str, **_: Any) -> None:
        commit = self.server.hub.add_commit(repo, rev, body)
        url = f"{self.server.hub.url}/{repo}/commit/{commit.sha}"
        self._send(200, {"commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": None, "success": True})

    def _repo_info(self, repo: str, rev: str = "main", **_: Any) -> None:
        commit = self.server.hub.resolve(repo, rev)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        self._send(200, {"id": repo, "modelId": repo, "sha": commit.sha, "private": False, "siblings": siblings})

    def _tree(self, repo: str, rev: str, query: dict[str, list[str]], path: str = "", **_: Any) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._send(200, _tree_entries(self.server.hub.resolve(repo, rev), path, recursive))

    def _resolve(self, repo: str, rev: str, path: str, **_: Any) -> None:
        commit = self.server.hub.resolve(repo, rev)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {commit.sha}", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        self._send(200, None, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"'}, raw=data)


def _oid(data: bytes | None) -> str | None:
    return None if data is None else git_blob_sha(data)


@contextmanager
def local_hub() -> Iterator[FakeHub]:
    """Serve a fresh, empty ``FakeHub`` on an ephemeral 127.0.0.1 port for the duration of the block."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.hub = FakeHub(url=f"http://127.0.0.1:{server.server_port}")
    thread = threading.Thread(target=server.serve_forever, name="fake-hf-hub", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    server.hub.on_stop = stop
    try:
        yield server.hub
    finally:
        server.hub.stop()
