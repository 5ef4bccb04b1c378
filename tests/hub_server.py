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

It also answers the requests ``HfApi`` makes to write (``create_repo``, ``create_branch``,
``create_commit`` / ``upload_folder`` over plain LFS, ``whoami``), with the Hub's rules:

- ``GET /api/whoami-v2``; ``POST /api/validate-yaml`` (a README's front matter);
- ``POST /api/repos/create`` (``visibility: private``; 409 when the repo exists);
- ``POST /api/{type}s/{repo_id}/branch/{branch}`` (from ``main``; 409 when it exists);
- ``POST /api/{type}s/{repo_id}/preupload/{rev}``: ``lfs`` from :data:`LFS_THRESHOLD` bytes up,
  ``regular`` below, and the oid of a file already there (so unchanged files are skipped);
- ``POST /[{type}s/]{repo_id}.git/info/lfs/objects/batch`` (basic transfer) with upload actions
  pointing back here, ``PUT`` of the bytes (size and sha256 checked) and the verify call;
- ``POST /api/{type}s/{repo_id}/commit/{rev}``: the NDJSON commit (``header``, ``file`` in
  base64, ``lfsFile`` whose oid must have been uploaded, ``deletedFile``, ``deletedFolder``),
  built into a new revision directory (a copy of the previous one plus the changes) that
  replaces the branch's only once every line was applied: a refused commit changes nothing.

Writing takes a token given write access with :meth:`HubServer.add_token`; no token, an unknown
one or a read-only one is answered 401 / 403 with ``X-Error-Message``, as the Hub does, so the
client raises the same exceptions. Committed revisions get a new sha each (older shas stay
readable); :attr:`Repo.commits` records each commit. The client picks Xet uploads by itself
when ``hf_xet`` is installed: this server offers no Xet (its token route is a 404), so tests set
``HF_HUB_DISABLE_XET``. :attr:`HubServer.write_faults` makes uploads fail: ``"lfs-put"``
refuses every LFS ``PUT`` (403, as an expired presigned URL), ``"commit"`` answers commits 500.

:class:`Faults` make it fail as a real network does: a share of the file-content requests
answered with 500 or 503 or cut off halfway through the body, and whole-server outages
(:meth:`HubServer.go_down`) in which new connections are refused, or every request is
answered 503, while requests on connections already open are dropped unanswered.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import random
import re
import secrets
import shutil
import socket
import tempfile
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
    private: bool = False  # invisible without the token (or one of its namespace's accounts)
    token: str | None = None
    heads: dict[str, str] = field(default_factory=dict)  # revision name -> sha, once committed to
    history: dict[str, Path] = field(default_factory=dict)  # every committed sha -> its directory
    lfs: dict[str, Path] = field(default_factory=dict)  # uploaded LFS objects: sha256 -> bytes
    commits: list[dict] = field(default_factory=list)  # {revision, sha, summary, description, files}

    def sha(self, revision: str) -> str:
        return self.heads.get(revision) or hashlib.sha1(f"{self.repo_id}@{revision}".encode()).hexdigest()

    def resolve(self, revision: str) -> tuple[str, Path] | None:
        """``(sha, directory)`` of a revision name or commit sha."""
        for name, directory in self.revisions.items():
            if revision in (name, self.sha(name)):
                return self.sha(name), directory
        if revision in self.history:
            return revision, self.history[revision]
        return None

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """Every file of ``revision`` with its bytes (for tests to compare states)."""
        _, directory = self.resolve(revision) or (None, None)
        if directory is None:
            return {}
        return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@dataclass
class Account:
    """Who a token belongs to, and whether it may write (a "write" token) or only read."""

    name: str
    write: bool = True
    orgs: tuple[str, ...] = ()

    def owns(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


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

    def __init__(self, root: str | Path | None = None) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.faults: Faults | None = None
        self.tokens: dict[str, Account] = {}  # token -> account (add_token)
        self.write_faults: set[str] = set()  # "lfs-put", "commit": see the module docstring
        self._root = Path(root) if root is not None else None  # where created repos and commits live
        self._uploads: dict[str, tuple[Repo, str, int]] = {}  # upload key -> (repo, oid, size)
        self._counter = itertools.count(1)
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

    def add_token(self, token: str, user: str, *, write: bool = True, orgs: tuple[str, ...] = ()) -> Account:
        """Accept ``token`` as ``user``'s: a write token, or with ``write=False`` a read-only one."""
        self.tokens[token] = account = Account(user, write, tuple(orgs))
        return account

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    @property
    def root(self) -> Path:
        """The directory holding created repos, committed revisions and LFS objects."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="hub-server-"))
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def new_directory(self, repo: Repo) -> Path:
        """A fresh, empty directory for a revision of ``repo``."""
        path = self.root / repo.repo_type / repo.repo_id / f"r{next(self._counter)}"
        path.mkdir(parents=True)
        return path

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
_LFS_BATCH = re.compile(
    r"^/(?:(?P<type>datasets|models)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<op>batch|verify)$"
)
_LFS_UPLOAD = re.compile(r"^/_lfs-upload/(?P<key>[0-9a-f]+)$")
_RESOLVE = re.compile(
    r"^/(?:(?P<type>datasets|models)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
)


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra or {}


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

        def do_PUT(self) -> None:
            self._serve(body=True)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            raw = self._read_body()
            try:
                writing = _write_route(hub, self.command, urlsplit(self.path).path, raw, self._token())
                if writing is not None:
                    self._json(writing())
                    return
            except _HubError as err:
                self._error(err, body=True)
                return
            form = parse_qs(raw.decode()) if raw else {}
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
                    self._json(_api(hub, match, self.command, self._token(), form, self.path, raw))
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
            data = json.dumps({"error": err.message, **err.extra}).encode()
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
    if repo is None or (repo.private and not _may_read(hub, repo, token)):
        raise _HubError(401, "RepoNotFound", "Repository not found")
    return repo


def _may_read(hub: HubServer, repo: Repo, token: str | None) -> bool:
    account = hub.tokens.get(token) if token else None
    owner = repo.repo_id.split("/")[0]
    return token is not None and (token == repo.token or (account is not None and account.owns(owner)))


def _account(hub: HubServer, token: str | None) -> Account:
    """The account of a known token; 401 as the Hub answers a missing or unknown one."""
    account = hub.tokens.get(token) if token else None
    if account is None:
        message = "Invalid credentials in Authorization header" if token else "Invalid username or password."
        raise _HubError(401, "", message)
    return account


def _writer(hub: HubServer, namespace: str, token: str | None, what: str) -> Account:
    """The account of a token that may write into ``namespace``; 401 / 403 otherwise."""
    account = _account(hub, token)
    if not account.write:
        raise _HubError(403, "", f"You don't have the rights to {what}: your token is read-only")
    if not account.owns(namespace):
        raise _HubError(403, "", f"You don't have the rights to {what} under the namespace \"{namespace}\"")
    return account


def _json_body(raw: bytes) -> dict:
    try:
        payload = json.loads(raw or b"{}")
    except ValueError:
        raise _HubError(400, "", "the body is not JSON") from None
    if not isinstance(payload, dict):
        raise _HubError(400, "", "the body is not a JSON object")
    return payload


def _write_route(hub: HubServer, method: str, raw_path: str, raw: bytes, token: str | None):
    """The handler (a function of no arguments returning the JSON answer) of a request that
    writes or checks credentials, or None for the read routes."""
    path = unquote(raw_path)
    if method == "GET" and path == "/api/whoami-v2":
        return lambda: _whoami(hub, token)
    if method == "POST" and path == "/api/validate-yaml":
        return lambda: _validate_yaml(_json_body(raw))
    if method == "POST" and path == "/api/repos/create":
        return lambda: _create_repo(hub, _json_body(raw), token)
    if method == "POST" and (match := _LFS_BATCH.match(raw_path)):
        return lambda: _lfs(hub, match, _json_body(raw), token)
    if method == "PUT" and (match := _LFS_UPLOAD.match(raw_path)):
        return lambda: _lfs_put(hub, match["key"], raw)
    if method == "POST" and (match := _API.match(raw_path)):
        rest = match["rest"] or ""
        if step := re.match(r"^/(preupload|commit|branch)/([^/]+)$", rest):
            kind, revision = step[1], unquote(step[2])
            repo = _repo(hub, match["type"], match["repo"], token)
            _writer(hub, repo.repo_id.split("/")[0], token, f"push to {repo.repo_id}")
            if kind == "preupload":
                return lambda: _preupload(repo, revision, _json_body(raw))
            if kind == "branch":
                return lambda: _create_branch(hub, repo, revision, _json_body(raw))
            return lambda: _commit(hub, repo, revision, raw)
        if rest.startswith("/xet-"):
            raise _HubError(404, "", "this server offers no Xet storage")
    return None


def _whoami(hub: HubServer, token: str | None) -> dict:
    account = _account(hub, token)
    role = "write" if account.write else "read"
    return {
        "type": "user",
        "name": account.name,
        "orgs": [{"name": org, "type": "org"} for org in account.orgs],
        "auth": {"type": "access_token", "accessToken": {"displayName": f"{role} token", "role": role}},
    }


def _front_matter(content: str) -> dict | None:
    """The YAML front matter of a README (None without one); 400 when it is not a mapping."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError as err:
        raise _HubError(400, "", f"Invalid YAML in the metadata: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise _HubError(400, "", "The metadata must be a YAML mapping")
    return data


def _validate_yaml(payload: dict) -> dict:
    data = _front_matter(str(payload.get("content", "")))
    errors = []
    for index, entry in enumerate((data or {}).get("model-index") or []):
        for result in entry.get("results") or []:
            for key in ("task", "dataset"):
                if not isinstance(result.get(key), dict) or "type" not in result[key]:
                    errors.append(f"model-index[{index}].results: '{key}.type' is required")
            for metric in result.get("metrics") or []:
                if "type" not in metric or "value" not in metric:
                    errors.append(f"model-index[{index}]: every metric needs 'type' and 'value'")
    if errors:
        raise _HubError(400, "", "; ".join(errors))
    return {"errors": [], "warnings": [] if data else [{"message": "empty or missing yaml metadata"}]}


def _create_repo(hub: HubServer, payload: dict, token: str | None) -> dict:
    name, namespace = payload.get("name"), payload.get("organization")
    repo_type = payload.get("type") or "model"
    if not name or not namespace:
        raise _HubError(400, "", "Repository id must be 'namespace/name'")
    if not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", part) for part in (namespace, name)):
        raise _HubError(400, "", f"Invalid repository name '{namespace}/{name}'")
    _writer(hub, namespace, token, f"create a {repo_type}")
    repo_id = f"{namespace}/{name}"
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    with hub._lock:
        if (repo_type, repo_id) in hub.repos:
            raise _HubError(409, "", f"You already created this {repo_type} repo",
                            {"url": f"{hub.url}/{prefix}{repo_id}"})  # fmt: skip
        repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        directory = hub.new_directory(repo)
        (directory / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        sha = hashlib.sha1(f"{repo_id}@main#0".encode()).hexdigest()
        repo.revisions["main"], repo.heads["main"], repo.history[sha] = directory, sha, directory
        repo.commits.append({"revision": "main", "sha": sha, "summary": "initial commit", "description": "",
                             "files": [".gitattributes"]})  # fmt: skip
        hub.repos[(repo_type, repo_id)] = repo
    return {"url": f"{hub.url}/{prefix}{repo_id}", "name": repo_id, "id": sha[:24]}


def _create_branch(hub: HubServer, repo: Repo, branch: str, payload: dict) -> dict:
    with hub._lock:
        if branch in repo.revisions:
            raise _HubError(409, "", f"Branch {branch} already exists")
        sha, directory = _revision(repo, payload.get("startingPoint") or "main")
        repo.revisions[branch], repo.heads[branch] = directory, sha
    return {}


def _preupload(repo: Repo, revision: str, payload: dict) -> dict:
    _, directory = _revision(repo, revision)
    answers = []
    for item in payload.get("files") or []:
        mode = "lfs" if int(item.get("size", 0)) >= LFS_THRESHOLD else "regular"
        answer = {"path": item["path"], "uploadMode": mode, "shouldIgnore": False}
        existing = _inside(directory, item["path"])
        if existing is not None and existing.is_file():
            git_sha1, sha256 = _digests(existing, existing.stat().st_mtime_ns, existing.stat().st_size)
            answer["oid"] = sha256 if mode == "lfs" else git_sha1
        answers.append(answer)
    return {"files": answers, "commitOid": repo.sha(revision)}


def _lfs(hub: HubServer, match: re.Match, payload: dict, token: str | None) -> dict:
    repo = _repo(hub, match["type"] or "models", match["repo"], token)
    _writer(hub, repo.repo_id.split("/")[0], token, f"push to {repo.repo_id}")
    if match["op"] == "verify":
        oid, size = payload.get("oid"), payload.get("size")
        stored = repo.lfs.get(oid)
        if stored is None or stored.stat().st_size != size:
            raise _HubError(404, "", f"LFS object {oid} was not uploaded")
        return {}
    if payload.get("operation") != "upload" or "basic" not in (payload.get("transfers") or ["basic"]):
        raise _HubError(400, "", "only uploads over the basic transfer are served")
    objects = []
    prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
    for item in payload.get("objects") or []:
        oid, size = str(item.get("oid")), int(item.get("size", -1))
        answer = {"oid": oid, "size": size, "authenticated": True}
        if oid not in repo.lfs:
            key = secrets.token_hex(16)  # the upload URL is the credential, as a presigned one
            hub._uploads[key] = (repo, oid, size)
            answer["actions"] = {
                "upload": {"href": f"{hub.url}/_lfs-upload/{key}"},
                "verify": {"href": f"{hub.url}/{prefix}{repo.repo_id}.git/info/lfs/objects/verify", "header": {}},
            }
        objects.append(answer)
    return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}


def _lfs_put(hub: HubServer, key: str, data: bytes) -> dict:
    if "lfs-put" in hub.write_faults:
        raise _HubError(403, "", "AccessDenied: Request has expired (injected)")
    if key not in hub._uploads:
        raise _HubError(403, "", "AccessDenied: unknown upload URL")
    repo, oid, size = hub._uploads[key]
    if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
        raise _HubError(400, "", f"the uploaded bytes do not match oid {oid} and size {size}")
    blob = hub.root / "_lfs" / oid
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    with hub._lock:
        repo.lfs[oid] = blob
        del hub._uploads[key]
    return {}


def _commit(hub: HubServer, repo: Repo, revision: str, raw: bytes) -> dict:
    """Apply an NDJSON commit to a copy of ``revision``'s directory, then make it the branch's."""
    if revision not in repo.revisions:
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to a branch)")
    try:
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except ValueError:
        raise _HubError(400, "", "the commit payload is not NDJSON") from None
    if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
        raise _HubError(400, "", "a commit starts with a header line holding its summary")
    header = lines[0]["value"]
    with hub._lock:  # one commit at a time, as a branch's head moves one commit at a time
        parent_sha, parent = _revision(repo, revision)
        if header.get("parentCommit") not in (None, parent_sha):
            raise _HubError(412, "", f"A commit has happened since {header['parentCommit']}")
        work = hub.new_directory(repo)
        try:
            shutil.copytree(parent, work, dirs_exist_ok=True)
            changed = [_apply(repo, work, line) for line in lines[1:]]
            if "commit" in hub.write_faults:
                raise _HubError(500, "", "Internal Error (injected): the commit was not created")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        sha = hashlib.sha1(f"{repo.repo_id}@{revision}#{len(repo.commits)}".encode()).hexdigest()
        repo.revisions[revision], repo.heads[revision], repo.history[sha] = work, sha, work
        repo.commits.append({"revision": revision, "sha": sha, "summary": header["summary"],
                             "description": header.get("description", ""), "files": changed})  # fmt: skip
    prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
    return {"commitUrl": f"{hub.url}/{prefix}{repo.repo_id}/commit/{sha}", "commitOid": sha,
            "pullRequestUrl": None, "success": True}  # fmt: skip


def _apply(repo: Repo, work: Path, line: dict) -> str:
    """One commit line applied to ``work``; returns the path it changed."""
    key, value = line.get("key"), line.get("value") or {}
    target = _inside(work, str(value.get("path", "")))
    if target is None or target == work.resolve():
        raise _HubError(400, "", f"invalid path {value.get('path')!r}")
    if key == "file":
        if value.get("encoding") != "base64":
            raise _HubError(400, "", "file contents must be base64")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(value["content"]))
    elif key == "lfsFile":
        blob = repo.lfs.get(value.get("oid"))
        if blob is None:
            raise _HubError(422, "", f"LFS object {value.get('oid')} of {value['path']} was never uploaded")
        if "size" in value and blob.stat().st_size != value["size"]:
            raise _HubError(422, "", f"{value['path']}: size {value['size']} differs from the uploaded object's")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blob, target)
    elif key == "deletedFile":
        if not target.is_file():
            raise _HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
        target.unlink()
    elif key == "deletedFolder":
        if not target.is_dir():
            raise _HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {value['path']}")
        shutil.rmtree(target)
    else:
        raise _HubError(400, "", f"unknown commit line {key!r}")
    return str(value["path"])


def _revision(repo: Repo, revision: str) -> tuple[str, Path]:
    found = repo.resolve(revision)
    if found is None:
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return found


def _api(hub: HubServer, match: re.Match, method: str, token, form, raw_path: str, raw: bytes = b""):
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
