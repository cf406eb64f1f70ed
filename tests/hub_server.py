"""A small Hugging Face Hub API server on 127.0.0.1, for tests that drive the real `huggingface_hub` client over HTTP.

It serves what the client (huggingface_hub 2.4) and transformers use to push and pull model repositories:

    POST   /api/repos/create                                  create_repo (409 if it exists)
    DELETE /api/repos/delete                                  delete_repo
    GET    /api/whoami-v2                                     whoami
    POST   /api/validate-yaml                                 README.md front-matter check before a commit
    GET    /api/{type}s/{ns}/{name}[/revision/{rev}]          repo_info / model_info (sha, siblings, cardData, tags)
    GET    /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]       list_repo_tree (?recursive=, ?expand=)
    POST   /api/{type}s/{ns}/{name}/paths-info/{rev}          get_paths_info
    POST   /api/{type}s/{ns}/{name}/preupload/{rev}           every file is "regular": content comes inline in the commit
    POST   /api/{type}s/{ns}/{name}/commit/{rev}              NDJSON: header (parentCommit), file (base64), deletedFile,
                                                              deletedFolder; lfsFile is refused (never asked for)
    GET    /api/{type}s/{ns}/{name}/refs                      list_repo_refs
    GET    /api/{type}s/{ns}/{name}/commits/{rev}             list_repo_commits
    POST   /api/{type}s/{ns}/{name}/branch/{branch}           create_branch (startingPoint), DELETE: delete_branch
    POST   /api/{type}s/{ns}/{name}/tag/{rev}                 create_tag, DELETE /tag/{tag}: delete_tag
    GET    /api/agent-harnesses                               empty registry (only asked for when telemetry is on)
    GET, HEAD /{ns}/{name}/resolve/{rev}/{path}               file download: ETag (git blob sha1), X-Repo-Commit,
                                                              Content-Length, Range; never any X-Xet-* header

Every commit is an immutable snapshot (path -> blob) with a 40-hex sha; a revision is a branch, a tag or a full commit
sha. A new repository starts, like on the Hub, with one commit holding `.gitattributes`. Blobs are stored
content-addressed under the server's root folder, metadata in memory (and as JSON next to the blobs, for reading
after a failure). Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound), which
the client turns into its typed exceptions. Requests the server does not implement get a 404 and are recorded in
`unhandled`; a handler that raises answers 500 and is recorded in `errors`; tests can assert both stay empty.

Each connection carries one request (`Connection: close`), so no client ever reuses a connection the server dropped.
Pull requests (`create_pr=True`), LFS / Xet uploads, pagination (every listing fits one page) and access control
beyond "writes and private repos need a bearer token" are not implemented.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "local-user"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_BODY = 512 * 1024 * 1024  # one request body, bytes
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob (what the Hub sends as a regular file's `oid` and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's X-Error-Code (if any)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]  # path -> blob oid


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class HubServer:
    """`start()` binds 127.0.0.1 on an ephemeral port and serves in a thread; `stop()` shuts it down."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[str] = []
        self.errors: list[str] = []
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ storage

    def _blob_path(self, oid: str) -> Path:
        return self.root / "blobs" / oid[:2] / oid[2:]

    def put_blob(self, content: bytes) -> str:
        oid = git_blob_sha1(content)
        path = self._blob_path(oid)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(content)
            tmp.replace(path)
        return oid

    def blob(self, oid: str) -> bytes:
        return self._blob_path(oid).read_bytes()

    def blob_size(self, oid: str) -> int:
        return self._blob_path(oid).stat().st_size

    def _persist(self, repo: Repo) -> None:
        path = self.root / "repos" / f"{repo.repo_type}s" / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "private": repo.private,
            "branches": repo.branches,
            "tags": repo.tags,
            "commits": {oid: vars(commit) for oid, commit in repo.commits.items()},
        }
        path.write_text(json.dumps(state, indent=1))

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, str], title: str, message: str) -> Commit:
        self._counter += 1
        digest = json.dumps([repo.repo_id, parent, sorted(files.items()), title, message, self._counter, now_iso()])
        commit = Commit(hashlib.sha1(digest.encode()).hexdigest(), parent, title, message, now_iso(), dict(files))
        repo.commits[commit.oid] = commit
        return commit

    # ------------------------------------------------------------------ lookups (used by tests too)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag, `refs/heads/...`, `refs/tags/...` or a full commit sha -> the commit."""
        name = revision
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if revision.startswith(prefix):
                oid = table.get(revision[len(prefix) :])
                break
        else:
            oid = repo.branches.get(name) or repo.tags.get(name)
            if oid is None and SHA_RE.match(name) and name in repo.commits:
                oid = name
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def history(self, repo: Repo, commit: Commit) -> list[Commit]:
        chain = []
        while commit is not None:
            chain.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return chain

    def last_commit_for(self, repo: Repo, head: Commit, path: str) -> Commit:
        """The newest commit in `head`'s history that changed `path` (a file, or anything under a folder)."""

        def state(commit: Commit | None):
            if commit is None:
                return None
            return sorted((p, o) for p, o in commit.files.items() if p == path or p.startswith(path + "/"))

        chain = self.history(repo, head)
        for commit, parent in zip(chain, chain[1:] + [None], strict=True):
            if state(commit) != state(parent):
                return commit
        return chain[-1]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repo(repo_id)
        return {path: self.blob(oid) for path, oid in self.resolve(repo, revision).files.items()}


