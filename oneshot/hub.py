"""Uploading a verified run folder to the Hugging Face Hub in ONE commit, with retries.

Through `huggingface_hub.HfApi` (endpoint ``$HF_ENDPOINT``, token ``$HF_TOKEN`` or the login cache):
``whoami`` (the token, and whether the Hub is reachable at all), ``create_repo(exist_ok=True)``,
``create_branch`` for ``--revision``, and one ``create_commit`` holding every file. Files: the whole
folder except hidden files and ``compressed-*/`` (those only with ``include_compressed``).

Transient failures (HTTP 429/5xx, a dropped connection or a timeout once the Hub has answered) are
retried with exponential backoff. An unreachable Hub on the first request (connection refused, DNS
failure) and a refused token (401/403) are one error each, with nothing uploaded.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from oneshot.errors import OneshotError, first_line
from oneshot.runfolder import RunRecord
from oneshot.verify import UploadFile, Verified, collect_files, verify_run_folder

__all__ = ["PushError", "PushResult", "push"]

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = (429, 500, 502, 503, 504)
COMPRESSED_PREFIX = "compressed-"

# huggingface_hub has used requests, httpx and httpx2 as its HTTP client: transport errors are recognised
# by class name so the classification does not depend on which one is installed.
_UNREACHABLE = {
    "ConnectError",
    "ConnectTimeout",
    "NewConnectionError",
    "NameResolutionError",
    "OfflineModeIsEnabled",
}
_TRANSPORT = {"TransportError", "TimeoutException", "RequestException", "ProtocolError"}

T = TypeVar("T")


class PushError(OneshotError):
    """The upload could not be done; the message (one line) says why."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    files: list[UploadFile]
    verified: Verified
    excluded: list[str]  # top-level compressed-* folders left out
    repo_url: str | None = None  # None for a dry run
    commit_oid: str | None = None
    commit_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _classify(exc: BaseException) -> tuple[str, str] | None:
    """(kind, detail) of a failed Hub call; kind: notoken, auth, unreachable, transient, http, other.

    None for exceptions that are not about the Hub or the network (programming errors propagate).
    """
    chain = _chain(exc)
    for e in chain:
        names = {c.__name__ for c in type(e).__mro__}
        if "LocalTokenNotFoundError" in names:
            return "notoken", first_line(e)
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            detail = f"HTTP {status}: {first_line(e)}"
            if status in (401, 403):
                return "auth", detail
            return ("transient" if status in TRANSIENT_STATUS else "http"), detail
        if isinstance(e, ConnectionRefusedError | socket.gaierror) or names & _UNREACHABLE:
            return "unreachable", first_line(e)
        if isinstance(e, ConnectionError | TimeoutError) or names & _TRANSPORT:
            return "transient", first_line(e)
    for e in chain:
        if isinstance(e, ValueError | OSError):  # e.g. the Hub rejecting the card's metadata
            text = " ".join(str(e).split())
            return "other", (text[:300] + "...") if len(text) > 300 else text or type(e).__name__
    return None


@dataclass
class _Hub:
    """Calls to the Hub with retries; the first call that gets an answer marks the Hub as reachable."""

    endpoint: str
    retries: int
    backoff: float
    reached: bool = False

    def call(self, what: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                result = fn()
            except Exception as exc:
                found = _classify(exc)
                if found is None:
                    raise
                kind, detail = found
                if kind == "notoken":
                    raise PushError(
                        "no Hugging Face token: set HF_TOKEN or run `hf auth login` (--dry-run needs none)"
                    ) from exc
                if kind == "auth":
                    raise PushError(
                        f"the Hub at {self.endpoint} refused the token while trying to {what} ({detail}): use a "
                        "token with write access (HF_TOKEN or `hf auth login`); nothing was committed"
                    ) from exc
                if kind == "unreachable" and not self.reached:
                    raise PushError(
                        f"cannot reach the Hugging Face Hub at {self.endpoint} ({detail}): this machine looks "
                        "offline (or HF_ENDPOINT is wrong); nothing was uploaded (--dry-run verifies offline)"
                    ) from exc
                self.reached = self.reached or kind in ("transient", "http", "other")
                if kind in ("transient", "unreachable") and attempt < self.retries:
                    wait = self.backoff * 2**attempt
                    attempt += 1
                    logger.warning(
                        "%s failed (%s); retry %d of %d in %.1f s", what, detail, attempt, self.retries, wait
                    )
                    time.sleep(wait)
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise PushError(f"could not {what} on {self.endpoint}{tries}: {detail}") from exc
            self.reached = True
            return result


def _commit_message(run_dir: Path) -> str:
    record = RunRecord.load(run_dir)
    q = record.quantization
    quant = f", quantized {q.config.scheme}" if q is not None else ""
    if record.kind == "quantize":
        assert q is not None
        return f"Upload {q.label} quantized model with oneshot"
    if record.kind == "shrink":
        _, rep = record.shrunk
        return f"Upload shrunk model ({rep.params_after:,} of {rep.params_before:,} parameters{quant}) with oneshot"
    cfg, pr = record.pruned
    return f"Upload {cfg.method} {cfg.pattern} pruned model (sparsity {pr.sparsity:.4f}{quant}) with oneshot"


def push(
    run_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    include_compressed: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    retries: int = 4,
    backoff: float = 2.0,
) -> PushResult:
    """Verify ``run_dir`` and upload it to the Hub repo ``repo_id`` in one commit (see the module docstring).

    ``endpoint``: default ``$HF_ENDPOINT`` (else huggingface.co); ``token``: default ``$HF_TOKEN`` or the
    login cache. ``dry_run`` verifies and returns the file list without any network access. Transient
    failures are retried ``retries`` times, waiting ``backoff * 2**i`` seconds.
    """
    from huggingface_hub.utils import validate_repo_id

    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise PushError(f"run folder {run_dir} does not exist")
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise PushError(f"--repo-id {repo_id!r} is not a valid repo id: {first_line(exc)}") from exc
    if revision is not None and not revision.strip():
        raise PushError("--revision must name a branch")
    if commit_message is not None and not commit_message.strip():
        raise PushError("--commit-message must not be empty")
    files, excluded = collect_files(folder, include_compressed)
    verified = verify_run_folder(folder, files)
    branch = revision or "main"
    if dry_run:
        return PushResult(repo_id, branch, files, verified, excluded)

    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: unset it to push (--dry-run verifies offline)")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
    hub = _Hub(api.endpoint, retries, backoff)
    hub.call("check the token", api.whoami)
    url = hub.call(
        f"create the repo {repo_id}",
        lambda: api.create_repo(repo_id, private=True if private else None, exist_ok=True),
    )
    full_id = url.repo_id or repo_id
    if branch != "main":
        hub.call(
            f"create the branch {branch}", lambda: api.create_branch(full_id, branch=branch, exist_ok=True)
        )
    operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.path)) for f in files]
    message = commit_message or _commit_message(folder)
    # a failed attempt leaves the operations uncommitted; LFS files already uploaded are not sent again
    info = hub.call(
        f"commit to {full_id}",
        lambda: api.create_commit(full_id, operations, commit_message=message, revision=branch),
    )
    return PushResult(full_id, branch, files, verified, excluded, str(url), info.oid, info.commit_url)
