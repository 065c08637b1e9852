"""`oneshot push` against a local stand-in of the Hub: the real `huggingface_hub` client, no internet.

The server implements exactly the endpoints an upload uses (read from huggingface_hub's source): whoami-v2,
repos/create, branch, validate-yaml, preupload, the LFS batch API with its PUT upload and verify, and the
NDJSON commit. Xet is switched off (``HF_HUB_DISABLE_XET``) and the server does not offer it: any other
path is answered 404 and recorded, and the tests assert none was asked for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

import pytest

from oneshot.cli import main
from oneshot.hub import PushError, push
from oneshot.verify import VerificationError, collect_files, verify_run_folder
from tests.test_card import make_run

TOKEN = "hf_test_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".gz")


class FakeHub:
    """A thread-safe in-memory Hub: repos -> branches -> {path: bytes}, plus an LFS object store."""

    def __init__(self, *, fail_commits: int = 0, drop_commits: int = 0) -> None:
        self.fail_commits = fail_commits  # answer the first commits 503
        self.drop_commits = drop_commits  # close the connection of the first commits without an answer
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.repos: dict[
            str, dict[str, Any]
        ] = {}  # id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}
        self.lfs_puts = 0
        self.commit_attempts = 0
        self.commits: list[dict[str, Any]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub.handle(self, "GET")

            def do_POST(self) -> None:
                hub.handle(self, "POST")

            def do_PUT(self) -> None:
                hub.handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- HTTP plumbing ---------------------------------------------------------------------------------

    @staticmethod
    def _body(req: BaseHTTPRequestHandler) -> bytes:
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(req.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    req.rfile.readline()
                    return out
                out += req.rfile.read(size)
                req.rfile.readline()
        return req.rfile.read(int(req.headers.get("Content-Length") or 0))

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        if status >= 400 and isinstance(payload, dict) and "error" in payload:
            req.send_header("X-Error-Message", payload["error"])
        req.end_headers()
        req.wfile.write(data)

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlparse(req.path).path)
        body = self._body(req)
        with self.lock:
            self.requests.append((method, path))
        authorized = req.headers.get("Authorization") == f"Bearer {TOKEN}"
        if path.startswith("/api/") and not authorized:
            return self._send(req, 401, {"error": "Invalid credentials in Authorization header"})
        if method == "POST" and "/commit/" in path and self.drop_commits > 0:
            with self.lock:
                self.drop_commits -= 1
                self.commit_attempts += 1
            req.close_connection = True  # a reset connection: no status line at all
            return None
        for (verb, pattern), fn in self.routes.items():
            m = re.fullmatch(pattern, path)
            if verb == method and m:
                status, payload = fn(self, body, *m.groups())
                return self._send(req, status, payload)
        with self.lock:
            self.unknown.append((method, path))
        return self._send(req, 404, {"error": f"no route {method} {path}"})

    # -- endpoints ---------------------------------------------------------------------------------------

    def whoami(self, body: bytes) -> tuple[int, Any]:
        return 200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, body: bytes) -> tuple[int, Any]:
        data = json.loads(body)
        repo = f"{data.get('organization') or 'tester'}/{data['name']}"
        with self.lock:
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            private = data.get("visibility") == "private" or bool(data.get("private"))
            self.repos[repo] = {"private": private, "branches": {"main": {}}}
        return 200, {"url": f"{self.url}/{repo}", "name": repo}

    def create_branch(self, body: bytes, repo: str, branch: str) -> tuple[int, Any]:
        with self.lock:
            branches = self.repos[repo]["branches"]
            if branch in branches:
                return 409, {"error": "Reference already exists"}
            branches[branch] = dict(branches["main"])
        return 200, {}

    def validate_yaml(self, body: bytes) -> tuple[int, Any]:
        from huggingface_hub import ModelCard

        try:
            ModelCard(json.loads(body)["content"])
        except ValueError as exc:
            return 400, {"errors": [{"message": str(exc)}], "error": "invalid metadata"}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample or f["size"] > 10 * 2**20
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            )
        return 200, {"files": files}

    def lfs_batch(self, body: bytes, repo: str) -> tuple[int, Any]:
        objects = []
        for obj in json.loads(body)["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            with self.lock:
                present = obj["oid"] in self.lfs
            if not present:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-store/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/lfs-store/{obj['oid']}/verify", "header": {}},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, body: bytes, oid: str) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        with self.lock:
            self.lfs[oid] = body
            self.lfs_puts += 1
        return 200, {}

    def lfs_verify(self, body: bytes, oid: str) -> tuple[int, Any]:
        data = json.loads(body)
        with self.lock:
            ok = oid in self.lfs and len(self.lfs[oid]) == data["size"]
        return (200, {}) if ok else (404, {"error": "object not uploaded"})

    def commit(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
        with self.lock:
            self.commit_attempts += 1
            if self.fail_commits > 0:
                self.fail_commits -= 1
                return 503, {"error": "Service Unavailable"}
            files: dict[str, bytes] = {}
            modes: dict[str, str] = {}
            summary = ""
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    summary = value["summary"]
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    modes[value["path"]] = "regular"
                elif item["key"] == "lfsFile":
                    if value["oid"] not in self.lfs:
                        return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                    files[value["path"]] = self.lfs[value["oid"]]
                    modes[value["path"]] = "lfs"
            branches = self.repos[repo]["branches"]
            if rev not in branches:
                return 404, {"error": f"Invalid rev id: {rev}"}
            branches[rev].update(files)
            oid = hashlib.sha1(f"{repo}{rev}{len(self.commits)}".encode()).hexdigest()
            self.commits.append(
                {"repo": repo, "revision": rev, "summary": summary, "modes": modes, "oid": oid}
            )
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}

    _REPO = r"([^/]+/[^/]+)"
    routes: ClassVar[dict[tuple[str, str], Any]] = {
        ("GET", r"/api/whoami-v2"): whoami,
        ("POST", r"/api/repos/create"): create_repo,
        ("POST", r"/api/validate-yaml"): validate_yaml,
        ("POST", rf"/api/models/{_REPO}/branch/([^/]+)"): create_branch,
        ("POST", rf"/api/models/{_REPO}/preupload/([^/]+)"): preupload,
        ("POST", rf"/api/models/{_REPO}/commit/([^/]+)"): commit,
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch"): lfs_batch,
        ("PUT", r"/lfs-store/([0-9a-f]{64})"): lfs_put,
        ("POST", r"/lfs-store/([0-9a-f]{64})/verify"): lfs_verify,
    }

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo]["branches"][branch])


@pytest.fixture(scope="module")
def run_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, calib_txt: Path, data_dir: Path
) -> Path:
    return make_run(tmp_path_factory.mktemp("push"), tiny_llama_dir, calib_txt, data_dir)


def _online(monkeypatch: pytest.MonkeyPatch, endpoint: str, token: str | None = TOKEN) -> None:
    """Point huggingface_hub at ``endpoint`` at run time; offline mode (set for the test suite) and Xet off."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as server:
        _online(monkeypatch, server.url)
        yield server


