"""`oneshot push RUN_DIR --repo-id NAME`: verify a run folder, then upload it to the Hugging Face Hub.

Nothing is sent before the folder passes every check (`verify_run_folder`), each failure one message:

- ``oneshot.json`` is present and lists the pruned layers;
- ``config.json`` loads (``AutoConfig``) and carries no ``quantization_config`` / ``sparsity_config``
  (nor does any other uploaded config.json): the weights are plain dense float;
- the tokenizer loads (``AutoTokenizer``);
- every uploaded ``*.safetensors`` header is readable; with ``model.safetensors.index.json`` every shard it
  names exists and the tensors it lists are exactly the tensors those shards hold;
- every file ``oneshot prune`` wrote still has the content hash (sha256) and size recorded in
  ``oneshot.json`` at save time (``files``; records of older versions have none and say so), and every
  tensor of every uploaded safetensors file is finite: a changed, zeroed or NaN weight is caught;
- the sparsity the model card states (front matter ``oneshot.sparsity``, `oneshot.card`) matches the
  fraction of zeros measured in the ``<layer>.weight`` tensors of the pruned layers (and the slices of
  fused expert tensors) within 1e-4, and ``oneshot.block_sparsity`` the zeros of every weight matrix of the
  decoder blocks, whatever the names transformers saved them under.

Then, through `huggingface_hub.HfApi` (endpoint ``$HF_ENDPOINT``, token ``$HF_TOKEN`` or the login cache):
``whoami`` (the token, and whether the Hub is reachable at all), ``create_repo(exist_ok=True)``,
``create_branch`` for ``--revision``, and ONE ``create_commit`` holding every file. Files: the whole
folder except hidden files and ``compressed-*/`` (those only with ``--include-compressed``).

Transient failures (HTTP 429/5xx, a dropped connection or a timeout once the Hub has answered) are
retried with exponential backoff. An unreachable Hub on the first request (connection refused, DNS
failure) and a refused token (401/403) are one error each, with nothing uploaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from oneshot.card import CARD_FILE, CARD_KEY
from oneshot.errors import OneshotError
from oneshot.run import FORBIDDEN_CONFIG_KEYS, RUN_FILE

__all__ = [
    "SPARSITY_TOLERANCE",
    "PushError",
    "PushResult",
    "UploadFile",
    "Verified",
    "add_push_parser",
    "collect_files",
    "format_result",
    "push",
    "run_push",
    "verify_run_folder",
]

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SPARSITY_TOLERANCE = 1e-4
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


class PushError(OneshotError, RuntimeError):
    """The folder may not be uploaded, or the upload failed; the message (one line) says why."""


@dataclass(frozen=True)
class UploadFile:
    path: Path  # on disk
    path_in_repo: str  # POSIX path relative to the run folder
    size: int  # bytes


@dataclass(frozen=True)
class Verified:
    """What `verify_run_folder` checked."""

    stated_sparsity: float  # the card's front matter
    measured_sparsity: float | None  # zeros / weights of the pruned layers' tensors; None: not by name
    layers: int  # pruned layers measured
    safetensors_files: int  # headers read
    block_sparsity: float | None = None  # the card's, checked against every weight matrix of the blocks


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


# --------------------------------------------------------------------------------------------------------
# Files and verification


def collect_files(run_dir: Path, include_compressed: bool = False) -> tuple[list[UploadFile], list[str]]:
    """The files to upload (sorted by path) and the ``compressed-*`` folders left out.

    Hidden files and folders (temporary files of an interrupted write among them) are never uploaded;
    symbolic links and other non-regular files neither.
    """
    files: list[UploadFile] = []
    excluded: list[str] = []
    for root, dirs, names in os.walk(run_dir):
        rel_root = Path(root).relative_to(run_dir)
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            if rel_root == Path(".") and d.startswith(COMPRESSED_PREFIX) and not include_compressed:
                excluded.append(d)
                continue
            keep.append(d)
        dirs[:] = keep
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            files.append(UploadFile(path, (rel_root / name).as_posix(), path.stat().st_size))
    files.sort(key=lambda f: f.path_in_repo)
    return files, excluded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PushError(f"{what} is not readable JSON ({_first_line(exc)})") from exc


def _pruned_layers(run_dir: Path) -> list[str]:
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise PushError(
            f"{run_dir} is not a run folder: {RUN_FILE} is missing (`oneshot push` uploads folders written "
            "by `oneshot prune`)"
        )
    record = _read_json(run_file, RUN_FILE)
    layers = ((record or {}).get("prune") or {}).get("layers") if isinstance(record, dict) else None
    names = [x.get("name") for x in layers or [] if isinstance(x, dict)]
    if not names or not all(isinstance(n, str) for n in names):
        raise PushError(f"{RUN_FILE} lists no pruned layers (prune.layers): not an `oneshot prune` record")
    return [str(n) for n in names]


def _check_configs(run_dir: Path, files: list[UploadFile]) -> None:
    if not (run_dir / "config.json").is_file():
        raise PushError("config.json is missing: the folder holds no transformers checkpoint")
    for f in files:
        if f.path.name != "config.json":
            continue
        data = _read_json(f.path, f.path_in_repo)
        found = [k for k in FORBIDDEN_CONFIG_KEYS if isinstance(data, dict) and k in data]
        if found:
            raise PushError(
                f"{f.path_in_repo} carries a {found[0]}: the weights are plain dense float and loaders would "
                "treat them as quantized/compressed; remove the key (oneshot prune never writes it)"
            )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(run_dir))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PushError(
            f"config.json does not load with transformers' AutoConfig ({_first_line(exc)})"
        ) from exc
    for key in FORBIDDEN_CONFIG_KEYS:
        if getattr(config, key, None) is not None:
            raise PushError(f"the loaded config carries a {key}: the weights are plain dense float")


def _check_tokenizer(run_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(run_dir))
    except Exception as exc:  # tokenizers raise many types (OSError, ValueError, Rust panics' Exception)
        raise PushError(
            f"the tokenizer does not load with transformers' AutoTokenizer ({_first_line(exc)})"
        ) from exc


def _safetensors_keys(files: list[UploadFile]) -> dict[str, set[str]]:
    """Tensor names of every uploaded .safetensors file (path_in_repo -> names); a bad header is an error."""
    from safetensors import safe_open

    out: dict[str, set[str]] = {}
    for f in files:
        if not f.path_in_repo.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(f.path), framework="pt") as fh:
                out[f.path_in_repo] = set(fh.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError) on bad headers
            raise PushError(
                f"{f.path_in_repo}: the safetensors header is unreadable ({_first_line(exc)})"
            ) from exc
    return out


def _weight_locations(run_dir: Path, keys: dict[str, set[str]]) -> dict[str, str]:
    """Tensor name -> shard file of the main checkpoint, after checking the index against the shards."""
    index = run_dir / INDEX_FILE
    if index.is_file():
        data = _read_json(index, INDEX_FILE)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise PushError(f"{INDEX_FILE} has no weight_map of tensor name -> shard file")
        for shard in sorted(set(weight_map.values())):
            if shard not in keys:
                raise PushError(f"{INDEX_FILE} names the shard {shard}, which is missing")
        for name, shard in weight_map.items():
            if name not in keys[shard]:
                raise PushError(f"{INDEX_FILE} maps the tensor {name} to {shard}, which does not hold it")
        held = set().union(*(keys[s] for s in set(weight_map.values())))
        unlisted = sorted(held - set(weight_map))
        if unlisted:
            raise PushError(
                f"the shards hold {len(unlisted)} tensor(s) that {INDEX_FILE} does not list (e.g. {unlisted[0]})"
            )
        return {str(k): v for k, v in weight_map.items()}
    if "model.safetensors" in keys:
        return dict.fromkeys(keys["model.safetensors"], "model.safetensors")
    raise PushError(f"no weights: model.safetensors (or {INDEX_FILE} and its shards) is missing")


def _check_contents(run_dir: Path, files: list[UploadFile], keys: dict[str, set[str]]) -> int:
    """Recorded content hashes match, every tensor is finite; returns the number of files hashed."""
    import hashlib

    from safetensors import safe_open

    record = _read_json(run_dir / RUN_FILE, RUN_FILE)
    recorded = record.get("files") if isinstance(record, dict) else None
    if not isinstance(recorded, dict):
        logger.warning(
            "%s has no content hashes (written by an older oneshot): file contents are not verified", RUN_FILE
        )
        recorded = {}
    for rel, facts in sorted(recorded.items()):
        path = run_dir / rel
        if not path.is_file():
            raise PushError(f"{rel} is missing: {RUN_FILE} records it as part of the run")
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        if path.stat().st_size != facts.get("bytes") or digest.hexdigest() != facts.get("sha256"):
            raise PushError(
                f"{rel} changed after oneshot wrote it (its sha256 differs from the one in {RUN_FILE}): "
                "the upload would not be the pruned model the record and card describe"
            )
    for rel, names in keys.items():
        with safe_open(str(run_dir / rel), framework="pt") as fh:
            for name in sorted(names):
                tensor = fh.get_tensor(name)
                if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                    raise PushError(f"{rel}: tensor {name} holds NaN/Inf values")
    return len(recorded)


def _stated_sparsity(run_dir: Path, key: str = "sparsity") -> float | None:
    """The card's ``oneshot.<key>``; ``sparsity`` must be there, ``block_sparsity`` is None on old cards."""
    from huggingface_hub import ModelCard

    path = run_dir / CARD_FILE
    if not path.is_file():
        raise PushError(f"{CARD_FILE} (the model card) is missing: write it with `oneshot card {run_dir}`")
    try:
        card = ModelCard.load(path)
    except (ValueError, OSError) as exc:
        raise PushError(f"{CARD_FILE}: the card's metadata does not parse ({_first_line(exc)})") from exc
    facts = card.data.to_dict().get(CARD_KEY)
    value = facts.get(key) if isinstance(facts, dict) else None
    if key != "sparsity" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PushError(
            f"{CARD_FILE} states no sparsity (front matter {CARD_KEY}.sparsity): rewrite it with "
            f"`oneshot card {run_dir}`"
        )
    return float(value)


