"""A local Hugging Face Hub stand-in: repositories served from directories over real HTTP.

Point ``HF_ENDPOINT`` at :attr:`HubServer.url` and ``huggingface_hub`` (``HfApi``,
``HfFileSystem``, ``hf_hub_download``) and ``datasets`` talk to it exactly as they talk to
the Hub. It answers the requests those clients make to read a repository:

- ``GET /api/{type}s/{repo_id}[/revision/{rev}]``: repo info (the commit sha of the revision);
- ``GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]?recursive=``: the tree listing;
- ``POST /api/{type}s/{repo_id}/paths-info/{rev}``: info about given paths;
- ``HEAD``/``GET /[{type}s/]{repo_id}/resolve/{rev}/{path}``: file metadata and bytes, with
  ``Range`` requests answered by 206 partial content.

Errors carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), so the client raises the same exception types as online.
A revision is served from a directory; its commit sha is derived from the repo and revision,
and the sha is accepted wherever a revision is (clients pin the sha after the first call).
Every request is recorded in :attr:`HubServer.requests` for tests to inspect.

:class:`Faults` make it fail as a real network does: a share of the file-content requests
answered with 500 or 503 or cut off halfway through the body, and whole-server outages
(:meth:`HubServer.go_down`) in which new connections are refused, or every request is
answered 503, while requests on connections already open are dropped unanswered.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files at least this large are reported as LFS files, as the Hub does for parquet shards.
LFS_THRESHOLD = 1024


@dataclass
class Repo:
    """One served repository: revision name -> directory, and who may read it."""

    repo_type: str  # "dataset" or "model"
    repo_id: str
    revisions: dict[str, Path] = field(default_factory=dict)
    gated: bool = False  # listing is public, file contents need the token
    private: bool = False  # invisible without the token
    token: str | None = None

    def sha(self, revision: str) -> str:
        return hashlib.sha1(f"{self.repo_id}@{revision}".encode()).hexdigest()

    def resolve(self, revision: str) -> tuple[str, Path] | None:
        """``(sha, directory)`` of a revision name or commit sha."""
        for name, directory in self.revisions.items():
            if revision in (name, self.sha(name)):
                return self.sha(name), directory
        return None


@dataclass
class Faults:
    """Failures injected into file-content requests (``GET .../resolve/...``)."""

    share: float = 0.0  # of content requests that fail
    kinds: tuple[str, ...] = ("500", "503", "cut")  # "cut": the body stops halfway
    seed: int = 0
    outage_at: int | None = None  # the content request (1-based) that starts an outage
    outage_s: float = 0.0  # how long it lasts (float("inf"): until come_back)
    outage: str = "refused"  # or "503": every request answered 503 meanwhile
    sure_at: int | None = None  # the content request (1-based) that fails whatever the draw
    injected: list[str] = field(default_factory=list)  # what was injected, in order
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class HubServer:
    """A threaded HTTP server on 127.0.0.1 serving :class:`Repo` s (use as a context manager)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.faults: Faults | None = None
        self.down: str | None = None  # the kind of outage under way
        self._content_requests = 0
        self._lock = threading.Lock()
        self._port = 0
        self._listen()

    def _listen(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), _handler_class(self))
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def go_down(self, kind: str = "refused", seconds: float = float("inf")) -> None:
        """Start a whole-server outage for ``seconds`` (or until :meth:`come_back`):
        ``"refused"`` closes the listening socket, ``"503"`` answers every request 503;
        either way requests on connections already open get no answer."""
        with self._lock:
            if self.down is not None:
                return
            self.down = kind
        if kind == "refused":
            threading.Thread(target=self._stop_listening, daemon=True).start()
        if seconds != float("inf"):
            threading.Timer(seconds, self.come_back).start()

    def _stop_listening(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def come_back(self) -> None:
        """End the outage: listen again on the same port."""
        with self._lock:
            kind, self.down = self.down, None
        if kind == "refused":
            for _ in range(100):  # the closing thread may still hold the port
                try:
                    self._listen()
                    break
                except OSError:
                    time.sleep(0.05)
            self._thread.start()

    def _fault_for(self, content: bool) -> str | None:
        """The fault this request meets: ``"drop"``, ``"503"``, ``"500"``, ``"cut"`` or None."""
        if self.down is not None:
            return "503" if self.down == "503" else "drop"
        faults = self.faults
        if faults is None or not content:
            return None
        with self._lock:
            self._content_requests += 1
            count = self._content_requests
        if count == faults.outage_at:
            faults.injected.append(f"outage ({faults.outage}, {faults.outage_s:g} s)")
            self.go_down(faults.outage, faults.outage_s)
            return "drop"
        if faults.rng.random() < faults.share or count == faults.sure_at:
            kind = faults.rng.choice(faults.kinds)
            faults.injected.append(kind)
            return kind
        return None

    def add(
        self,
        repo_id: str,
        directory: str | Path,
        *,
        revision: str = "main",
        repo_type: str = "dataset",
        gated: bool = False,
        private: bool = False,
        token: str | None = None,
    ) -> Repo:
        """Serve ``directory`` as ``revision`` of ``repo_id``."""
        repo = self.repos.setdefault(
            (repo_type, repo_id),
            Repo(repo_type, repo_id, gated=gated, private=private, token=token),
        )
        repo.revisions[revision] = Path(directory).resolve()
        return repo

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.down != "refused":
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_API = re.compile(r"^/api/(?P<type>datasets|models)/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(
    r"^/(?:(?P<type>datasets|models)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
)


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _handler_class(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read hub.requests instead
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_POST(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode()) if length else {}
            resolve = _RESOLVE.match(urlsplit(self.path).path)
            fault = hub._fault_for(content=bool(resolve) and self.command == "GET")
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            try:
                if fault in ("500", "503"):
                    raise _HubError(int(fault), "", "injected fault")
                if resolve:
                    self._file(resolve, body=body, cut=fault == "cut")
                elif match := _API.match(urlsplit(self.path).path):
                    self._json(_api(hub, match, self.command, self._token(), form, self.path))
                else:
                    raise _HubError(404, "", f"no route for {self.command} {path}")
            except _HubError as err:
                self._error(err, body=body)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth.removeprefix("Bearer ").strip() or None

        def _file(self, match: re.Match, *, body: bool, cut: bool = False) -> None:
            repo = _repo(hub, match["type"] or "models", match["repo"], self._token())
            sha, directory = _revision(repo, unquote(match["rev"]))
            relative = unquote(match["path"])
            file = _inside(directory, relative)
            if file is None or not file.is_file():
                raise _HubError(404, "EntryNotFound", f"{relative} does not exist on {sha}")
            if repo.gated and self._token() != repo.token:
                raise _HubError(401, "GatedRepo", f"Access to {repo.repo_id} is restricted.")
            size = file.stat().st_size
            git_sha1, sha256 = _digests(file, file.stat().st_mtime_ns, size)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1}"', "Accept-Ranges": "bytes"}
            if size >= LFS_THRESHOLD:
                headers |= {"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(size)}
            status, (start, end) = 200, (0, size - 1)
            if (wanted := self.headers.get("Range")) and body:
                start, end = _byte_range(wanted, size)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            with open(file, "rb") as f:
                f.seek(start)
                content = f.read(end - start + 1) if body else b""
            self.send_response(status)
            headers["Content-Length"] = str(end - start + 1)
            headers["Content-Type"] = "application/octet-stream"
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if body and cut:  # the promised length, half of it sent, then the connection closes
                self.wfile.write(content[: len(content) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif body:
                self.wfile.write(content)

        def _json(self, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, err: _HubError, *, body: bool) -> None:
            data = json.dumps({"error": err.message}).encode()
            self.send_response(err.status)
            if err.status == 503:
                self.send_header("Retry-After", "1")
            if err.code:
                self.send_header("X-Error-Code", err.code)
            self.send_header("X-Error-Message", err.message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def _repo(hub: HubServer, plural_type: str, repo_id: str, token: str | None) -> Repo:
    repo = hub.repos.get((plural_type.removesuffix("s"), repo_id))
    if repo is None or (repo.private and token != repo.token):
        raise _HubError(401, "RepoNotFound", "Repository not found")
    return repo


def _revision(repo: Repo, revision: str) -> tuple[str, Path]:
    found = repo.resolve(revision)
    if found is None:
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return found


def _api(hub: HubServer, match: re.Match, method: str, token, form, raw_path: str):
    repo = _repo(hub, match["type"], match["repo"], token)
    rest = match["rest"] or ""
    query = parse_qs(urlsplit(raw_path).query)
    if method == "GET" and (rest == "" or rest.startswith("/revision/")):
        sha, directory = _revision(repo, unquote(rest.removeprefix("/revision/")) or "main")
        return _info(repo, sha, directory)
    if method == "GET" and (tree := re.match(r"^/tree/([^/]+)(?:/(.*))?$", rest)):
        _, directory = _revision(repo, unquote(tree[1]))
        base = unquote(tree[2] or "")
        folder = _inside(directory, base)
        if folder is None or not folder.is_dir():
            raise _HubError(404, "EntryNotFound", f"{base} does not exist")
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        children = folder.rglob("*") if recursive else folder.iterdir()
        return [_entry(directory, p) for p in sorted(children)]
    if method == "POST" and (info := re.match(r"^/paths-info/([^/]+)$", rest)):
        _, directory = _revision(repo, unquote(info[1]))
        found = [_inside(directory, p) for p in form.get("paths", [])]
        return [_entry(directory, p) for p in found if p is not None and p.exists()]
    raise _HubError(404, "", f"no route for {method} {raw_path}")


def _info(repo: Repo, sha: str, directory: Path) -> dict:
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    return {
        "_id": sha[:24],
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": sha,
        "private": repo.private,
        "gated": "auto" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "cardData": {},
        "siblings": [{"rfilename": f} for f in files],
        "lastModified": "2026-01-01T00:00:00.000Z",
        "createdAt": "2026-01-01T00:00:00.000Z",
    }


def _entry(directory: Path, path: Path) -> dict:
    relative = str(path.relative_to(directory))
    if path.is_dir():
        return {"type": "directory", "oid": _etag(relative.encode()), "path": relative}
    size = path.stat().st_size
    git_sha1, sha256 = _digests(path, path.stat().st_mtime_ns, size)
    entry = {"type": "file", "oid": git_sha1, "size": size, "path": relative}
    if size >= LFS_THRESHOLD:
        entry["lfs"] = {"oid": sha256, "size": size, "pointerSize": 134}
    return entry


def _inside(directory: Path, relative: str) -> Path | None:
    """``directory / relative``, or None when it would leave ``directory``."""
    path = (directory / relative.strip("/")).resolve()
    return path if path.is_relative_to(directory) else None


def _byte_range(header: str, size: int) -> tuple[int, int]:
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or (match[1] == "" and match[2] == ""):
        raise _HubError(416, "", f"bad Range {header}")
    if match[1] == "":  # the last N bytes
        start, end = max(size - int(match[2]), 0), size - 1
    else:
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
    if start >= size or start > end:
        raise _HubError(416, "", f"Range {header} outside {size} bytes")
    return start, end


def _etag(data: bytes) -> str:
    """The git blob sha1, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.lru_cache(maxsize=1024)
def _digests(path: Path, mtime_ns: int, size: int) -> tuple[str, str]:
    """``(git blob sha1, sha256)`` of a file, computed once per version of it."""
    data = path.read_bytes()
    return _etag(data), hashlib.sha256(data).hexdigest()