def _expected(folder: Path, include_compressed: bool = False) -> dict[str, bytes]:
    out = {}
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.parts[0].startswith("compressed-") and not include_compressed:
            continue
        out[rel.as_posix()] = p.read_bytes()
    return out


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if line.startswith("oneshot: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err  # one error line, after at most a few warnings
    assert len(err) == 1 or "no content hashes" in err[0], err
    return errors[0]


def test_push_uploads_the_folder_in_one_commit(
    run_dir: Path, hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub.utils._runtime import is_xet_available

    assert not is_xet_available()
    capsys.readouterr()
    assert main(["push", str(run_dir), "--repo-id", "tester/tiny-pruned", "-q"]) == 0
    out = capsys.readouterr().out
    assert len(hub.commits) == 1 and hub.commit_attempts == 1
    commit = hub.commits[0]
    assert f"repo         {hub.url}/tester/tiny-pruned" in out and f"commit       {commit['oid']}" in out
    assert commit["revision"] == "main" and "sparsegpt 2:4" in commit["summary"]
    got = hub.files("tester/tiny-pruned")
    expected = _expected(run_dir)
    assert got == expected  # byte-identical, regular and LFS files alike
    assert {"README.md", "model.safetensors", "oneshot.json", "report/report.html"} <= set(got)
    assert not any(p.startswith("compressed-") for p in got)
    assert commit["modes"]["model.safetensors"] == "lfs" and commit["modes"]["config.json"] == "regular"
    assert hub.lfs_puts == sum(1 for m in commit["modes"].values() if m == "lfs") >= 2  # weights and plots
    assert hub.unknown == [] and not any("xet" in p for _, p in hub.requests)
    assert hub.requests[0] == ("GET", "/api/whoami-v2")


def test_include_compressed_revision_private_and_hidden_files(
    run_dir: Path, hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / ".README.md.123.tmp").write_text("half-written")
    (run / ".run.tmp-x").mkdir()
    (run / ".run.tmp-x" / "model.safetensors").write_bytes(b"junk")
    argv = ["push", str(run), "--repo-id", "tester/tiny-c", "--include-compressed", "--private"]
    assert main([*argv, "--revision", "exp", "--commit-message", "with kernels", "-q"]) == 0
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "exp"
    assert hub.commits[0]["summary"] == "with kernels" and hub.repos["tester/tiny-c"]["private"]
    got = hub.files("tester/tiny-c", "exp")
    assert got == _expected(run, include_compressed=True)
    assert any(p.startswith("compressed-2of4/") for p in got)
    assert not any(Path(p).name.startswith(".") or p.startswith(".") for p in got)
    assert hub.files("tester/tiny-c", "main") == {}
    # pushing again to an existing repo and branch is fine (exist_ok): a second commit
    assert main([*argv, "--revision", "exp", "-q"]) == 0
    assert len(hub.commits) == 2
    # a repo id without a namespace goes to the token's user
    capsys.readouterr()
    assert main(["push", str(run), "--repo-id", "solo", "-q"]) == 0
    assert f"repo         {hub.url}/tester/solo" in capsys.readouterr().out
    assert hub.files("tester/solo") == _expected(run)


def test_dry_run_lists_files_and_contacts_nobody(
    run_dir: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    capsys.readouterr()
    assert main(["push", str(run_dir), "--repo-id", "tester/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.requests == []
    expected = _expected(run_dir)
    for path, data in expected.items():
        assert re.search(rf"^\s+{len(data)}\s+{re.escape(path)}$", out, re.M), path
    assert f"total        {sum(len(d) for d in expected.values())} bytes" in out
    assert "compressed-2of4/ (--include-compressed" in out and "nothing uploaded" in out
    files, excluded = collect_files(run_dir, include_compressed=True)
    assert excluded == [] and any(f.path_in_repo.startswith("compressed-2of4/") for f in files)


def _corrupt_header(run: Path) -> None:
    data = bytearray((run / "model.safetensors").read_bytes())
    data[8:16] = b"NOTJSON!"
    (run / "model.safetensors").write_bytes(bytes(data))


def _index(run: Path, extra: dict[str, str]) -> None:
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="pt") as fh:
        weight_map = dict.fromkeys(fh.keys(), "model.safetensors")
    weight_map.update(extra)
    (run / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _card_sparsity(run: Path, value: str) -> None:
    text = (run / "README.md").read_text()
    (run / "README.md").write_text(re.sub(r"(\n  sparsity: )[0-9.]+\n", rf"\g<1>{value}\n", text, count=1))


def _densify_one_layer(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "model.safetensors")
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    tensors["model.layers.0.mlp.down_proj.weight"] = w.where(w != 0, 1e-3)
    save_file(tensors, run / "model.safetensors", metadata={"format": "pt"})


def _set_one_weight(run: Path, value: float, *, drop_hashes: bool = False) -> None:
    """Change one weight in place (the sparsity statistic barely moves); optionally as an old record."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "model.safetensors")
    w = tensors["model.layers.1.self_attn.q_proj.weight"]
    nonzero = int(w.flatten().ne(0).nonzero()[0])
    w.view(-1)[nonzero] = value
    save_file(tensors, run / "model.safetensors", metadata={"format": "pt"})
    if drop_hashes:
        record = json.loads((run / "oneshot.json").read_text())
        del record["files"]
        (run / "oneshot.json").write_text(json.dumps(record))


def _config_key(run: Path, key: str) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg[key] = {"quant_method": "compressed-tensors", "format": "sparse-24-bitmask"}
    (run / "config.json").write_text(json.dumps(cfg))


BAD_FOLDERS = {
    "no-run-file": (lambda r: (r / "oneshot.json").unlink(), "is not a run folder: oneshot.json is missing"),
    "quantization-config": (
        lambda r: _config_key(r, "quantization_config"),
        "config.json carries a quantization_config",
    ),
    "sparsity-config": (lambda r: _config_key(r, "sparsity_config"), "config.json carries a sparsity_config"),
    "tokenizer": (lambda r: (r / "tokenizer.json").write_text("{"), "the tokenizer does not load"),
    "header": (_corrupt_header, "model.safetensors: the safetensors header is unreadable"),
    "index-tensor": (
        lambda r: _index(r, {"model.layers.9.mlp.up_proj.weight": "model.safetensors"}),
        "maps the tensor model.layers.9.mlp.up_proj.weight to model.safetensors, which does not hold it",
    ),
    "index-shard": (
        lambda r: _index(r, {"lm_head.weight": "model-00002-of-00002.safetensors"}),
        "names the shard model-00002-of-00002.safetensors, which is missing",
    ),
    "card-sparsity": (
        lambda r: _card_sparsity(r, "0.49"),
        "README.md states sparsity 0.490000 but the 14 pruned",
    ),
    "weights-changed": (
        _densify_one_layer,
        "model.safetensors changed after oneshot wrote it (its sha256 differs",
    ),
    "weights-changed-old-record": (  # a record without hashes: the sparsity check still catches this one
        lambda r: (_densify_one_layer(r), _set_one_weight(r, 1.0, drop_hashes=True)),
        "states sparsity 0.500000 but the 14 pruned layers' weights have 0.44",
    ),
    "one-weight-zeroed": (
        lambda r: _set_one_weight(r, 0.0),
        "model.safetensors changed after oneshot wrote it",
    ),
    "one-weight-123": (
        lambda r: _set_one_weight(r, 123.0),
        "model.safetensors changed after oneshot wrote it",
    ),
    "one-weight-nan": (
        lambda r: _set_one_weight(r, float("nan")),
        "model.safetensors changed after oneshot wrote it",
    ),
    "nan-old-record": (
        lambda r: _set_one_weight(r, float("nan"), drop_hashes=True),
        "model.safetensors: tensor model.layers.1.self_attn.q_proj.weight holds NaN/Inf values",
    ),
    "recorded-file-missing": (
        lambda r: (r / "tokenizer_config.json").unlink(),
        "tokenizer_config.json is missing: oneshot.json records it",
    ),
    "no-card": (lambda r: (r / "README.md").unlink(), "README.md (the model card) is missing"),
    "eval-garbage": (lambda r: (r / "eval.json").write_text("garbage"), "eval.json is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_folder_uploads_nothing(
    case: str, run_dir: Path, hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, message = BAD_FOLDERS[case]
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    mutate(run)
    msg = _error(capsys, ["push", str(run), "--repo-id", "tester/bad", "-q"])
    assert message in msg, msg
    assert hub.requests == [] and hub.commits == [] and hub.lfs == {}
    msg = _error(
        capsys, ["push", str(run), "--repo-id", "tester/bad", "--dry-run"]
    )  # dry run checks the same
    assert message in msg


def test_sparsity_tolerance(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _card_sparsity(run, "0.50009")
    files, _ = collect_files(run)
    verified = verify_run_folder(run, files)
    assert verified.measured_sparsity == 0.5 and verified.stated_sparsity == 0.50009 and verified.layers == 14
    _card_sparsity(run, "0.50011")
    with pytest.raises(VerificationError, match=r"states sparsity 0\.500110"):
        verify_run_folder(run, files)


def test_a_503_on_the_commit_is_retried(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(fail_commits=1) as server:
        _online(monkeypatch, server.url)
        result = push(run_dir, "tester/retry", backoff=0.0)
        assert server.commit_attempts == 2 and len(server.commits) == 1
        assert (
            result.commit_oid == server.commits[0]["oid"] and result.repo_url == f"{server.url}/tester/retry"
        )
        assert server.files("tester/retry") == _expected(run_dir)
        lfs_files = sum(1 for m in server.commits[0]["modes"].values() if m == "lfs")
        assert server.lfs_puts == lfs_files  # the retry did not upload the LFS files again


def test_a_dropped_connection_is_retried(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(drop_commits=1) as server:
        _online(monkeypatch, server.url)
        result = push(run_dir, "tester/dropped", backoff=0.0)
        assert server.commit_attempts == 2 and len(server.commits) == 1 and result.commit_oid
        assert server.files("tester/dropped") == _expected(run_dir)


def test_503_every_time_gives_up(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(fail_commits=10) as server:
        _online(monkeypatch, server.url)
        with pytest.raises(
            PushError, match=r"could not commit to tester/giveup .* after 3 attempts: HTTP 503"
        ):
            push(run_dir, "tester/giveup", retries=2, backoff=0.0)
        assert server.commit_attempts == 3 and server.commits == []


def test_a_refused_token_is_one_clear_error(
    run_dir: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    msg = _error(capsys, ["push", str(run_dir), "--repo-id", "tester/x", "-q"])
    assert "refused the token" in msg and "HTTP 401" in msg and "nothing was committed" in msg
    assert hub.requests == [("GET", "/api/whoami-v2")] and hub.repos == {}


def test_no_token(
    run_dir: Path,
    hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    msg = _error(capsys, ["push", str(run_dir), "--repo-id", "tester/x", "-q"])
    assert "no Hugging Face token: set HF_TOKEN" in msg and hub.requests == []


def test_an_unreachable_hub_is_the_offline_error(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _online(monkeypatch, f"http://127.0.0.1:{port}")
    msg = _error(capsys, ["push", str(run_dir), "--repo-id", "tester/x", "-q"])
    assert f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}" in msg and "offline" in msg


def test_bad_arguments(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    msg = _error(capsys, ["push", str(tmp_path / "nope"), "--repo-id", "tester/x"])
    assert "does not exist" in msg
    msg = _error(capsys, ["push", str(run_dir), "--repo-id", "a/b/c"])
    assert "--repo-id 'a/b/c' is not a valid repo id" in msg
    msg = _error(capsys, ["push", str(run_dir), "--repo-id", "tester/x", "--commit-message", " "])
    assert "--commit-message must not be empty" in msg
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    msg = _error(capsys, ["push", str(run_dir), "--repo-id", "tester/x"])
    assert "HF_HUB_OFFLINE is set" in msg
