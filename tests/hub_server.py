"""A local stand-in for the Hugging Face Hub, on loopback, for tests that publish and load model repositories through the
real ``huggingface_hub`` client (2.4.0) and SAELens.

It answers the requests that client sends for model and dataset repos: create a repo, upload (preupload, the Git LFS batch API with
the "basic" transfer and its PUT and verify, the NDJSON commit), download (HEAD and GET on /resolve, whole or one byte
range, as `datasets`' streaming reads a parquet file through HfFileSystem), repo info, the file tree and whoami. One
user owns every namespace: a request carrying ``Authorization: Bearer <token>`` is that user, one without it is
anonymous, and one with another token is refused as the Hub refuses a bad token (401).
Everything lives in memory and goes with the server.

    with HubServer(token="hf_test") as hub, pointed_at(hub, tmp_path / "hf_cache", token="hf_test"):
        HfApi().create_repo("someone/saes", private=True)
        ...
        hub.files("someone/saes")  # {path: bytes} at the head of main
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# What the Hub commits into a new model repo: its default .gitattributes, shortened to the patterns that matter here.
# Preupload reads the LFS patterns back from it, as the Hub does.
INITIAL_GITATTRIBUTES = b"""\
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""
# The Hub sends files over 10 MB through LFS whatever their name.
LFS_SIZE_THRESHOLD = 10_000_000
# The error message huggingface_hub reads as "bad token" rather than "repository not found".
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"

# owner/name, or a name alone: the old ids of the Hub's first models (`gpt2`), answered through `add_alias`
_REPO = r"(?P<repo>(?:[^/]+/)?[^/]+)"
_REV = r"(?P<rev>[^/]+)"
_KIND = r"(?P<kind>models|datasets)"  # /api/models/... or /api/datasets/...
_PREFIX = r"(?:(?P<kind>datasets)/)?"  # a dataset's files live under /datasets/<repo>/..., a model's under /<repo>/...
DATASET = "datasets/"
"""How the store names a dataset repo (``files("datasets/<owner>/<name>")``); a model repo is its id alone."""


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # percent-decoded, without the query string
    authorized: bool  # carried the server's token
    byte_range: str | None = None  # the request's Range header ("bytes=0-1023"), None without one


@dataclass(frozen=True)
class Commit:
    oid: str  # 40 hex digits
    summary: str
    files: dict[str, bytes]  # the whole tree at this commit
    lfs_paths: frozenset[str]  # the paths whose content is an LFS object (committed as lfsFile lines, not inline)
    date: datetime


@dataclass
class _Repo:
    private: bool
    created: datetime
    commits: list[Commit]
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content received by the LFS PUT

    @property
    def head(self) -> Commit:
        return self.commits[-1]