def _measured_block_sparsity(run_dir: Path, layers: list[str], where: dict[str, str]) -> tuple[float, int]:
    """Zeros / weights over every weight matrix (>= 2-D tensor, biases excluded) of the decoder blocks in
    the files, whatever their names on disk (transformers may save fused experts in another layout)."""
    from safetensors import safe_open

    prefix = re.match(r"^(.*?\.)\d+\.", layers[0])
    if prefix is None:
        raise PushError(f"cannot tell the decoder blocks from the layer name {layers[0]!r} in {RUN_FILE}")
    in_blocks = re.compile(re.escape(prefix.group(1)) + r"\d+\.")
    zeros = total = count = 0
    for name, shard in sorted(where.items()):
        if not in_blocks.match(name) or name.endswith("bias"):
            continue
        with safe_open(str(run_dir / shard), framework="pt") as fh:
            if len(fh.get_slice(name).get_shape()) < 2:
                continue
            weight = fh.get_tensor(name)
        zeros += int((weight == 0).sum())
        total += weight.numel()
        count += 1
    return (zeros / total if total else 0.0), count


def _measured_sparsity(run_dir: Path, layers: list[str], where: dict[str, str]) -> float | None:
    """Zeros / weights of the pruned layers' tensors; None when the files name them differently (fused
    experts saved by transformers in a per-expert layout): then only the block sparsity is checked."""
    from safetensors import safe_open

    by_shard: dict[str, list[tuple[str, int | None]]] = {}
    for layer in layers:
        # a Linear's "<name>.weight", or one expert "<experts>.<param>[e]" of a fused 3-D tensor
        expert = re.fullmatch(r"(.+)\[(\d+)\]", layer)
        tensor, index = (expert.group(1), int(expert.group(2))) if expert else (f"{layer}.weight", None)
        if tensor not in where and expert is not None:
            return None
        if tensor not in where:
            raise PushError(
                f"the pruned layer {layer} of {RUN_FILE} has no tensor {tensor} in the checkpoint"
            )
        by_shard.setdefault(where[tensor], []).append((tensor, index))
    zeros = total = 0
    for shard, names in by_shard.items():
        with safe_open(str(run_dir / shard), framework="pt") as fh:
            for name, index in names:
                weight = fh.get_slice(name)[index] if index is not None else fh.get_tensor(name)
                zeros += int((weight == 0).sum())
                total += weight.numel()
    return zeros / total if total else 0.0


