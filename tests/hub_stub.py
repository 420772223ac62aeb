"""A stand-in for the Hugging Face Hub over HTTP, for tests: the endpoints huggingface_hub calls to
list, download and commit files and to start a job, served from memory on localhost.

Point a process at it with HF_ENDPOINT (or HfApi(endpoint=…)): layerline and huggingface_hub run
unchanged above it. Writes need the token it was made with; reads are open, as for public repos.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("GET", re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(r"^/api/jobs/(?P<namespace>[^/]+)$"), "run_job"),
    ("GET", re.compile(r"^/api/jobs/(?P<namespace>[^/]+)/(?P<job_id>[^/]+)$"), "inspect_job"),
    ("GET", re.compile(r"^/api/jobs/(?P<namespace>[^/]+)/(?P<job_id>[^/]+)/logs$"), "job_logs"),
]
WRITES = {"whoami", "create_repo", "preupload", "commit", "run_job", "inspect_job", "job_logs"}
USER = "someone"


class StubHub:
    """Model repos (path → bytes, or a local file served as is) and the jobs started, behind HTTP."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict[str, bytes | Path]] = {}
        self.private: set[str] = set()
        self.commits = 0
        self.jobs: list[dict] = []
        self.job_failure: int | None = None  # HTTP status run_job answers with, when set
        self.job_stage = "SCHEDULING"  # what every job reports
        self.job_log: list[str] = []  # what every job has logged
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StubHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_file(self, repo: str, path: str, content: bytes | Path) -> None:
        self.repos.setdefault(repo, {})[path] = content

    def read(self, repo: str, path: str) -> bytes:
        content = self.repos[repo][path]
        return content.read_bytes() if isinstance(content, Path) else content

    def write_repo(self, repo: str, folder: Path) -> Path:
        """Copy a repo's files into `folder`, as a download of the whole repo would."""
        for path in self.repos[repo]:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(self.read(repo, path))
        return folder

    @property
    def revision(self) -> str:
        return f"{self.commits:040x}"


def _handler(hub: StubHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not every request
            pass

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def _route(self, method: str) -> None:
            path = unquote(urlparse(self.path).path)
            for verb, pattern, name in ROUTES:
                match = pattern.match(path)
                if verb == method and match:
                    if name in WRITES and self.headers.get("Authorization") != f"Bearer {hub.token}":
                        return self._json({"error": "Invalid credentials in Authorization header"}, 401)
                    return getattr(self, name)(**match.groupdict())
            self._json({"error": f"stub hub: no route for {method} {path}"}, 404)

        # ---------------------------------------------------------------- replies

        def _json(self, body: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _repo(self, repo: str) -> dict[str, bytes | Path] | None:
            if repo not in hub.repos:
                self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            return hub.repos.get(repo)

        # ---------------------------------------------------------------- endpoints

        def whoami(self) -> None:
            self._json({"type": "user", "name": USER, "orgs": [],
                        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

        def create_repo(self) -> None:
            body = json.loads(self._body())
            repo = f"{body.get('organization') or USER}/{body['name']}"
            if repo not in hub.repos and (body.get("private") or body.get("visibility") == "private"):
                hub.private.add(repo)  # an existing repo keeps its visibility
            hub.repos.setdefault(repo, {})
            self._json({"url": f"{hub.url}/{repo}", "name": repo})

        def tree(self, repo: str, rev: str, path: str | None) -> None:
            if (files := self._repo(repo)) is not None:
                prefix = f"{path.rstrip('/')}/" if path else ""
                self._json([{"type": "file", "path": p, "size": len(hub.read(repo, p)), "oid": "0" * 40}
                            for p in sorted(files) if p.startswith(prefix)])

        def model_info(self, repo: str, rev: str | None) -> None:
            if (files := self._repo(repo)) is not None:
                self._json({"id": repo, "sha": hub.revision, "private": repo in hub.private,
                            "siblings": [{"rfilename": p} for p in sorted(files)]})

        def resolve(self, repo: str, rev: str, path: str) -> None:
            if (files := self._repo(repo)) is None:
                return
            if path not in files:
                return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound",
                                                                      "X-Repo-Commit": hub.revision})
            data = hub.read(repo, path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", hub.revision)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

        def preupload(self, repo: str, rev: str) -> None:
            if self._repo(repo) is not None:
                files = json.loads(self._body())["files"]
                self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                      for f in files]})

        def commit(self, repo: str, rev: str) -> None:
            if (files := self._repo(repo)) is None:
                return
            for line in self._body().splitlines():
                op = json.loads(line)
                value = op["value"]
                if op["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif op["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif op["key"] == "deletedFolder":
                    for p in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                        del files[p]
                elif op["key"] != "header":
                    return self._json({"error": f"stub hub: unsupported commit operation {op['key']}"}, 400)
            hub.commits += 1
            self._json({"commitUrl": f"{hub.url}/{repo}/commit/{hub.revision}", "commitOid": hub.revision,
                        "pullRequestUrl": None})

        def run_job(self, namespace: str) -> None:
            if hub.job_failure:
                return self._json({"error": "stub hub: job refused"}, hub.job_failure)
            hub.jobs.append(json.loads(self._body()))
            self.inspect_job(namespace, f"job{len(hub.jobs)}")

        def inspect_job(self, namespace: str, job_id: str) -> None:
            number = int(job_id.removeprefix("job")) if re.fullmatch(r"job\d+", job_id) else 0
            if not 0 < number <= len(hub.jobs):
                return self._json({"error": "Job not found"}, 404)
            self._json({"id": job_id, "owner": {"id": "1", "name": namespace, "type": "user"},
                        "status": {"stage": hub.job_stage, "message": None},
                        "createdAt": "2026-01-01T00:00:00.000Z", **hub.jobs[number - 1]})

        def job_logs(self, namespace: str, job_id: str) -> None:
            events = [{"data": line, "timestamp": "2026-01-01T00:00:00.000Z"} for line in hub.job_log]
            data = "".join(f"data: {json.dumps(event)}\n\n" for event in events).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
