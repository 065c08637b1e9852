"""Taking an output folder safely: checked, locked and test-written before any work, replaced atomically.

`reserve_output(out, overwrite=..., protected=...)` runs before the model is loaded:

- ``out`` must not be a symbolic link, nor be or contain a protected path (the model source, the data
  directory), nor be the current directory or one of its parents;
- an existing non-empty ``out`` is refused unless ``overwrite``, and even then it is replaced only when it
  is an earlier oneshot output (it holds our record, ``oneshot.json``) holding nothing but what that run
  wrote (its record lists its files) and what `oneshot eval` / `oneshot card` add;
- the output is taken exclusively: a lock file ``.<name>.lock`` beside it, held with ``flock`` for the whole
  run (the kernel releases it when the process dies), so a second run on the same ``out`` fails at once;
- leftovers of dead runs on the same ``out`` (temporary folders named and marked by us, for this very
  ``out``, whose process is gone) are reported and removed; look-alikes are only reported;
- the temporary folder ``.<name>.tmp-<pid>-<token>`` is created and test-written at once, so an unwritable
  destination fails in a second, not after the compute.

`OutputSlot.commit()` moves the finished temporary folder into place without ever replacing something that
appeared meanwhile (``renameat2`` with ``RENAME_NOREPLACE``; an earlier output is swapped in one step with
``RENAME_EXCHANGE``). If the move fails, the finished folder is kept and the error names it.
`OutputSlot.release()` removes whatever the run created and did not commit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneshot.errors import OutputError
from oneshot.runfolder import RUN_FILE

__all__ = [
    "MARKER_FILE",
    "RESUME_DIR",
    "RESUME_STATE",
    "OutputSlot",
    "Replaceable",
    "is_oneshot_output",
    "replaceable_run",
    "reserve_output",
]

logger = logging.getLogger(__name__)

MARKER_FILE = ".oneshot-partial"  # inside a temporary output folder until it is committed
# A temporary folder holding a block checkpoint (`oneshot.resume`: RESUME_DIR/RESUME_STATE) is resumable: it
# survives its run's death and errors (not removed by `release` nor by the next run), and the next run on
# the same output either adopts it (``resume=True``) or refuses to start, saying how to resume it.
RESUME_DIR = ".resume"
RESUME_STATE = "state.json"
# Whether an existing, non-empty folder may be replaced by --overwrite: None, or why not (the message goes
# after "--out X ...").
Replaceable = Callable[[Path], "str | None"]


def _read_record(folder: Path) -> dict[str, Any] | None:  # raw: any schema version counts
    try:
        data = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_oneshot_output(folder: Path) -> bool:
    """Whether ``folder`` holds our record: an ``oneshot.json`` whose ``format`` is ``oneshot-run/...``."""
    record = _read_record(folder)
    return record is not None and str(record.get("format", "")).startswith("oneshot-run/")


# What a run folder of a version without content hashes may hold (the files save_pretrained, the tokenizer
# and oneshot write), as fnmatch patterns of relative paths.
_KNOWN_RUN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "compressed-*/*",
)
# protected folders an output may not even be written into (a run folder may hold its own report/)
_NO_NESTING = ("model source", "data directory")
_REPORT_FILES = ("report/report.md", "report/report.json", "report/report.html", "report/plots/*.png")


def _foreign_entries(folder: Path) -> list[str]:
    """Files inside an earlier output that oneshot did not write (hidden ones and nested ones included):
    not listed in its record's content hashes (or, for records without them, not of a known name), and not
    the card, eval.json, record or report added later."""
    import fnmatch

    record = _read_record(folder) or {}
    files = record.get("files")
    listed = set(files) if isinstance(files, dict) else None
    derived = ("README.md", "eval.json", RUN_FILE, *_REPORT_FILES)
    foreign = []
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatchcase(rel, p) for p in derived):
            continue
        known = (
            rel in listed
            if listed is not None
            else any(fnmatch.fnmatchcase(rel, p) for p in _KNOWN_RUN_FILES)
        )
        if not known:
            foreign.append(rel)
    return foreign


def replaceable_run(folder: Path) -> str | None:
    """The rule for run folders: an earlier oneshot output holding nothing its record does not list."""
    if not is_oneshot_output(folder):
        return (
            f"is not an earlier oneshot output (no {RUN_FILE} record): --overwrite only replaces folders "
            "oneshot wrote; choose another folder"
        )
    foreign = _foreign_entries(folder)
    if foreign:
        return (
            f"is an earlier oneshot output but also holds {', '.join(foreign[:5])}, which that run did not "
            "write: move them away or choose another folder"
        )
    return None


def _is_within(path: Path, parent: Path) -> bool:
    """``path`` equals ``parent`` or lies inside it (both resolved)."""
    return path == parent or parent in path.parents


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --- atomic renames (Linux renameat2; plain rename elsewhere) ---------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename with flags; False when the platform or file system does not support them."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    res = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError when ``dst`` exists (never replaces it)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _write_marker(folder: Path, **facts: Any) -> None:
    (folder / MARKER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), **facts}))


# --- the slot ------------------------------------------------------------------------------------------


@dataclass
class OutputSlot:
    """An output folder taken by this process: its lock, its temporary folder, and what was created."""

    out: Path  # absolute final folder
    overwrite: bool
    lock_path: Path
    replaceable: Replaceable = replaceable_run
    tmp: Path | None = None  # temporary folder beside it; the job writes here
    _lock_fd: int | None = None
    _created: list[Path] = field(default_factory=list)  # parent folders this run created (outermost first)
    committed: bool = False

    def commit(self) -> None:
        """Move the finished temporary folder to ``out`` (replacing an earlier oneshot output only).

        Any failure keeps the finished folder where it is and raises `OutputError` naming it.
        """
        if self.committed or self.tmp is None:
            return
        try:
            self._move_into_place(self.tmp)
        except OutputError:
            raise
        except OSError as exc:
            self._keep_tmp(f"could not move the finished output to --out {self.out} ({exc.strerror or exc})")

    def _move_into_place(self, tmp: Path) -> None:
        out = self.out
        if os.path.islink(out):
            self._keep_tmp(f"--out {out} became a symbolic link while this run was working")
        if out.is_dir() and any(out.iterdir()):
            if not self.overwrite or self.replaceable(out) is not None:
                self._keep_tmp(f"--out {out} was filled by another program while this run was working")
            (tmp / MARKER_FILE).unlink()
            if _renameat2(tmp, out, _RENAME_EXCHANGE):  # tmp now holds the earlier output
                self.committed = True
                _write_marker(tmp, out=str(out), replaced=True)  # if killed below, the next run removes it
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)  # put the earlier output back
                raise
            self.committed = True
            _write_marker(old, out=str(out), replaced=True)
            shutil.rmtree(old, ignore_errors=True)
            return
        (tmp / MARKER_FILE).unlink()
        if out.is_dir():
            out.rmdir()  # empty: nothing to lose
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            self._keep_tmp(f"--out {out} appeared while this run was working")
        self.committed = True

    def _keep_tmp(self, why: str) -> None:
        """Leave the finished folder where it is (marked as kept, so no later run removes it) and raise."""
        self.committed = True  # release() must not remove it
        assert self.tmp is not None
        with contextlib.suppress(OSError):
            _write_marker(self.tmp, out=str(self.out), kept=True)
        raise OutputError(f"{why}: nothing was replaced; the finished output is kept in {self.tmp}")

    @property
    def resumable(self) -> bool:
        """Whether the temporary folder holds a block checkpoint (then it is kept when the run fails)."""
        return not self.committed and self.tmp is not None and _resume_progress(self.tmp) is not None

    def forget_checkpoint(self) -> None:
        """The run failed for good (an error, not an interruption): `release` then removes the temporary
        folder even though it held a block checkpoint."""
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp / RESUME_DIR, ignore_errors=True)

    def release(self) -> None:
        """Remove the temporary folder (unless committed or resumable), unlock, remove the parent folders
        this run created (when still empty)."""
        if not self.committed and self.tmp is not None and not self.resumable:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.lock_path, follow_symlinks=False).st_ino == os.fstat(self._lock_fd).st_ino:
                    self.lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.committed:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when still empty

    def state(self) -> str:
        """What is on disk now, for an interruption message."""
        if self.committed:
            return f"the output {self.out} is complete"
        if self.resumable:
            assert self.tmp is not None
            return (
                f"nothing was written to {self.out}; the completed blocks ({_resume_progress(self.tmp)}) are "
                f"kept in {self.tmp}: run the same command with --resume to continue"
            )
        return f"nothing was written to {self.out} (the temporary folder is removed)"

    def __enter__(self) -> OutputSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_target(
    out: Path, overwrite: bool, protected: Iterable[tuple[str, Path]], replaceable: Replaceable
) -> None:
    if os.path.islink(out):
        raise OutputError(f"--out {out} is a symbolic link: give the folder it points to, or a new folder")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, real):
        what = "the current directory" if real == cwd else "a parent of the current directory"
        raise OutputError(f"--out {out} is {what}: choose a new folder for the output")
    for what, path in protected:
        path = path.resolve()
        if _is_within(path, real):
            rel = "is" if path == real else "contains"
            raise OutputError(f"--out {out} {rel} the {what} ({path}): choose another folder")
        if what in _NO_NESTING and path.is_dir() and _is_within(real, path):
            raise OutputError(f"--out {out} is inside the {what} ({path}): choose a folder outside it")
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        try:
            empty = not any(out.iterdir())
        except OSError as exc:
            raise OutputError(f"--out {out} cannot be read ({exc.strerror})") from exc
        if empty:
            return
        if not overwrite:
            raise OutputError(
                f"--out {out} exists and is not empty: pass --overwrite to replace an earlier oneshot "
                "output, or choose another folder"
            )
        why = replaceable(out)
        if why is not None:
            raise OutputError(f"--out {out} {why}")


def _make_parents(parent: Path, out: Path) -> list[Path]:
    """Create ``parent`` and missing ancestors; return the folders created (outermost first)."""
    missing: list[Path] = []
    probe = parent
    while not probe.exists():
        if os.path.lexists(probe):
            raise OutputError(f"--out {out}: {probe} is a broken link")
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"--out {out}: {probe} is a file, not a folder")
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        except OSError as exc:
            for done in reversed(created):
                with contextlib.suppress(OSError):
                    done.rmdir()
            raise OutputError(f"cannot create --out {out}: {exc.strerror} ({folder})") from exc
        created.append(folder)
    return created


def _lock(lock_path: Path, out: Path) -> int:
    """Take the exclusive lock of ``out``; OutputError at once when another live run holds it."""
    import fcntl

    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{lock_path} is a symbolic link, not an oneshot lock: remove it") from exc
            raise OutputError(
                f"cannot write beside --out {out}: {exc.strerror} ({lock_path.parent})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(
                f"another oneshot run{holder} is writing --out {out}: wait for it to finish or choose "
                "another folder"
            ) from None
        # the previous holder may have removed the file between our open and flock: retry on the new one
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    content = os.pread(fd, 4096, 0)
    if content and "pid" not in _parse_json(content):
        os.close(fd)
        raise OutputError(
            f"{lock_path} exists and is not an oneshot lock: move it away or choose another --out"
        )
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "out": str(out)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _parse_json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _read_holder(fd: int) -> str:
    info = _parse_json(os.pread(fd, 4096, 0))
    try:
        started = time.strftime("%H:%M:%S", time.localtime(float(info["started"])))
        return f" (pid {int(info['pid'])}, started {started})"
    except (KeyError, TypeError, ValueError):
        return ""


def _resume_progress(folder: Path) -> str | None:
    """ "k of n blocks done" when ``folder`` holds a block checkpoint, else None."""
    try:
        state = _parse_json((folder / RESUME_DIR / RESUME_STATE).read_bytes())
    except OSError:
        return None
    if "next_block" not in state:
        return None
    return f"{state.get('next_block')} of {state.get('blocks')} blocks done"


def _clean_leftovers(out: Path) -> list[Path]:
    """Report and remove the temporary folders of dead runs on the same output; return those that hold a
    block checkpoint (resumable: kept), newest first.

    Only called while we hold the output's lock. A folder is removed only when its name has our exact form
    for this ``out``, its marker names this ``out``, and the process that made it is gone (same host).
    """
    resumable: list[Path] = []
    ours = re.compile(rf"^\.{re.escape(out.name)}\.tmp-\d+-[0-9a-f]{{8}}$")
    for entry in sorted(out.parent.iterdir()):
        if not entry.name.startswith(f".{out.name}.tmp-") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            marker = _parse_json((entry / MARKER_FILE).read_bytes())
        except OSError:
            marker = {}
        pid = marker.get("pid")
        if not ours.match(entry.name) or marker.get("out") != str(out) or not isinstance(pid, int):
            logger.warning(
                "found %s, which looks like the unfinished output of an interrupted oneshot run but carries "
                "no marker for this output; it is left alone: delete it by hand",
                entry,
            )
            continue
        if marker.get("kept"):
            logger.warning("%s holds a finished output that could not be moved into place; left alone", entry)
            continue
        if marker.get("host") == socket.gethostname() and pid != os.getpid() and _pid_alive(pid):
            logger.warning("%s belongs to a running process (pid %d); left alone", entry, pid)
            continue
        if not marker.get("replaced") and _resume_progress(entry) is not None:
            resumable.append(entry)
            continue
        what = "an earlier output being replaced" if marker.get("replaced") else "the unfinished output"
        logger.warning("removing %s: %s of an interrupted run (pid %d, no longer running)", entry, what, pid)
        shutil.rmtree(entry, ignore_errors=True)
    return sorted(resumable, key=lambda p: (p / RESUME_DIR / RESUME_STATE).stat().st_mtime, reverse=True)


def reserve_output(
    out: str | os.PathLike[str],
    *,
    overwrite: bool,
    protected: Iterable[tuple[str, Path]] = (),
    replaceable: Replaceable = replaceable_run,
    resume: bool = False,
) -> OutputSlot:
    """Check, lock and test-write ``out`` before any work; see the module docstring.

    A resumable temporary folder of a dead run on ``out`` (it holds a block checkpoint) is adopted as this
    run's temporary folder with ``resume``; without ``resume`` its presence is an `OutputError` saying how
    to resume it, and ``resume`` without one is an `OutputError` too.

    ``protected``: (description, path) pairs that ``out`` must neither be nor contain (the model source,
    the data directory). ``replaceable``: the rule for replacing an existing folder with ``overwrite`` (run
    folders by default; reports pass their own). Raises `OutputError` with one clear line; leaves nothing
    behind on failure.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    if out.name in ("", ".", ".."):
        raise OutputError(f"--out {out} is not a folder name")
    protected = list(protected)
    _check_target(out, overwrite, protected, replaceable)
    parent = out.parent
    created = _make_parents(parent, out)
    slot = OutputSlot(
        out=out,
        overwrite=overwrite,
        lock_path=parent / f".{out.name}.lock",
        replaceable=replaceable,
        _created=created,
    )
    try:
        slot._lock_fd = _lock(slot.lock_path, out)
        _check_target(out, overwrite, protected, replaceable)  # again, now that no other run can change it
        resumable = _clean_leftovers(out)
        if resumable and not resume:
            raise OutputError(
                f"an interrupted run on --out {out} exists ({_resume_progress(resumable[0])}, in "
                f"{resumable[0]}): run the same command with --resume to continue it, or remove that folder "
                "to start over"
            )
        if resume and not resumable:
            raise OutputError(f"--resume: there is no interrupted run on --out {out} to resume")
        if resumable:
            for other in resumable[1:]:
                logger.warning("another interrupted run on --out %s is left alone: %s", out, other)
            slot.tmp = resumable[0]
            _write_marker(slot.tmp, out=str(out))  # ours now: a concurrent run sees a live process
            logger.info("resuming the interrupted run in %s (%s)", slot.tmp, _resume_progress(slot.tmp))
            return slot
        tmp = parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            slot.tmp = tmp
            _write_marker(tmp, out=str(out))
        except OSError as exc:
            raise OutputError(f"cannot write --out {out}: {exc.strerror} ({parent})") from exc
    except BaseException:
        slot.release()
        raise
    return slot