def verify_run_folder(run_dir: Path, files: list[UploadFile]) -> Verified:
    """Every check of the module docstring, in order; raises `PushError` at the first failure."""
    layers = _pruned_layers(run_dir)
    _check_configs(run_dir, files)
    _check_tokenizer(run_dir)
    keys = _safetensors_keys(files)
    where = _weight_locations(run_dir, keys)
    _check_contents(run_dir, files, keys)
    stated = _stated_sparsity(run_dir)
    assert stated is not None
    measured = _measured_sparsity(run_dir, layers, where)
    if measured is not None and abs(stated - measured) > SPARSITY_TOLERANCE:
        raise PushError(
            f"{CARD_FILE} states sparsity {stated:.6f} but the {len(layers)} pruned layers' weights have "
            f"{measured:.6f} zeros (tolerance {SPARSITY_TOLERANCE:g}): the card does not describe these weights"
        )
    stated_block = _stated_sparsity(run_dir, "block_sparsity")
    if stated_block is None and measured is None:
        raise PushError(
            f"{CARD_FILE} states no block_sparsity and the pruned layers are stored under other names: "
            f"rewrite the card with `oneshot card {run_dir}`"
        )
    if stated_block is not None:
        block, matrices = _measured_block_sparsity(run_dir, layers, where)
        if abs(stated_block - block) > SPARSITY_TOLERANCE:
            raise PushError(
                f"{CARD_FILE} states block sparsity {stated_block:.6f} but the {matrices} weight matrices of "
                f"the decoder blocks have {block:.6f} zeros (tolerance {SPARSITY_TOLERANCE:g}): the card "
                "does not describe these weights"
            )
    return Verified(stated, measured, len(layers), len(keys), stated_block)


