"""The package's shape: import names that cannot collide, and layers that only point down."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_claims_only_the_oneshot_import_name(tmp_path: Path) -> None:
    """kernels/ and eval/ ship as oneshot.kernels and oneshot.eval: installing Hugging Face's PyPI package
    `kernels` (which transformers uses) beside oneshot must not overwrite a top-level `kernels`."""
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("oneshot", "eval", "kernels"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("oneshot-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"oneshot"}, top
    assert "oneshot/eval/perplexity.py" in names and "oneshot/kernels/formats.py" in names
    (top_level,) = [n for n in names if n.endswith("top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["oneshot"]
