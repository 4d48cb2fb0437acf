"""A loopback stand-in for the part of the Hugging Face Hub API that `huggingface_hub` uses to upload a model.

Served with `http.server` on 127.0.0.1, state kept in memory:

- ``POST /api/repos/create``                    create a repo (409 when it exists, as the Hub does)
- ``POST /api/models/{repo}/branch/{branch}``   create a branch from main
- ``POST /api/models/{repo}/preupload/{rev}``   answers ``uploadMode: "regular"`` for every file, so the client sends
                                                 contents inline (base64) in the commit: no LFS, Xet or S3 involved
- ``POST /api/validate-yaml``                   parses the README front matter and rejects invalid metadata
- ``POST /api/models/{repo}/commit/{rev}``      applies an NDJSON commit atomically (all files or none)
- ``GET  /api/models/{repo}[/revision/{rev}]``  repo info (sha, siblings)
- ``GET|HEAD /{repo}/resolve/{rev}/{path}``     file contents

Writes need ``Authorization: Bearer <token>``; the tokens seen are kept in `FakeHub.tokens_seen` so a test can check
that a token was sent and nowhere written. ``fail_commits={n, ...}`` answers the n-th commit request (1-based, counted
over the server's lifetime) with HTTP 500, to test what a failed upload leaves behind.

    with FakeHub(fail_commits={1}) as hub:
        HfApi(endpoint=hub.endpoint).upload_folder(...)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

__all__ = ["FakeHub", "validate_card_metadata"]

# Licence identifiers the Hub accepts in `license:` (a subset of https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
    cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
    cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
    cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0
    lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense
    zlib pddl llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other""".split()
)
BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})
PIPELINE_TAGS = frozenset(
    """text-generation text2text-generation fill-mask feature-extraction text-classification token-classification
    question-answering summarization translation sentence-similarity zero-shot-classification""".split()
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _front_matter(content: str) -> tuple[str | None, str | None]:
    """(YAML text, error) of a README's leading ``---`` block; (None, None) when there is none."""
    lines = content.splitlines()
    if not lines or lines[0].strip() != "---":
        return None, None
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "\n".join(lines[1:i]), None
    return None, "the metadata block opened with '---' is never closed"


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _check_model_index(mi: Any) -> list[str]:
    errs: list[str] = []
    if not isinstance(mi, list) or not mi:
        return ['"model-index" must be a non-empty list']
    for i, entry in enumerate(mi):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errs.append(f'"model-index[{i}].name" must be a string')
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            errs.append(f'"model-index[{i}].results" must be a list')
            continue
        for j, r in enumerate(results):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance(r, dict):
                errs.append(f'"{where}" must be a mapping')
                continue
            task, ds, metrics = r.get("task"), r.get("dataset"), r.get("metrics")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errs.append(f'"{where}.task.type" must be a string')
            if not isinstance(ds, dict) or not all(isinstance(ds.get(k), str) for k in ("name", "type")):
                errs.append(f'"{where}.dataset" must have string "name" and "type"')
            if not isinstance(metrics, list) or not metrics:
                errs.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for k, m in enumerate(metrics):
                if not isinstance(m, dict) or not isinstance(m.get("type"), str):
                    errs.append(f'"{where}.metrics[{k}].type" must be a string')
                elif isinstance(m.get("value"), bool) or not isinstance(m.get("value"), (int, float, str)):
                    errs.append(f'"{where}.metrics[{k}].value" must be a number or a string')
    return errs


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README, following the Hub's rules for the fields a model card uses."""
    text, err = _front_matter(content)
    if err:
        return [err], []
    if text is None:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"metadata is not valid YAML: {e}"], []
    if meta is None:
        return [], ["empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return [f"metadata must be a mapping, got {type(meta).__name__}"], []
    errs: list[str] = []
    lic = meta.get("license")
    if lic is not None and (not isinstance(lic, str) or lic not in HUB_LICENSES):
        errs.append(f'"license" must be one of the Hub licence identifiers, got {lic!r}')
    for key in ("tags", "datasets", "language"):
        if key in meta and not (_is_str_list(meta[key]) or (key == "language" and isinstance(meta[key], str))):
            errs.append(f'"{key}" must be a list of strings, got {meta[key]!r}')
    base = meta.get("base_model")
    if base is not None:
        bases = [base] if isinstance(base, str) else base
        if not _is_str_list(bases) or not all(_REPO_ID.match(b) for b in bases):
            errs.append(f'"base_model" must be a model id or a list of model ids, got {base!r}')
    rel = meta.get("base_model_relation")
    if rel is not None:
        if rel not in BASE_MODEL_RELATIONS:
            errs.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}, got {rel!r}')
        if base is None:
            errs.append('"base_model_relation" is set but "base_model" is missing')
    tag = meta.get("pipeline_tag")
    if tag is not None and tag not in PIPELINE_TAGS:
        errs.append(f'"pipeline_tag" {tag!r} is not a known pipeline tag')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errs.append('"library_name" must be a string')
    if "model-index" in meta:
        errs.extend(_check_model_index(meta["model-index"]))
    return errs, []


