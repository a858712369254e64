"""A stand-in for the Hugging Face Hub: no hub is reachable from this machine, so tests that download
a model point `HF_ENDPOINT` at this small HTTP server instead.

It serves model folders from a directory (`<root>/<org>/<name>/...`) at the endpoints that
`huggingface_hub.snapshot_download` calls, with the headers it needs:

  GET       /api/models/<org>/<name>/revision/<rev>      the repo's info and commit sha
  GET       /api/models/<org>/<name>/tree/<rev>          its files (sizes, blob ids)
  HEAD, GET /<org>/<name>/resolve/<rev>/<path>           a file (X-Repo-Commit, ETag, Content-Length)

and answers as the hub does when it refuses: 404 with `X-Error-Code: RepoNotFound` for a repo it
does not hold (`RevisionNotFound` for another revision than `main` or the commit), 401 (no token) or
403 (another token) with `X-Error-Code: GatedRepo` for a gated repo. It listens on 127.0.0.1 only,
runs as a child process started and stopped by pid (`HubStandIn`), and appends one JSON line per
request to `requests.jsonl` (method, path, status, and which token came: `right`, `wrong` or
`none`, never the token itself), so tests can count who asked for what.

Run as a script: `python hub_standin.py --root DIR --port N --log FILE [--gated ORG/NAME ...]`,
with the token of gated repos in the environment variable HUB_STANDIN_TOKEN.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN_ENV = "HUB_STANDIN_TOKEN"
HUB_MODEL = "medmo-test/tiny-qwen3-vl"
"""The tiny preset, public (tests/conftest.py's `hub` fixture puts it there)."""
HUB_GATED_MODEL = "medmo-test/tiny-qwen3-vl-gated"
"""The same model, gated: only the fixture's token gets it."""
REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
API_PATH = re.compile(rf"^/api/models/{REPO}/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")
RESOLVE_PATH = re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


def commit_of(folder: Path) -> str:
    """A 40-hex commit id of a repo folder's contents (what the hub's `sha` is for a revision)."""
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    server_version = "hub-standin/1"
    root: Path
    gated: frozenset[str]
    token: str
    log_file: Path
    log_lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # requests.jsonl is the log

    def _serve(self, body: bool) -> None:
        api, resolve = API_PATH.match(self.path), RESOLVE_PATH.match(self.path)
        match = api or resolve
        if match is None:
            return self._refuse(404, "EntryNotFound", "no such endpoint", "none")
        repo, rev = match["repo"], match["rev"]
        folder = self.root / repo
        sent = self.headers.get("Authorization")
        token = "none" if sent is None else "right" if sent == f"Bearer {self.token}" else "wrong"
        if not (folder / "config.json").is_file():
            return self._refuse(404, "RepoNotFound", "Repository not found", token)
        if repo in self.gated and token != "right":
            return self._refuse(401 if token == "none" else 403, "GatedRepo", f"Access to model {repo} is restricted.", token)
        commit = commit_of(folder)
        if rev not in ("main", commit):
            return self._refuse(404, "RevisionNotFound", f"Invalid rev id: {rev}", token)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if api and match["kind"] == "revision":
            info = {"id": repo, "modelId": repo, "sha": commit, "private": False, "gated": repo in self.gated and "manual",
                    "siblings": [{"rfilename": p.relative_to(folder).as_posix()} for p in files]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body, token)
        if api:
            tree = [{"type": "file", "path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body, token)
        path = folder / match["file"]
        if not path.is_file() or folder.resolve() not in path.resolve().parents:
            return self._refuse(404, "EntryNotFound", "Entry not found", token)
        data = path.read_bytes()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        return self._send(200, data, headers, body, token)

    def _refuse(self, status: int, code: str, message: str, token: str) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(status, json.dumps({"error": message}).encode(), headers, True, token)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool, token: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)
        entry = {"method": self.command, "path": self.path.split("?")[0], "status": status, "token": token}
        with self.log_lock, self.log_file.open("a") as log:
            log.write(json.dumps(entry) + "\n")


@dataclass
class HubStandIn:
    """The stand-in hub as a child process (tests/controlplane/processes.spawn: stopped by pid, and
    checked at the end of the session)."""

    workdir: Path
    gated: list[str] = field(default_factory=list)
    token: str = ""

    @property
    def root(self) -> Path:
        """Where repos go: `root / "org/name"` is a model folder."""
        return self.workdir / "repos"

    @property
    def log(self) -> Path:
        return self.workdir / "requests.jsonl"

    def start(self) -> HubStandIn:
        from controlplane.processes import free_ports, spawn, wait_until

        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, __file__, "--root", str(self.root), "--port", str(self.port), "--log", str(self.log)]
        for repo in self.gated:
            argv += ["--gated", repo]
        self.process = spawn("hub-standin", argv, self.workdir / "hub-standin.log", env={**os.environ, TOKEN_ENV: self.token})
        wait_until(self._answers, 30, "the hub stand-in to answer", [self.process])
        return self

    def _answers(self) -> bool:
        import socket

        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.process.stop(grace_s=5)

    def requests(self) -> list[dict]:
        """Every request so far, in order (method, path, status, token: right, wrong or none)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description="a stand-in for the Hugging Face Hub, for tests")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--gated", action="append", default=[])
    args = parser.parse_args()
    HubHandler.root, HubHandler.gated, HubHandler.log_file = args.root, frozenset(args.gated), args.log
    HubHandler.token = os.environ.get(TOKEN_ENV, "")
    ThreadingHTTPServer(("127.0.0.1", args.port), HubHandler).serve_forever()


if __name__ == "__main__":
    main()
