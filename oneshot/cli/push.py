"""`oneshot push RUN_DIR --repo-id NAME`: verify a run folder, then upload it in one commit."""

from __future__ import annotations

import argparse
from typing import Any

from oneshot.errors import Interrupted
from oneshot.hub import PushResult

__all__ = ["add_parser", "format_result", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
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
    if v.params is not None:
        check = f"card and record state {v.params:,} parameters = the checkpoint's"
    elif v.measured_sparsity is not None:
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


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.hub import push

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
    except KeyboardInterrupt as exc:
        raise Interrupted(
            "interrupted (a commit is all or nothing: the repo has all of this upload or none)"
        ) from exc
    print(format_result(result))
    return 0