class HubError(Exception):
    """An error answer, in the Hub's form: the status, the X-Error-Message header and JSON body, and the X-Error-Code
    header from which huggingface_hub picks its exception class (RepoNotFound, RevisionNotFound, EntryNotFound)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_reply(value, status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(value).encode(), {"Content-Type": "application/json"})


def _git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports for regular files (and huggingface_hub compares at preupload)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(content: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(content).hexdigest()}\nsize {len(content)}\n".encode()


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the Hub's format, which huggingface_hub parses


def _lfs_patterns(gitattributes: bytes | None) -> list[str]:
    lines = (gitattributes or b"").decode(errors="replace").splitlines()
    return [line.split()[0] for line in lines if "filter=lfs" in line.split()[1:]]


def _needs_lfs(path: str, size: int, sample: bytes, gitattributes: bytes | None) -> bool:
    """The Hub's rule, roughly: an LFS pattern of .gitattributes matches, or the file is over 10 MB, or it looks binary
    (a NUL byte in its first 512 bytes). Empty files are always regular: huggingface_hub commits them inline."""
    if size == 0:
        return False
    name = path.rsplit("/", 1)[-1]
    matched = any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in _lfs_patterns(gitattributes))
    return matched or size > LFS_SIZE_THRESHOLD or b"\0" in sample[:512]


class HubServer:
    """An in-memory Hub for model and dataset repos, served by a ThreadingHTTPServer on 127.0.0.1 (a free port) from a background
    thread between ``start()`` and ``stop()``, or for the span of ``with``.

    ``endpoint`` is its base URL; ``requests`` lists every request received (method, decoded path, whether it carried
    the token), so a test can check which route a file took; ``files``, ``commits`` and ``is_private`` read the store.
    """

    def __init__(self, token: str, user: str = "someone"):
        self.token = token
        self.user = user
        self.requests: list[RecordedRequest] = []
        self._repos: dict[str, _Repo] = {}
        self._aliases: dict[str, str] = {}  # a moved repository's old id -> its id (`add_alias`)
        self._upload_tickets: dict[str, tuple[str, str, int]] = {}  # ticket -> (repo_id, sha256, size) of an LFS PUT
        self._lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes = [
            ("GET", "/api/whoami-v2", self._whoami),
            ("POST", "/api/repos/create", self._create_repo),
            ("POST", "/api/validate-yaml", self._validate_yaml),
            ("GET", f"/api/{_KIND}/{_REPO}", self._model_info),
            ("GET", f"/api/{_KIND}/{_REPO}/revision/{_REV}", self._model_info),
            ("GET", f"/api/{_KIND}/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", self._tree),
            ("POST", f"/api/{_KIND}/{_REPO}/preupload/{_REV}", self._preupload),
            ("POST", f"/api/{_KIND}/{_REPO}/commit/{_REV}", self._commit),
            ("POST", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/upload/(?P<oid>[0-9a-f]{{64}})", self._lfs_put),
            ("POST", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("GET", f"/{_PREFIX}{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
            ("HEAD", f"/{_PREFIX}{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
        ]

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.hub = self  # type: ignore[attr-defined]  # how the handler reaches the store
        self._thread = threading.Thread(target=self._http.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join()
            self._http = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._http is None:
            raise RuntimeError("the hub server is not started")
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def add_alias(self, old_id: str, repo_id: str) -> None:
        """Answer for ``old_id`` as for ``repo_id``, as the Hub answers a moved repository's old id: `gpt2`, the id
        experiments/gpt2-small.yaml names, is `openai-community/gpt2` since 2024. (The Hub redirects; here the old id
        is served as the new one directly, and commit URLs name the new one, as the Hub's do.)"""
        with self._lock:
            self._existing(repo_id)
            if old_id in self._repos:
                raise ValueError(f"{old_id} is a repo of its own on the test hub")
            self._aliases[old_id] = repo_id

    # -- what tests read --------------------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` ("main" is the newest commit), .gitattributes included."""
        with self._lock:
            return dict(self._commit_at(self._existing(repo_id), revision).files)

    def commits(self, repo_id: str) -> list[Commit]:
        """The commits of ``repo_id``, oldest first; the first is the Hub's initial commit of .gitattributes."""
        with self._lock:
            return list(self._existing(repo_id).commits)

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._existing(repo_id).private

    # -- request handling (called from the handler threads) ---------------------------------------------------------

    def handle(self, method: str, target: str, headers: HTTPMessage, body: bytes) -> _Reply:
        url = urlsplit(target)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        auth = headers.get("Authorization")
        authorized = auth == f"Bearer {self.token}"
        with self._lock:
            self.requests.append(RecordedRequest(method, unquote(url.path), authorized, headers.get("Range")))
            try:
                # The Hub refuses a wrong token outright, even where no token is needed. The LFS upload URL stands for
                # a signed storage URL: huggingface_hub sends no token there.
                if auth is not None and not authorized and method != "PUT":
                    raise HubError(401, INVALID_TOKEN_MESSAGE)
                for route_method, pattern, route in self._routes:
                    match = re.fullmatch(pattern, url.path)
                    if route_method == method and match:
                        params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                        if params.pop("kind", "models") == "datasets":
                            params["repo"] = DATASET + params["repo"]
                        if "repo" in params:
                            params["repo"] = self._aliases.get(params["repo"], params["repo"])
                        return route(authorized=authorized, query=query, body=body, byte_range=headers.get("Range"), **params)
                raise HubError(404, f"no such endpoint on this test hub: {method} {url.path}")
            except HubError as error:
                reply = _json_reply({"error": error.message}, error.status)
                reply.headers |= {"X-Error-Message": error.message, **error.headers}
                if error.code:
                    reply.headers["X-Error-Code"] = error.code
                return reply

    # -- store helpers (the lock is held) ---------------------------------------------------------------------------

    def _existing(self, repo_id: str) -> _Repo:
        if repo_id not in self._repos:
            raise KeyError(f"no repo {repo_id} on the test hub")
        return self._repos[repo_id]

    def _visible(self, repo_id: str, authorized: bool) -> _Repo:
        """The repo, or the Hub's answer for a repo that does not exist or is private to someone else: 404 with
        X-Error-Code RepoNotFound, which huggingface_hub raises as RepositoryNotFoundError."""
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, authorized: bool) -> _Repo:
        # 401 with RepoNotFound: what the Hub answers an anonymous write, which huggingface_hub raises as
        # RepositoryNotFoundError (its own check of the 401 only matches https URLs, so the code must be explicit).
        if not authorized:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        return self._visible(repo_id, authorized)

    @staticmethod
    def _commit_at(repo: _Repo, revision: str) -> Commit:
        if revision == "main":
            return repo.head
        for commit in repo.commits:
            if commit.oid == revision:
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    @staticmethod
    def _branch_head(repo: _Repo, revision: str) -> Commit:
        """Writes go to a branch; this hub has only main."""
        if revision != "main":
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.head

    def _new_commit(self, repo: _Repo, summary: str, files: dict[str, bytes], lfs_paths: set[str]) -> Commit:
        commit = Commit(secrets.token_hex(20), summary, files, frozenset(lfs_paths & set(files)), datetime.now(UTC))
        repo.commits.append(commit)
        return commit

    # -- routes -----------------------------------------------------------------------------------------------------

    def _whoami(self, authorized: bool, **_) -> _Reply:
        if not authorized:
            raise HubError(401, INVALID_TOKEN_MESSAGE)
        return _json_reply(
            {
                "type": "user",
                "name": self.user,
                "fullname": self.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, authorized: bool, body: bytes, **_) -> _Reply:
        if not authorized:
            raise HubError(401, "Invalid username or password.")
        request = json.loads(body)
        kind = request.get("type") or "model"
        if kind not in ("model", "dataset"):
            raise HubError(400, "this test hub serves model and dataset repos only")
        repo_id = ("" if kind == "model" else DATASET) + f"{request.get('organization') or self.user}/{request['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._repos:
            # The Hub's 409 carries the repo's URL too: create_repo(exist_ok=True) returns it.
            reply = _json_reply({"error": "You already created this model repo", "url": url}, 409)
            reply.headers["X-Error-Message"] = "You already created this model repo"
            return reply
        self._add_repo(repo_id, private=request.get("visibility") == "private")
        return _json_reply({"url": url, "name": repo_id.removeprefix(DATASET)})

    def _add_repo(self, repo_id: str, private: bool) -> None:
        repo = _Repo(private=private, created=datetime.now(UTC), commits=[])
        self._new_commit(repo, "initial commit", {".gitattributes": INITIAL_GITATTRIBUTES}, set())
        self._repos[repo_id] = repo

    def _validate_yaml(self, **_) -> _Reply:
        # huggingface_hub checks README.md's metadata before uploading it; any metadata passes here.
        return _json_reply({"errors": [], "warnings": []})

    def _model_info(self, repo: str, authorized: bool, query: dict, rev: str = "main", **_) -> _Reply:
        stored = self._visible(repo, authorized)
        commit = self._commit_at(stored, rev)
        siblings = []
        for path, content in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if query.get("blobs", "").lower() == "true":
                sibling |= self._blob_fields(commit, path, content)
            siblings.append(sibling)
        return _json_reply(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo.removeprefix(DATASET),
                **({} if repo.startswith(DATASET) else {"modelId": repo}),
                "author": repo.removeprefix(DATASET).split("/")[0],
                "sha": commit.oid,
                "private": stored.private,
                "gated": False,
                "disabled": False,
                "createdAt": _timestamp(stored.created),
                "lastModified": _timestamp(stored.head.date),
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    @staticmethod
    def _blob_fields(commit: Commit, path: str, content: bytes) -> dict:
        """size, blobId and lfs of a sibling (model info with blobs=True)."""
        if path not in commit.lfs_paths:
            return {"size": len(content), "blobId": _git_blob_sha1(content)}
        pointer = _lfs_pointer(content)
        lfs = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "pointerSize": len(pointer)}
        return {"size": len(content), "blobId": _git_blob_sha1(pointer), "lfs": lfs}

    def _tree(self, repo: str, rev: str, authorized: bool, query: dict, path: str = "", **_) -> _Reply:
        commit = self._commit_at(self._visible(repo, authorized), rev)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        recursive = query.get("recursive", "").lower() == "true"
        entries: dict[str, dict] = {}
        for file_path, content in commit.files.items():
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            # The folders between the listed one and the file; a non-recursive listing stops at the first.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "oid": hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest(), "path": folder}
            if recursive or len(parts) == 1:
                blob = self._blob_fields(commit, file_path, content)
                entry = {"type": "file", "oid": blob["blobId"], "size": blob["size"], "path": file_path}
                if "lfs" in blob:
                    entry["lfs"] = {"oid": blob["lfs"]["sha256"], "size": blob["lfs"]["size"], "pointerSize": blob["lfs"]["pointerSize"]}
                entries[file_path] = entry
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return _json_reply([entries[key] for key in sorted(entries)])

    def _preupload(self, repo: str, rev: str, authorized: bool, query: dict, body: bytes, **_) -> _Reply:
        stored = self._writable(repo, authorized)
        if query.get("create_pr"):
            raise HubError(400, "this test hub has no pull requests")
        head = self._branch_head(stored, rev)
        gitattributes = head.files.get(".gitattributes")
        answers = []
        for file in json.loads(body)["files"]:
            sample = base64.b64decode(file["sample"])
            mode = "lfs" if _needs_lfs(file["path"], file["size"], sample, gitattributes) else "regular"
            # The oid of the file already there, which huggingface_hub compares with its own to skip unchanged files.
            existing = head.files.get(file["path"])
            if existing is None:
                oid = None
            elif file["path"] in head.lfs_paths:
                oid = hashlib.sha256(existing).hexdigest()
            else:
                oid = _git_blob_sha1(existing)
            answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json_reply({"files": answers, "commitOid": head.oid})

    def _commit(self, repo: str, rev: str, authorized: bool, query: dict, body: bytes, **_) -> _Reply:
        stored = self._writable(repo, authorized)
        if query.get("create_pr"):
            raise HubError(400, "this test hub has no pull requests")
        head = self._branch_head(stored, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with its header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, lfs_paths = dict(head.files), set(head.lfs_paths)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                content = base64.b64decode(value["content"])
                # As the Hub: binary content must come through LFS, never inline in the commit.
                if _needs_lfs(path, len(content), content, head.files.get(".gitattributes")):
                    raise HubError(400, f"Your push was rejected because it contains binary files: {path}. Use LFS.")
                files[path] = content
                lfs_paths.discard(path)
            elif key == "lfsFile":
                if value["oid"] not in stored.lfs_objects:
                    raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path}")
                files[path] = stored.lfs_objects[value["oid"]]
                lfs_paths.add(path)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                inside = [name for name in files if name.startswith(path.rstrip("/") + "/")]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in inside:
                    del files[name]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self._new_commit(stored, header.get("summary", ""), files, lfs_paths)
        return _json_reply(
            {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{commit.oid}", "hookOutput": ""}
        )

    def _lfs_batch(self, repo: str, authorized: bool, body: bytes, **_) -> _Reply:
        stored = self._writable(repo, authorized)
        request = json.loads(body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            raise HubError(400, "this test hub takes LFS uploads with the basic transfer only")
        objects = []
        for item in request["objects"]:
            oid, size = item["oid"], item["size"]
            answer = {"oid": oid, "size": size}
            if oid not in stored.lfs_objects:  # an object the repo already has needs no actions: the client skips it
                ticket = secrets.token_urlsafe(16)  # stands for the signature of a storage URL: the PUT carries no token
                self._upload_tickets[ticket] = (repo, oid, size)
                base = f"{self.endpoint}/{repo}.git/info/lfs/objects"
                answer |= {
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{base}/upload/{oid}?ticket={ticket}"}, "verify": {"href": f"{base}/verify"}},
                }
            objects.append(answer)
        # Always "basic" (the client offers basic and multipart). The client never negotiates Xet here: it takes Xet
        # on its own whenever hf_xet is importable, before any batch request, which is why pointed_at() disables it.
        return _Reply(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, repo: str, oid: str, query: dict, body: bytes, **_) -> _Reply:
        ticket = self._upload_tickets.get(query.get("ticket", ""))
        if ticket is None or ticket[:2] != (repo, oid):
            raise HubError(403, "no upload was granted for this object")
        if len(body) != ticket[2] or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"the uploaded content does not match sha256 {oid} and size {ticket[2]}")
        self._repos[repo].lfs_objects[oid] = body
        del self._upload_tickets[query["ticket"]]
        return _Reply(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, repo: str, authorized: bool, body: bytes, **_) -> _Reply:
        stored = self._writable(repo, authorized)
        request = json.loads(body)
        content = stored.lfs_objects.get(request["oid"])
        if content is None or len(content) != request["size"]:
            raise HubError(404, f"LFS object {request['oid']} was not uploaded")
        return _json_reply({"success": True})

    def _resolve(self, repo: str, rev: str, path: str, authorized: bool, byte_range: str | None = None, **_) -> _Reply:
        commit = self._commit_at(self._visible(repo, authorized), rev)
        content = commit.files.get(path)
        if content is None:
            # X-Repo-Commit lets huggingface_hub cache that the file is absent at this commit, as it does with the Hub.
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream"}
        if path in commit.lfs_paths:
            # The Hub redirects an LFS file to its CDN; here it is served in place, with the same X-Linked-* headers,
            # which huggingface_hub prefers (the sha256 names the blob in its cache).
            pointer = _lfs_pointer(content)
            headers["ETag"] = f'"{_git_blob_sha1(pointer)}"'
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(content).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(content))
        else:
            headers["ETag"] = f'"{_git_blob_sha1(content)}"'
        asked = None if byte_range is None else _byte_range(byte_range, len(content), path)
        if asked is None:
            return _Reply(200, content, headers)
        # One range, as HfFileSystem asks for it (RFC 9110 §14.1.2): a 206 with that slice, or 416 outside the file.
        # (This server must not ignore a valid one: it would send the whole file where the client expects the slice.)
        first, last = asked
        headers["Content-Range"] = f"bytes {first}-{last}/{len(content)}"
        return _Reply(206, content[first : last + 1], headers)


def _byte_range(header: str, size: int, path: str) -> tuple[int, int] | None:
    """The first and last byte (inclusive) of a ``Range: bytes=<first>-[<last>]`` or ``bytes=-<suffix>`` header over a
    file of ``size`` bytes. None for a header that is not one valid range (several ranges, a last byte before the
    first, another unit): RFC 9110 lets a server ignore it and send the whole file, as this one does. HubError 416
    when a valid range starts past the end of the file, or a suffix range is empty."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    unsatisfiable = HubError(416, f"Range {header!r} is outside {path} ({size} bytes)", headers={"Content-Range": f"bytes */{size}"})
    if match.group(1) == "":  # the last n bytes
        if int(match.group(2)) == 0 or size == 0:
            raise unsatisfiable
        return max(size - int(match.group(2)), 0), size - 1
    first = int(match.group(1))
    if match.group(2) and int(match.group(2)) < first:
        return None
    if first >= size:
        raise unsatisfiable
    return first, min(int(match.group(2)), size - 1) if match.group(2) else size - 1


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no pooled connection of the client outlives the server.
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def do_PUT(self):
        self._serve()

    def _serve(self) -> None:
        reply = self.server.hub.handle(self.command, self.path, self.headers, self._body())
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))  # on HEAD too: the size of what GET would send
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _body(self) -> bytes:
        # huggingface_hub sends every body with a Content-Length, the LFS PUT of a file object included.
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format, *args):  # quiet: the tests read hub.requests instead
        pass


@contextmanager
def pointed_at(hub: HubServer, cache_dir: str | Path, token: str | None = None) -> Iterator[None]:
    """Point the huggingface_hub client of this process (and of any subprocess it starts) at ``hub``, with a fresh
    cache ``cache_dir`` and ``token`` as its only token (None: anonymous), restoring everything on exit.

    huggingface_hub reads its environment once, at import, into ``huggingface_hub.constants``; most of the client then
    reads those constants at call time. A test process has imported it long before (conftest sets HF_HUB_OFFLINE=1
    first), so setting the variables is not enough:

    - ``constants.ENDPOINT``: the base URL of every HfApi() created afterwards, and of the upload and LFS helpers.
    - ``constants.HUGGINGFACE_CO_URL_TEMPLATE``: the /resolve URL of hf_hub_download (SAELens's loaders call it with no
      endpoint), built from ENDPOINT at import and not rebuilt.
    - ``huggingface_hub.hf_api.api.endpoint``: the HfApi instance created at import behind the module-level functions
      (``huggingface_hub.list_repo_files``, ``create_repo``, ``upload_folder``...).
    - ``constants.HF_HUB_OFFLINE``: offline mode refuses every request before it is sent (tests run offline).
    - ``constants.HF_HUB_DISABLE_XET``: with hf_xet importable, uploads take the Xet protocol (a CAS service this hub
      does not have) without asking the server; disabling it makes the client use the preupload + LFS batch path.
      Downloads use Xet only when a response carries X-Xet-* headers, which this hub never sends.
    - ``constants.HF_HUB_CACHE``: the download cache, so that nothing cached by or for another hub is reused.
    - ``constants.HF_TOKEN_PATH`` (and its stored_tokens neighbour): moved into ``cache_dir``, to a file that does not
      exist, so a token saved on the machine by ``hf auth login`` is never sent; ``HF_TOKEN`` (read at call time) is
      set to ``token`` or removed, so the client's implicit token is exactly ``token``.
    - ``constants.HF_HUB_DISABLE_IMPLICIT_TOKEN``: forced off, else that implicit token would not be sent at all.

    The matching variables (HF_ENDPOINT, HF_HUB_OFFLINE=0, HF_HUB_DISABLE_XET=1, HF_HUB_CACHE, HF_TOKEN_PATH,
    HF_TOKEN) are set as well, for subprocesses, which import huggingface_hub afresh. Not patched: the origins trusted
    for redirects (this hub never redirects) and ``HF_URL_HOSTS`` (hf:// URIs).
    """
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    no_stored_token = cache_dir / ".no-stored-token" / "token"  # never created
    patches = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_CACHE": str(cache_dir),
        "HF_TOKEN_PATH": str(no_stored_token),
        "HF_STORED_TOKENS_PATH": str(no_stored_token.with_name("stored_tokens")),
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    environment = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_CACHE": str(cache_dir),
        "HF_TOKEN_PATH": str(no_stored_token),
        "HF_TOKEN": token,
        "HUGGING_FACE_HUB_TOKEN": None,  # the legacy name, which HF_TOKEN only shadows when set
    }
    saved_constants = {name: getattr(constants, name) for name in patches}
    saved_environment = {name: os.environ.get(name) for name in environment}
    saved_api_endpoint = huggingface_hub.hf_api.api.endpoint
    try:
        for name, value in patches.items():
            setattr(constants, name, value)
        _set_environment(environment)
        huggingface_hub.hf_api.api.endpoint = hub.endpoint
        yield
    finally:
        for name, value in saved_constants.items():
            setattr(constants, name, value)
        _set_environment(saved_environment)
        huggingface_hub.hf_api.api.endpoint = saved_api_endpoint


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