@dataclass
class _Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict[str, Any]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ---- plumbing -------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any = None, raw: bytes | None = None, headers: dict | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        # recorded before the reply leaves: once the client has its answer, the request is in the log
        self.server.hub.requests.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, headers={"X-Error-Code": code} if code else None)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            self._error(401, "Invalid credentials in Authorization header")
            return False
        with self.server.hub.lock:
            self.server.hub.tokens_seen.add(auth[7:].strip())
        return True

    # ---- routes ---------------------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        if path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if not self._authorized():
            return
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        m = re.match(r"^/api/models/(.+)/(preupload|commit|branch)/(.+)$", path)
        if m is None:
            return self._error(404, f"no route for POST {path}")
        repo_id, action, rev = m.groups()
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        if action == "branch":
            return self._create_branch(repo, rev)
        if rev not in repo.branches:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if action == "preupload":
            return self._preupload(repo, rev, json.loads(body))
        return self._commit(repo_id, repo, rev, body)

    def do_GET(self) -> None:  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
        if m:
            repo = self.server.hub.repos.get(m.group(1))
            rev = m.group(2) or "main"
            if repo is None or rev not in repo.branches:
                return self._error(404, f"{m.group(1)}@{rev} not found", "RepoNotFound")
            files = repo.branches[rev]
            return self._send(200, {"id": m.group(1), "modelId": m.group(1), "sha": repo.heads[rev],
                                    "private": repo.private, "siblings": [{"rfilename": p} for p in sorted(files)]})
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            repo = self.server.hub.repos.get(m.group(1))
            files = repo.branches.get(m.group(2)) if repo else None
            if files is None or m.group(3) not in files:
                return self._error(404, f"{path} not found", "EntryNotFound")
            data = files[m.group(3)]
            return self._send(200, raw=data, headers={"X-Repo-Commit": repo.heads[m.group(2)],
                                                      "ETag": f'"{_git_blob_sha1(data)}"'})
        self._error(404, f"no route for GET {path}")

    do_HEAD = do_GET  # noqa: N815

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body).get("content", "")
        errors, warnings = validate_card_metadata(content)
        payload = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        if errors:
            # ModelCard.validate asks for text/plain and raises ValueError(response.text)
            if "text/plain" in self.headers.get("Accept", ""):
                return self._send(400, raw="\n".join(errors).encode())
            return self._send(400, payload)
        self._send(200, payload)

    def _create_repo(self, payload: dict) -> None:
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        if not name or not _REPO_ID.match(repo_id):
            return self._error(400, f"invalid repo name {repo_id!r}")
        hub = self.server.hub
        with hub.lock:
            if repo_id in hub.repos:  # the Hub's 409 carries the url too; create_repo(exist_ok=True) reads it
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{hub.endpoint}/{repo_id}"}, headers={"X-Error-Code": "RepoExists"})
            hub.repos[repo_id] = _Repo(private=payload.get("visibility") == "private")
        self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

    def _create_branch(self, repo: _Repo, branch: str) -> None:
        with self.server.hub.lock:
            if branch in repo.branches:
                return self._error(409, f"Branch {branch} already exists")
            repo.branches[branch] = dict(repo.branches["main"])
            repo.heads[branch] = repo.heads["main"]
        self._send(200, {})

    def _preupload(self, repo: _Repo, rev: str, payload: dict) -> None:
        files = repo.branches[rev]
        out = []
        for f in payload.get("files", []):
            p = f["path"]
            out.append({"path": p, "uploadMode": "regular", "shouldIgnore": False,
                        "oid": _git_blob_sha1(files[p]) if p in files else None})
        self._send(200, {"files": out, "commitOid": repo.heads[rev]})

    def _commit(self, repo_id: str, repo: _Repo, rev: str, body: bytes) -> None:
        hub = self.server.hub
        with hub.lock:
            hub.commit_requests += 1
            number = hub.commit_requests
        if number in hub.fail_commits:
            return self._error(500, f"injected failure of commit request {number}")
        header, adds, deletes = None, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"])
            else:  # lfsFile: never requested, the preupload answer is "regular" for every file
                return self._error(400, f"unexpected commit item {key!r}")
        if header is None or not isinstance(header.get("summary"), str):
            return self._error(400, "commit is missing its header line")
        with hub.lock:  # all or nothing
            files = dict(repo.branches[rev])
            for p in deletes:
                for q in [q for q in files if q == p or q.startswith(p.rstrip("/") + "/")]:
                    del files[q]
            files.update(adds)
            oid = hashlib.sha1(f"{repo.heads[rev]}{header['summary']}{sorted(files)}{number}".encode()).hexdigest()
            repo.branches[rev] = files
            repo.heads[rev] = oid
            repo.commits.append({"revision": rev, "oid": oid, "summary": header["summary"], "files": sorted(adds)})
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "FakeHub"


class FakeHub:
    """The fake Hub; use as a context manager (starts on a free port of 127.0.0.1, stops on exit)."""

    def __init__(self, fail_commits: set[int] | None = None):
        self.fail_commits: set[int] = set(fail_commits or ())
        self.repos: dict[str, _Repo] = {}
        self.tokens_seen: set[str] = set()
        self.requests: list[tuple[str, str, int]] = []
        self.commit_requests = 0
        self.lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started; use `with FakeHub() as hub:` or call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- inspection helpers for tests -----------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `revision`, path -> bytes."""
        return dict(self.repos[repo_id].branches[revision])


if __name__ == "__main__":  # run it by hand: python tests/fake_hub.py
    import time

    with FakeHub() as _hub:
        print(f"fake hub at {_hub.endpoint} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
