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
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
        ],
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


def test_a_checkout_on_sys_path_leaves_the_name_kernels_to_the_installed_package() -> None:
    """Run from the repository root (python -m, pytest's rootdir), kernels/ is importable as the top-level
    `kernels`, the name of Hugging Face's package that transformers >= 5.25 imports from every model module.
    It must hand the name over, or importing a transformers model from a checkout fails."""
    code = (
        "import importlib.metadata as md, kernels, oneshot.kernels as ours\n"
        "try:\n"
        "    md.version('kernels')\n"
        "    installed = True\n"
        "except md.PackageNotFoundError:\n"
        "    installed = False\n"
        "assert ours.convert is not None\n"
        "assert kernels is not ours and not hasattr(kernels, 'SparseLinear'), kernels.__file__\n"
        "if installed:\n"
        "    assert 'site-packages' in kernels.__file__, kernels.__file__\n"
        "import transformers.models.llama.modeling_llama\n"
        "print('ok', installed)\n"
    )
    for cwd in (REPO, REPO / "oneshot"):  # oneshot/ holds the link oneshot/kernels -> ../kernels
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, (cwd, out.stderr[-3000:])
        assert out.stdout.startswith("ok")


# --------------------------------------------------------------------------------------------------------
# Layers: core <- jobs <- publishing <- CLI, every import pointing down (README, "How it works")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # the foundation: errors, the two configs, the run-folder contract, formatting (no torch, no models)
    (
        "base",
        ("oneshot.errors", "oneshot.config", "oneshot.runfolder", "oneshot.output", "oneshot.formatting"),
    ),
    # the core: models, data, the walker and solvers, the kernels and the evaluation primitives
    (
        "core",
        (
            "oneshot.models",
            "oneshot.data",
            "oneshot.walker",
            "oneshot.stats",
            "oneshot.solvers",
            "oneshot.exporters",
            "oneshot.moe",
            "oneshot.pruner",
            "oneshot.resume",
            "oneshot.streaming",
            "oneshot.distributed",
            "oneshot.checks",
            "oneshot.sensitivity",
            "oneshot.allocation",
            "oneshot.structured",
            "oneshot.shrink",
            "oneshot.recover",
            "oneshot.patterns",
            "oneshot.kernels",
            "oneshot.eval.perplexity",
            "oneshot.eval.corpora",
            "oneshot.eval.tasks",
            "oneshot.eval.slices",
            "oneshot.eval.frequency",
            "oneshot.eval.token_stats",
            "oneshot.eval.flags",
            "oneshot.eval.task_compare",
            "oneshot.eval.longtail",
        ),
    ),
    # jobs: the runs that read models and write run folders
    ("jobs", ("oneshot.jobs", "oneshot.eval.evaluate", "oneshot.eval.targets", "oneshot.eval.cache")),
    # publishing: what turns records into cards, reports and Hub uploads
    (
        "publishing",
        (
            "oneshot.card",
            "oneshot.verify",
            "oneshot.hub",
            "oneshot.eval.report",
            "oneshot.eval.report_model",
            "oneshot.eval.plots",
            "oneshot.eval.render",
        ),
    ),
    ("cli", ("oneshot.cli", "oneshot.__main__")),
]


def _layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer index): the longest prefix wins
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _modules() -> dict[str, Path]:
    """Every module of the package (oneshot/eval and oneshot/kernels are links to eval/ and kernels/)."""
    out: dict[str, Path] = {}
    root = REPO / "oneshot"
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = ["oneshot", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    """Every oneshot module imported anywhere in the file (function-local imports included)."""
    import ast

    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from oneshot import kernels`
    return {m for m in found if m == "oneshot" or m.startswith("oneshot.")}


def test_every_import_points_down_the_layers() -> None:
    modules = _modules()
    unplaced = sorted(m for m in modules if m != "oneshot" and _layer_of(m) is None)
    assert not unplaced, f"modules without a layer in tests/test_layout.py: {unplaced}"
    upward = []
    for module, path in modules.items():
        if module == "oneshot":  # the package's lazy re-exports of the public API
            continue
        mine = _layer_of(module)
        assert mine is not None
        for target in _imports(module, path):
            theirs = _layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_function_local_imports(tmp_path: Path) -> None:
    """The check must catch an upward import hidden inside a function."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from oneshot.card import write_card\n    from .pruner import prune\n")
    assert {"oneshot.card", "oneshot.card.write_card", "oneshot.pruner"} <= _imports("oneshot.models", path)
    assert _layer_of("oneshot.card") > _layer_of("oneshot.models")  # type: ignore[operator]
