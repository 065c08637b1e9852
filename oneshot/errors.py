"""The one error base of the package and the CLI's translation of everything else into one clear line.

Every user-facing error derives from `OneshotError` and carries the process exit code (2: bad input or an
environment problem the user can fix). `Interrupted` is a Ctrl-C that knows what is on disk.
`describe` turns the few non-oneshot exceptions a user can cause (a permission problem, a corrupt
safetensors file, out of memory) into a message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["Interrupted", "OneshotError", "OutputError", "describe", "first_line"]


class OneshotError(Exception):
    """A user-facing error: the CLI prints ``oneshot: error: <message>`` and exits with ``exit_code``."""

    exit_code = 2


class OutputError(OneshotError):
    """The output folder cannot be used (exists, protected, not writable, taken by another run)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message that says exactly what is on disk."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str | None:
    """One line for an exception the user can cause and fix, or None for a bug (keep the traceback)."""
    if isinstance(exc, OneshotError):
        return " ".join(str(exc).split())
    if isinstance(exc, PermissionError):
        where = exc.filename or "a file or folder"
        return f"permission denied: {where} ({exc.strerror or 'not allowed'})"
    if type(exc).__name__ == "SafetensorError":  # safetensors' own error type (not an OSError)
        if "No space left" in str(exc):
            return f"no space left on the device while writing safetensors ({first_line(exc)})"
        return f"a safetensors file is corrupt or truncated: {first_line(exc)}"
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()[:200]:
        return (
            "out of memory: lower --batch-size, --nsamples or --seqlen, use --device cpu, or free memory "
            f"held by other processes ({first_line(exc)})"
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or first_line(exc)}{where}"
    return None