# --------------------------------------------------------------------------------------------------------
# Upload


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
            return "notoken", _first_line(e)
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            detail = f"HTTP {status}: {_first_line(e)}"
            if status in (401, 403):
                return "auth", detail
            return ("transient" if status in TRANSIENT_STATUS else "http"), detail
        if isinstance(e, ConnectionRefusedError | socket.gaierror) or names & _UNREACHABLE:
            return "unreachable", _first_line(e)
        if isinstance(e, ConnectionError | TimeoutError) or names & _TRANSPORT:
            return "transient", _first_line(e)
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
    record = _read_json(run_dir / RUN_FILE, RUN_FILE)
    cfg = record.get("config") or {}
    sparsity = (record.get("prune") or {}).get("sparsity")
    text = f"Upload {cfg.get('method')} {cfg.get('pattern')} pruned model"
    return text + (f" (sparsity {sparsity:.4f})" if isinstance(sparsity, float) else "") + " with oneshot"


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
        raise PushError(f"--repo-id {repo_id!r} is not a valid repo id: {_first_line(exc)}") from exc
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


# --------------------------------------------------------------------------------------------------------
# Command line


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``push`` sub-command to an argparse ``add_subparsers()`` object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "push",
        help="verify a run folder and upload it to the Hugging Face Hub in one commit",
        description=(
            "Verify a run folder (config, tokenizer, safetensors headers and index, the card's sparsity against "
            "the weights), then upload it in one commit. Token: $HF_TOKEN or `hf auth login`; endpoint: "
            "$HF_ENDPOINT."
        ),
    )
    p.add_argument("run_dir", help="folder written by `oneshot prune`")
    p.add_argument("--repo-id", required=True, help="Hub repo, e.g. USER/NAME (created when missing)")
    p.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo is kept)"
    )
    p.add_argument(
        "--revision", default=None, help="branch to commit to (created when missing; default main)"
    )
    p.add_argument("--commit-message", default=None, help="summary line of the commit")
    p.add_argument(
        "--include-compressed", action="store_true", help="also upload the compressed-*/ folders of --export"
    )
    p.add_argument("--dry-run", action="store_true", help="verify and list the files; upload nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_result(result: PushResult) -> str:
    """The lines `oneshot push` prints: files (dry run) or where the commit went."""
    v = result.verified
    if v.measured_sparsity is not None:
        check = f"card sparsity {v.stated_sparsity:.6f} = measured {v.measured_sparsity:.6f} over {v.layers} pruned layers"
    else:  # fused experts saved under per-expert names: only the whole-block figure can be measured
        check = f"card sparsity {v.stated_sparsity:.6f} (pruned layers not stored under their names: not measured)"
    if v.block_sparsity is not None:
        check += f", block sparsity {v.block_sparsity:.6f} = measured"
    lines = [f"verified     config, tokenizer, {v.safetensors_files} safetensors file(s), {check}"]
    if result.excluded:
        lines.append(
            f"left out     {', '.join(d + '/' for d in result.excluded)} (--include-compressed uploads it)"
        )
    if result.commit_oid is None:
        width = len(str(max((f.size for f in result.files), default=0)))
        lines.append(
            f"would upload {len(result.files)} files to {result.repo_id} (revision {result.revision}):"
        )
        lines += [f"  {f.size:>{width}}  {f.path_in_repo}" for f in result.files]
        lines.append(f"total        {result.total_bytes} bytes ({_human(result.total_bytes)})")
        lines.append("dry run      nothing uploaded, no network used")
        return "\n".join(lines)
    lines += [
        f"uploaded     {len(result.files)} files, {_human(result.total_bytes)}, in one commit",
        f"repo         {result.repo_url}",
        f"revision     {result.revision}",
        f"commit       {result.commit_oid}",
    ]
    if result.commit_url:
        lines.append(f"commit url   {result.commit_url}")
    return "\n".join(lines)


def run_push(args: argparse.Namespace) -> int:
    """Run ``oneshot push``; 0 on success, 2 with one line on stderr on any failure, 130 when interrupted."""
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        result = push(
            args.run_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            include_compressed=args.include_compressed,
            dry_run=args.dry_run,
        )
    except PushError as exc:
        print(f"oneshot: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "oneshot: interrupted (a commit is all or nothing: the repo has all of this upload or none)",
            file=sys.stderr,
        )
        return 130
    print(format_result(result))
    return 0
