"""`oneshot.output`: the moves that put a finished run in place, including the paths without renameat2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import oneshot.output as output
from oneshot.errors import OutputError
from oneshot.output import MARKER_FILE, RUN_FILE, reserve_output


def _finish(slot: output.OutputSlot, text: str) -> None:
    assert slot.tmp is not None
    (slot.tmp / RUN_FILE).write_text(json.dumps({"format": "oneshot-run/1", "files": {"w.txt": {}}}))
    (slot.tmp / "w.txt").write_text(text)


def _earlier(out: Path) -> None:
    with reserve_output(out, overwrite=False) as slot:
        _finish(slot, "old")
        slot.commit()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "plain-rename"])
def test_overwrite_replaces_the_earlier_output_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    out = tmp_path / "run"
    _earlier(out)
    if not exchange:
        monkeypatch.setattr(output, "_renameat2", lambda *a: False)
    with reserve_output(out, overwrite=True) as slot:
        _finish(slot, "new")
        slot.commit()
    assert (out / "w.txt").read_text() == "new" and not (out / MARKER_FILE).exists()
    assert _hidden(tmp_path) == []


def test_a_failed_second_rename_puts_the_earlier_output_back_and_keeps_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _earlier(out)
    monkeypatch.setattr(output, "_renameat2", lambda *a: False)
    real_rename = os.rename
    calls: list[str] = []

    def flaky_rename(src: object, dst: object) -> None:
        calls.append(str(src))
        if len(calls) == 2:  # tmp -> out fails after out -> old succeeded
            raise OSError(28, "No space left on device", str(dst))
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", flaky_rename)
    slot = reserve_output(out, overwrite=True)
    try:
        _finish(slot, "new")
        with pytest.raises(OutputError, match="finished output is kept in") as err:
            slot.commit()
    finally:
        slot.release()
    monkeypatch.setattr(os, "rename", real_rename)
    assert (out / "w.txt").read_text() == "old"  # the earlier output is back in place
    kept = Path(str(err.value).rsplit(" ", 1)[-1])
    assert (kept / "w.txt").read_text() == "new" and json.loads((kept / MARKER_FILE).read_text())["kept"]
    # a later run on the same output reports the kept folder and leaves it alone
    with reserve_output(out, overwrite=True) as again:
        pass
    assert again.tmp is not None and not again.tmp.exists() and kept.is_dir()


def test_an_out_that_became_a_symlink_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    target = tmp_path / "elsewhere"
    target.mkdir()
    slot = reserve_output(out, overwrite=False)
    try:
        _finish(slot, "new")
        out.symlink_to(target)
        with pytest.raises(OutputError, match="symbolic link"):
            slot.commit()
    finally:
        slot.release()
    assert list(target.iterdir()) == [] and slot.tmp is not None and (slot.tmp / "w.txt").is_file()


def test_a_foreign_lock_file_is_neither_overwritten_nor_removed(tmp_path: Path) -> None:
    lock = tmp_path / ".run.lock"
    lock.write_text("my own file")
    with pytest.raises(OutputError, match="is not an oneshot lock"):
        reserve_output(tmp_path / "run", overwrite=False)
    assert lock.read_text() == "my own file"
    lock.unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("keep me")
    lock.symlink_to(secret)
    with pytest.raises(OutputError, match="symbolic link"):
        reserve_output(tmp_path / "run", overwrite=False)
    assert secret.read_text() == "keep me"


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path: Path) -> None:
    """kill -9 leaves the lock file (its flock is gone with the process): the next run takes it."""
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": 999999, "started": 0}))
    with reserve_output(tmp_path / "run", overwrite=False) as slot:
        _finish(slot, "x")
        slot.commit()
    assert (tmp_path / "run" / "w.txt").is_file() and _hidden(tmp_path) == []
