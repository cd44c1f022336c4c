"""A Hugging Face Hub on 127.0.0.1 for download tests: the endpoints huggingface_hub calls
(read from its source, huggingface_hub 2.4), serving repositories from local folders.

- `GET /api/models/{repo}[/revision/{rev}]`: the model's info (`id`, `sha`, `siblings`).
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=…`: the file list, paginated as
  the Hub does (a `Link: <…>; rel="next"` header, `cursor` in the query). Files carry
  `oid` (the git blob sha1) and `size`; LFS files (weights) `lfs: {oid: sha256, size,
  pointerSize}`.
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit` always. A regular file answers
  200 with `ETag` (its git blob sha1) and `Content-Length`. An LFS file answers 302 to a
  CDN on another host name (`localhost` instead of `127.0.0.1`, so huggingface_hub treats
  it as one and downloads from the `Location`), with `X-Linked-Etag` (its sha256) and
  `X-Linked-Size` as the Hub sends them.
- `GET /cdn/{sha256}`: the LFS content, honouring `Range: bytes=N-` with 206 and
  `Content-Range`.
- Errors as the Hub words them: 404 with `X-Error-Code: RepoNotFound`,
  `RevisionNotFound` or `EntryNotFound`.

What the tests steer: `cut_once` (path → bytes: the first GET of that file sends its full
`Content-Length` but closes the connection after that many bytes), `hold_at` (path →
bytes: the first GET of that file sends that many, sets `held` and waits for `release`
before the rest: a download caught in the middle, for as long as a test needs),
`failing` (paths whose GET answers 500), `declared` (path → a size the repository claims
for an extra LFS file of zeros), `page_size` (tree entries per page). Every request is
logged in `requests`: (method, url path, Range header).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")
ZERO_CHUNK = bytes(1 << 20)
HASHED_ZEROS = 1 << 30  # declared files up to this size are real zeros, hashed


@dataclass
class RepoFile:
    path: str
    data: bytes | None  # None: `size` zeros (a declared file)
    size: int

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def git_oid(self) -> str:
        if self.lfs:  # the git blob is the LFS pointer file
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            pointer += f"size {self.size}\n"
            return _git_sha1(pointer.encode())
        return _git_sha1(self.data or b"")

    @functools.cached_property
    def sha256(self) -> str:
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        if self.size > HASHED_ZEROS:  # a file too large to exist here: never fetched
            return hashlib.sha256(f"zeros:{self.size}".encode()).hexdigest()
        digest = hashlib.sha256()
        for offset in range(0, self.size, len(ZERO_CHUNK)):
            digest.update(ZERO_CHUNK[: min(len(ZERO_CHUNK), self.size - offset)])
        return digest.hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, RepoFile]
    commit: str


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_once: dict[str, int] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    page_size: int = 1000
    hold_at: dict[str, int] = field(default_factory=dict)
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    port: int = 0

    def add_folder(self, repo_id: str, folder: Path, declared: dict[str, int] | None = None):
        files = {
            p.relative_to(folder).as_posix(): RepoFile(
                p.relative_to(folder).as_posix(), p.read_bytes(), p.stat().st_size
            )
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        for path, size in (declared or {}).items():
            files[path] = RepoFile(path, None, size)
        listing = "".join(f"{f.path} {f.git_oid}\n" for f in files.values())
        self.repos[repo_id] = Repo(files, hashlib.sha1(listing.encode()).hexdigest())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, path: str) -> list[str]:
        """The Range headers of every GET of a repository file's content ('' for none):
        from the CDN for an LFS file, from `resolve` for the others."""
        shas = {f.sha256 for r in self.repos.values() for f in r.files.values() if f.path == path}
        return [
            rng
            for method, url, rng in self.requests
            if method == "GET"
            and (
                url.removeprefix("/cdn/") in shas
                or ("/resolve/" in url and url.split("/", 5)[-1] == path)
            )
        ]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    # -- routing ---------------------------------------------------------------------------

    def _serve(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append((self.command, path, self.headers.get("Range", "")))
        if path.startswith("/cdn/"):
            return self._cdn(path[len("/cdn/") :], head)
        if path.startswith("/api/models/"):
            return self._api(path[len("/api/models/") :], parse_qs(url.query))
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo("/".join(parts[:2]))
            if repo is None:
                return
            if parts[3] not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound")
            return self._resolve(repo, "/".join(parts[4:]), head)
        self._error(404, "RepoNotFound")

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound")
        return repo

    def _api(self, rest: str, query: dict) -> None:
        parts = rest.split("/")
        repo = self._repo("/".join(parts[:2]))
        if repo is None:
            return
        tail = parts[2:]
        known = ("main", repo.commit)
        if len(tail) > 1 and tail[0] in ("revision", "tree") and tail[1] not in known:
            return self._error(404, "RevisionNotFound")
        if not tail or tail[0] == "revision":
            info = {
                "id": "/".join(parts[:2]),
                "sha": repo.commit,
                "private": False,
                "library_name": "diffusers",
                "siblings": [{"rfilename": p} for p in repo.files],
            }
            return self._json(info)
        if tail[0] == "tree":
            return self._tree(repo, "/".join(tail[2:]), query)
        self._error(404, "EntryNotFound")

    def _tree(self, repo: Repo, under: str, query: dict) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{under}/" if under else ""
        entries, folders = [], set()
        for f in repo.files.values():
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix) :]
            for i in range(rest.count("/")):
                folder = prefix + "/".join(rest.split("/")[: i + 1])
                if folder not in folders and (recursive or i == 0):
                    folders.add(folder)
                    oid = _git_sha1(folder.encode())
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if not recursive and "/" in rest:
                continue
            entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            base = self.path.split("?")[0]
            nxt = f"{self.hub.endpoint}{base}?recursive={str(recursive).lower()}"
            nxt += f"&cursor={start + self.hub.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(page, headers)

    def _resolve(self, repo: Repo, path: str, head: bool) -> None:
        commit = {"X-Repo-Commit": repo.commit}
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", commit)
        if f.lfs:
            cdn = f"http://localhost:{self.hub.port}/cdn/{quote(f.sha256)}"
            headers = {
                **commit,
                "Location": cdn,
                "ETag": f'"{f.git_oid}"',
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "Content-Length": "0",
            }
            return self._respond(302, headers, b"", head)
        if not head and path in self.hub.failing:
            return self._error(500, "", commit)
        self._content(f, head, {**commit, "ETag": f'"{f.git_oid}"'})

    def _cdn(self, sha: str, head: bool) -> None:
        for repo in self.hub.repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == sha:
                    if not head and f.path in self.hub.failing:
                        return self._error(500, "")
                    return self._content(f, head, {"ETag": f'"{sha}"'})
        self._respond(404, {"Content-Length": "0"}, b"", head)

    # -- bodies ----------------------------------------------------------------------------

    def _content(self, f: RepoFile, head: bool, headers: dict[str, str]) -> None:
        start = 0
        status = 200
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes=") : -1])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{f.size - 1}/{f.size}"
        headers.update({"Accept-Ranges": "bytes", "Content-Length": str(f.size - start)})
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        cut = self.hub.cut_once.pop(f.path, None) if status == 200 else None
        end = f.size if cut is None else cut
        hold = self.hub.hold_at.pop(f.path, None) if status == 200 else None
        try:
            if hold is not None and hold < end:
                self._body(f, start, hold)
                self.hub.held.set()
                self.hub.release.wait(timeout=300)
                start = hold
            self._body(f, start, end)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
            self.close_connection = True
            return
        if cut is not None:
            self.close_connection = True  # the rest never comes: a dropped connection

    def _body(self, f: RepoFile, start: int, end: int) -> None:
        if f.data is not None:
            self.wfile.write(f.data[start:end])
            return
        for offset in range(start, end, len(ZERO_CHUNK)):
            self.wfile.write(ZERO_CHUNK[: min(len(ZERO_CHUNK), end - offset)])

    def _json(self, value: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value).encode()
        sent = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self._respond(200, {**sent, **(headers or {})}, body, False)

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": code or "Internal Error"}).encode()
        sent = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if code:
            sent["X-Error-Code"] = code
        self._respond(status, {**(headers or {}), **sent}, body, self.command == "HEAD")

    def _respond(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class running_hub:
    """`with running_hub() as hub:` a FakeHub served on 127.0.0.1 (a free port)."""

    def __init__(self) -> None:
        self.hub = FakeHub()

    def __enter__(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.hub.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.hub.release.set()  # a GET still held ends
        self.server.shutdown()
        self.server.server_close()