# ---------------------------------------------------------------------- HTTP


class HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the bound subclass
    protocol_version = "HTTP/1.1"
    server_version = "ms-llava-test-hub/1"
    timeout = 60  # a connection that sends nothing for this long is dropped

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    # -------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
        return self._raw_body

    def _read_body(self) -> bytes:
        """The whole request body, read before routing so that a client is never answered mid-upload."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            for _ in range(1_000_000):  # bounded: at most this many chunks
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > MAX_BODY:
                    self.close_connection = True
                    raise HubError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _json_body(self):
        body = self._body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"invalid JSON body: {error}") from error

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        # One request per connection: no idle keep-alive connection can be closed under a client that reuses it.
        headers = {"Content-Type": "application/json", **(headers or {}), "Connection": "close"}
        headers.setdefault("Content-Length", str(len(body)))
        self.close_connection = True
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)
        self.hub.log.append((self.command, self.path, status))

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, error: HubError) -> None:
        headers = dict(error.headers)
        if error.code:
            headers["X-Error-Code"] = error.code
        headers["X-Error-Message"] = error.message.encode("ascii", "replace").decode()
        self._send(error.status, json.dumps({"error": error.message}).encode(), headers, head=self.command == "HEAD")

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ") and len(self.headers["Authorization"]) > 7

    def _require_token(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        self._raw_body = b""
        try:
            self._raw_body = self._read_body()
            with self.hub.lock:
                handled = self._route(segments)
            if not handled:
                self.hub.unhandled.append(f"{self.command} {self.path}")
                raise HubError(404, f"not implemented by the test Hub: {self.command} {split.path}")
        except HubError as error:
            self._error(error)
        except Exception:  # a bug in the server: answer 500 and keep the traceback for the test
            self.hub.errors.append(f"{self.command} {self.path}\n{traceback.format_exc()}")
            self._error(HubError(500, "internal error in the test Hub"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -------------------------------------------------------------- routing

    def _route(self, seg: list[str]) -> bool:
        method = self.command
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["agent-harnesses"] and method == "GET":
                return self._json({"standardEnvVars": [], "harnesses": {}}) or True
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                repo_type, repo_id, action = REPO_TYPES[rest[0]], "/".join(rest[1:3]), rest[3:]
                return self._repo_api(method, repo_type, repo_id, action)
            return False
        # file download: /{ns}/{name}/resolve/{rev}/{path}, /datasets/{ns}/{name}/resolve/...
        repo_type = "model"
        if seg and seg[0] in REPO_TYPES and seg[0] != "models" and len(seg) > 4:
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(repo_type, "/".join(seg[:2]), seg[3], "/".join(seg[4:]))
        return False

    def _repo_api(self, method: str, repo_type: str, repo_id: str, action: list[str]) -> bool:
        hub = self.hub
        repo = hub.repo(repo_id, repo_type)
        if repo.private and not self._authorized():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if not action and method == "GET":
            return self._repo_info(repo, hub.resolve(repo, "main"))
        verb, args = action[0], action[1:]
        if verb == "revision" and len(args) == 1 and method == "GET":
            return self._repo_info(repo, hub.resolve(repo, args[0]))
        if verb == "tree" and args and method == "GET":
            return self._tree(repo, hub.resolve(repo, args[0]), "/".join(args[1:]))
        if verb == "paths-info" and len(args) == 1 and method == "POST":
            return self._paths_info(repo, hub.resolve(repo, args[0]))
        if verb == "preupload" and len(args) == 1 and method == "POST":
            return self._preupload(repo, args[0])
        if verb == "commit" and len(args) == 1 and method == "POST":
            return self._commit(repo, args[0])
        if verb == "refs" and not args and method == "GET":
            return self._refs(repo)
        if verb == "commits" and len(args) == 1 and method == "GET":
            return self._commits(repo, hub.resolve(repo, args[0]))
        if verb == "branch" and len(args) == 1 and method in ("POST", "DELETE"):
            return self._branch(repo, args[0], create=method == "POST")
        if verb == "tag" and len(args) == 1 and method in ("POST", "DELETE"):
            return self._tag(repo, args[0], create=method == "POST")
        return False

    # -------------------------------------------------------------- account, repos

    def _whoami(self) -> bool:
        self._require_token()
        self._json(
            {
                "type": "user",
                "name": USER,
                "fullname": "Local Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )
        return True

    def _create_repo(self) -> bool:
        self._require_token()
        payload = self._json_body()
        name, organization = payload.get("name"), payload.get("organization") or USER
        repo_type = payload.get("type") or "model"
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or repo_type not in URL_PREFIXES:
            raise HubError(400, f"invalid repo name or type: {name!r} {repo_type!r}")
        repo_id = f"{organization}/{name}"
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            self._json({"error": "You already created this model repo", "url": url}, status=409)
            return True
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id, repo_type, private, now_iso())
        first = self.hub.new_commit(
            repo, None, {".gitattributes": self.hub.put_blob(GITATTRIBUTES)}, "initial commit", ""
        )
        repo.branches["main"] = first.oid
        self.hub.repos[(repo_type, repo_id)] = repo
        self.hub._persist(repo)
        self._json({"url": url, "name": repo_id, "id": repo_id})
        return True

    def _delete_repo(self) -> bool:
        self._require_token()
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or USER}/{payload.get('name')}"
        key = (payload.get("type") or "model", repo_id)
        if key not in self.hub.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        del self.hub.repos[key]
        self._json({})
        return True

    def _validate_yaml(self) -> bool:
        content = self._json_body().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            self._json({"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []}, status=400)
            return True
        if metadata is not None and not isinstance(metadata, dict):
            self._json({"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}, status=400)
            return True
        self._json({"errors": [], "warnings": []})
        return True

    # -------------------------------------------------------------- reads

    def _card_metadata(self, commit: Commit) -> dict:
        oid = commit.files.get("README.md")
        if oid is None:
            return {}
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", self.hub.blob(oid).decode("utf-8", "replace"), flags=re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError:
            metadata = None
        return metadata if isinstance(metadata, dict) else {}

    def _repo_info(self, repo: Repo, commit: Commit) -> bool:
        hub = self.hub
        card = self._card_metadata(commit)
        tags = list(card.get("tags") or [])
        if card.get("library_name"):
            tags.insert(0, card["library_name"])
        if any(path.endswith(".safetensors") for path in commit.files):
            tags.append("safetensors")
        if card.get("license"):
            tags.append(f"license:{card['license']}")
        base_models = card.get("base_model") or []
        for base in [base_models] if isinstance(base_models, str) else base_models:
            tags.append(f"base_model:{base}")
        config = {}
        if "config.json" in commit.files:
            try:
                full = json.loads(hub.blob(commit.files["config.json"]))
                config = {key: full[key] for key in ("architectures", "model_type", "auto_map") if key in full}
            except json.JSONDecodeError:
                pass
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, oid in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=hub.blob_size(oid), blobId=oid)
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info.update(modelId=repo.repo_id, config=config)
            for key in ("library_name", "pipeline_tag"):
                if card.get(key):
                    info[key] = card[key]
        if card:
            info["cardData"] = card
        self._json(info)
        return True

    def _entry(self, repo: Repo, head: Commit, path: str, oid: str | None, expand: bool) -> dict:
        if oid is None:  # a folder: its "oid" is a digest of what it holds
            held = sorted((p, o) for p, o in head.files.items() if p.startswith(path + "/"))
            entry = {"type": "directory", "oid": hashlib.sha1(json.dumps(held).encode()).hexdigest(), "size": 0}
        else:
            entry = {"type": "file", "oid": oid, "size": self.hub.blob_size(oid)}
        entry["path"] = path
        if expand:
            last = self.hub.last_commit_for(repo, head, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _tree(self, repo: Repo, head: Commit, folder: str) -> bool:
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        if prefix and not any(path.startswith(prefix) for path in head.files):
            raise HubError(404, f"{folder} does not exist on {head.oid}", "EntryNotFound", {"X-Repo-Commit": head.oid})
        files, folders = [], set()
        for path in sorted(head.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(path)
        entries = [self._entry(repo, head, path, None, expand) for path in sorted(folders)]
        entries += [self._entry(repo, head, path, head.files[path], expand) for path in files]
        self._json(entries)
        return True

    def _paths_info(self, repo: Repo, head: Commit) -> bool:
        body = self._body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(body or "{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() in ("1", "true")
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in head.files:
                entries.append(self._entry(repo, head, path, head.files[path], expand))
            elif any(p.startswith(path + "/") for p in head.files):
                entries.append(self._entry(repo, head, path, None, expand))
        self._json(entries)
        return True

    def _refs(self, repo: Repo) -> bool:
        def refs(table: dict, kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(table.items())]

        self._json(
            {
                "branches": refs(repo.branches, "heads"),
                "tags": refs(repo.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )
        return True

    def _commits(self, repo: Repo, head: Commit) -> bool:
        self._json(
            [
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": USER, "avatar": None}],
                }
                for commit in self.hub.history(repo, head)
            ]
        )
        return True

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        repo = self.hub.repo(repo_id, repo_type)
        if repo.private and not self._authorized():
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        commit = self.hub.resolve(repo, revision)
        oid = commit.files.get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = self.hub.blob(oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{oid}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status, body = 200, content
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(content) - 1, len(content) - 1)
            if start >= len(content):
                raise HubError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{len(content)}"})
            status, body = 206, content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, body, headers, head=self.command == "HEAD")
        return True

    # -------------------------------------------------------------- writes

    def _branch_head(self, repo: Repo, revision: str) -> Commit:
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            if revision in repo.tags or revision in repo.commits:
                raise HubError(400, f"can only commit to a branch, not to {revision}")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    def _preupload(self, repo: Repo, revision: str) -> bool:
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the test Hub")
        head = self._branch_head(repo, revision)
        files = self._json_body().get("files", [])
        answer = [
            {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": head.files.get(item["path"])}
            for item in files
        ]
        self._json({"files": answer, "commitOid": head.oid})
        return True

    def _commit(self, repo: Repo, revision: str) -> bool:
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the test Hub")
        head = self._branch_head(repo, revision)
        lines = [line for line in self._body().splitlines() if line.strip()]
        items = [json.loads(line) for line in lines]
        if not items or items[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = items[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for item in items[1:]:
            key, value = item.get("key"), item.get("value", {})
            path = value.get("path", "").strip("/")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[path] = self.hub.put_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:  # lfsFile is never requested by this server's preupload answers
                raise HubError(400, f"unsupported commit operation {key!r}")
        commit = self.hub.new_commit(repo, head.oid, files, header.get("summary", ""), header.get("description", ""))
        repo.branches[revision.removeprefix("refs/heads/")] = commit.oid
        self.hub._persist(repo)
        url = f"{self.hub.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": url, "commitMessage": commit.title})
        return True

    def _branch(self, repo: Repo, branch: str, create: bool) -> bool:
        self._require_token()
        if not create:
            if branch not in repo.branches or branch == "main":
                raise HubError(404 if branch not in repo.branches else 403, f"cannot delete branch {branch}")
            del repo.branches[branch]
        else:
            if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
                raise HubError(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._json_body().get("startingPoint") or "main"
            repo.branches[branch] = self.hub.resolve(repo, start).oid
        self.hub._persist(repo)
        self._json({})
        return True

    def _tag(self, repo: Repo, name: str, create: bool) -> bool:
        self._require_token()
        if not create:
            if name not in repo.tags:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            del repo.tags[name]
        else:
            tag = self._json_body().get("tag")
            if not tag or not re.fullmatch(r"[A-Za-z0-9._/-]+", tag) or tag.startswith("refs/"):
                raise HubError(400, f"Invalid tag name: {tag!r}")
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            repo.tags[tag] = self.hub.resolve(repo, name).oid
        self.hub._persist(repo)
        self._json({})
        return True
