"""A Hugging Face Hub API server on 127.0.0.1, for tests that drive the real `huggingface_hub` client over HTTP.

It serves the model-repo endpoints that the client (huggingface_hub 2.4), transformers and peft call in the tests:

    POST   /api/repos/create, DELETE /api/repos/delete      create_repo (409 if it exists), delete_repo
    POST   /api/validate-yaml                               upload_folder's README.md check (the tests read the card)
    GET    /api/models/{id}[/revision/{rev}]                model_info: sha, private, siblings (?blobs: sizes)
    GET    /api/models/{id}/tree/{rev}[/{path}]             list_repo_tree / list_repo_files (?recursive, ?expand)
    POST   /api/models/{id}/paths-info/{rev}                get_paths_info
    POST   /api/models/{id}/preupload/{rev}                 every file "regular": its content comes in the commit
    POST   /api/models/{id}/commit/{rev}                    NDJSON: header (parentCommit), file, deletedFile,
                                                            deletedFolder
    GET    /api/models/{id}/refs, /commits/{rev}            list_repo_refs, list_repo_commits
    POST, DELETE /api/models/{id}/branch/{name}, /tag/{rev} create_branch (startingPoint) / create_tag, deletes
    GET, HEAD /{id}/resolve/{rev}/{path}                    downloads: ETag (git blob sha1), X-Repo-Commit; no X-Xet-*
    GET    /api/organizations/{org}/overview                404 (the test Hub has no organizations): bitsandbytes' kernel lookup

Every commit is an immutable snapshot (path -> blob) with a 40-hex sha; a revision is a branch, a tag or a commit
sha. A new repository starts, like on the Hub, with one commit holding `.gitattributes`. Blobs are stored
content-addressed under the server's root folder. Errors carry the Hub's `X-Error-Code` (RepoNotFound,
RevisionNotFound, EntryNotFound), which the client turns into its typed exceptions. A request the server does not
implement gets a 404 and is recorded in `unhandled`; a handler that raises answers 500 and is recorded in `errors`;
the `hub` fixture fails a test that left either non-empty.
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
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*(\n|$)", flags=re.S)


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob (what the Hub sends as a regular file's `oid` and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def flag(value: str | None) -> bool:
    """A boolean query or form value as the client sends it ("true" / "false")."""
    return (value or "").lower() in ("1", "true")


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
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class HubServer:
    """`start()` binds 127.0.0.1 on an ephemeral port and serves in a thread; `stop()` shuts it down."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}  # ("model", repo_id) -> repo
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[str] = []
        self.errors: list[str] = []
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ storage

    def put_blob(self, content: bytes) -> str:
        oid = git_blob_sha1(content)
        path = self.root / oid
        if not path.exists():
            path.write_bytes(content)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.root / oid).read_bytes()

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, str], title: str, message: str) -> Commit:
        self._counter += 1  # two commits with the same content still get different shas
        digest = json.dumps([repo.repo_id, parent, sorted(files.items()), title, message, self._counter])
        commit = Commit(hashlib.sha1(digest.encode()).hexdigest(), parent, title, message, now_iso(), dict(files))
        repo.commits[commit.oid] = commit
        return commit

    # ------------------------------------------------------------------ lookups

    def repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(("model", repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag or a commit sha -> the commit."""
        oid = repo.branches.get(revision) or repo.tags.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def history(self, repo: Repo, commit: Commit | None) -> list[Commit]:
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


# ---------------------------------------------------------------------- HTTP


class HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the bound subclass
    protocol_version = "HTTP/1.1"
    timeout = 60  # a connection that sends nothing for this long is dropped

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def _json_body(self):
        return json.loads(self.body or b"{}")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        # One request per connection: no idle keep-alive connection can be closed under a client that reuses it.
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        headers["Connection"] = "close"
        self.close_connection = True
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.log.append((self.command, self.path, status))

    def _json(self, payload, status: int = 200) -> bool:
        self._send(status, json.dumps(payload).encode())
        return True

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        try:
            # The whole body is read before anything is answered, so a client is never answered mid-upload.
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with self.hub.lock:
                handled = self._route(segments)
            if not handled:
                self.hub.unhandled.append(f"{self.command} {self.path}")
                raise HubError(404, f"not implemented by the test Hub: {self.command} {split.path}")
        except HubError as error:
            headers = {**error.headers, "X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send(error.status, json.dumps({"error": error.message}).encode(), headers)
        except Exception:  # a bug in the server: answer 500 and keep the traceback for the test
            self.hub.errors.append(f"{self.command} {self.path}\n{traceback.format_exc()}")
            self._send(500, b'{"error": "internal error in the test Hub"}')

    do_GET = do_HEAD = do_POST = do_DELETE = _dispatch

    # -------------------------------------------------------------- routing

    def _route(self, seg: list[str]) -> bool:
        method = self.command
        if seg[:1] != ["api"]:  # a download: /{ns}/{name}/resolve/{rev}/{path}
            if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve_file("/".join(seg[:2]), seg[3], "/".join(seg[4:]))
            return False
        rest = seg[1:]
        if rest == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if rest == ["repos", "delete"] and method == "DELETE":
            payload = self._json_body()
            self.hub.repos.pop(("model", f"{payload['organization']}/{payload['name']}"))
            return self._json({})
        if rest == ["validate-yaml"] and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if len(rest) == 3 and rest[0] == "organizations" and rest[2] == "overview" and method == "GET":
            # bitsandbytes asks, at import on a CPU with AVX512-BF16 where `kernels` is installed (a dependency of
            # transformers >= 5.25), whether kernels-community publishes trusted kernels; this Hub has no organizations
            raise HubError(404, f"organization {rest[1]} not found")
        if len(rest) < 3 or rest[0] != "models":
            return False
        repo, action = self.hub.repo("/".join(rest[1:3])), rest[3:]
        verb, args = (action[0], action[1:]) if action else (None, [])
        if verb is None and method == "GET":
            return self._repo_info(repo, self.hub.resolve(repo, "main"))
        if verb == "revision" and len(args) == 1 and method == "GET":
            return self._repo_info(repo, self.hub.resolve(repo, args[0]))
        if verb == "tree" and args and method == "GET":
            return self._tree(repo, self.hub.resolve(repo, args[0]), "/".join(args[1:]))
        if verb == "paths-info" and len(args) == 1 and method == "POST":
            return self._paths_info(repo, self.hub.resolve(repo, args[0]))
        if verb == "preupload" and len(args) == 1 and method == "POST":
            head = self._branch_head(repo, args[0])
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": head.files.get(f["path"])}
                for f in self._json_body()["files"]
            ]
            return self._json({"files": files, "commitOid": head.oid})
        if verb == "commit" and len(args) == 1 and method == "POST":
            return self._commit(repo, args[0])
        if verb == "refs" and not args and method == "GET":
            return self._refs(repo)
        if verb == "commits" and len(args) == 1 and method == "GET":
            return self._commits(repo, self.hub.resolve(repo, args[0]))
        if verb == "branch" and len(args) == 1 and method in ("POST", "DELETE"):
            return self._branch(repo, args[0], create=method == "POST")
        if verb == "tag" and len(args) == 1 and method in ("POST", "DELETE"):
            return self._tag(repo, args[0], create=method == "POST")
        return False

    # -------------------------------------------------------------- repos

    def _create_repo(self) -> bool:
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if ("model", repo_id) in self.hub.repos:
            return self._json({"error": "You already created this model repo", "url": url}, status=409)
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        first = self.hub.new_commit(repo, None, {".gitattributes": self.hub.put_blob(GITATTRIBUTES)}, "initial", "")
        repo.branches["main"] = first.oid
        self.hub.repos[("model", repo_id)] = repo
        return self._json({"url": url, "name": repo_id})

    def _repo_info(self, repo: Repo, commit: Commit) -> bool:
        card = {}
        if "README.md" in commit.files:
            match = FRONT_MATTER.match(self.hub.blob(commit.files["README.md"]).decode())
            card = (yaml.safe_load(match.group(1)) if match else None) or {}
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        if flag(self.query.get("blobs")):
            for sibling in siblings:
                oid = commit.files[sibling["rfilename"]]
                sibling.update(size=len(self.hub.blob(oid)), blobId=oid)
        info = {"id": repo.repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}
        return self._json({**info, "pipeline_tag": card.get("pipeline_tag")})

    def _entry(self, repo: Repo, head: Commit, path: str, expand: bool) -> dict:
        oid = head.files.get(path)
        if oid is None:  # a folder: its "oid" is a digest of what it holds
            held = sorted((p, o) for p, o in head.files.items() if p.startswith(path + "/"))
            entry = {"type": "directory", "oid": hashlib.sha1(json.dumps(held).encode()).hexdigest(), "size": 0}
        else:
            entry = {"type": "file", "oid": oid, "size": len(self.hub.blob(oid))}
        entry["path"] = path
        if expand:
            last = self.hub.last_commit_for(repo, head, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _tree(self, repo: Repo, head: Commit, folder: str) -> bool:
        recursive = flag(self.query.get("recursive"))
        prefix = folder + "/" if folder else ""
        if prefix and not any(path.startswith(prefix) for path in head.files):
            raise HubError(404, f"{folder} does not exist on {head.oid}", "EntryNotFound", {"X-Repo-Commit": head.oid})
        files, folders = [], set()
        for path in sorted(head.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depths = range(1, len(parts) if recursive else min(len(parts), 2))  # the folders above the file
            folders.update(prefix + "/".join(parts[:depth]) for depth in depths)
            if recursive or len(parts) == 1:
                files.append(path)
        expand = flag(self.query.get("expand"))
        return self._json([self._entry(repo, head, path, expand) for path in sorted(folders) + files])

    def _paths_info(self, repo: Repo, head: Commit) -> bool:
        form = parse_qs(self.body.decode())  # get_paths_info posts a form: paths=...&paths=...&expand=...
        known = [p for p in form["paths"] if p in head.files or any(f.startswith(p + "/") for f in head.files)]
        return self._json([self._entry(repo, head, path, flag(form["expand"][-1])) for path in known])

    def _refs(self, repo: Repo) -> bool:
        def refs(table: dict, kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(table.items())]

        return self._json(
            {
                "branches": refs(repo.branches, "heads"),
                "tags": refs(repo.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def _commits(self, repo: Repo, head: Commit) -> bool:
        history = self.hub.history(repo, head)
        return self._json(
            [
                {"id": c.oid, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": USER}]}
                for c in history
            ]
        )

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> bool:
        commit = self.hub.resolve(self.hub.repo(repo_id), revision)
        oid = commit.files.get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"', "X-Repo-Commit": commit.oid}
        self._send(200, self.hub.blob(oid), headers)
        return True

    # -------------------------------------------------------------- writes

    def _branch_head(self, repo: Repo, branch: str) -> Commit:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    def _commit(self, repo: Repo, branch: str) -> bool:
        head = self._branch_head(repo, branch)
        header, *operations = [json.loads(line) for line in self.body.splitlines()]
        if header["value"].get("parentCommit", head.oid) != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for operation in operations:
            key, path = operation["key"], operation["value"]["path"]
            if key == "file":
                files[path] = self.hub.put_blob(base64.b64decode(operation["value"]["content"]))
            elif key == "deletedFile":
                del files[path]
            elif key == "deletedFolder":
                files = {p: oid for p, oid in files.items() if not p.startswith(path.rstrip("/") + "/")}
            else:  # an operation this server does not implement must fail the push, not be dropped silently
                raise HubError(400, f"unsupported commit operation {key!r}")
        summary, description = header["value"].get("summary", ""), header["value"].get("description", "")
        commit = self.hub.new_commit(repo, head.oid, files, summary, description)
        repo.branches[branch] = commit.oid
        url = f"{self.hub.url}/{repo.repo_id}/commit/{commit.oid}"
        return self._json({"success": True, "commitOid": commit.oid, "commitUrl": url})

    def _branch(self, repo: Repo, branch: str, create: bool) -> bool:
        if not create:
            del repo.branches[branch]
        elif branch in repo.branches:  # without it, create_branch(exist_ok=True) would reset the branch to main
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        else:
            repo.branches[branch] = self.hub.resolve(repo, self._json_body().get("startingPoint") or "main").oid
        return self._json({})

    def _tag(self, repo: Repo, revision: str, create: bool) -> bool:
        if create:
            repo.tags[self._json_body()["tag"]] = self.hub.resolve(repo, revision).oid
        else:
            del repo.tags[revision]
        return self._json({})
