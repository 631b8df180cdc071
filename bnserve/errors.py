"""The error types every stage raises for problems a user can fix.

Each CLI maps them to an exit code through `exit_code`, the service maps them to an HTTP status
through `http_status`; nothing else catches them. A message says what was wrong and what was expected.
"""

from __future__ import annotations


class BnserveError(Exception):
    """A problem the user can fix; never shown with a traceback."""

    exit_code = 1
    http_status = 500


class DataError(BnserveError):
    """Unreadable or invalid training / scoring data."""

    exit_code = 2
    http_status = 400


class CheckpointError(BnserveError):
    """A checkpoint that is missing, corrupt, truncated or of a newer format version."""

    exit_code = 2
    http_status = 500


class ModelError(BnserveError):
    """An ONNX model that cannot be converted, folded or served."""

    exit_code = 2
    http_status = 500


class UsageError(BnserveError):
    """Bad command-line options (e.g. an output path that is a directory)."""

    exit_code = 2
    http_status = 400


class ParityError(BnserveError):
    """The exported or folded model does not give the same answers as the reference."""

    exit_code = 3
    http_status = 500


class MissingExtraError(BnserveError):
    """A command needs an optional dependency group that is not installed."""

    exit_code = 2


def require_extra(module: str, extra: str, command: str) -> None:
    """Import `module` or fail with the pip command that installs the extra providing it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"'bnserve {command}' needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'bnserve[{extra}]'"
        ) from exc


def comment_line_hint(**lines: list[str]) -> str:
    """ "; the header starts with '#' ...": the likely cause of a CSV error when one of `lines`
    (named by their role: header=..., row=...) is a comment line, which CSV does not have."""
    for role, cells in lines.items():
        if cells and cells[0].lstrip().startswith("#"):
            return (
                f"; the {role} starts with '#': CSV has no comment lines, so remove such lines "
                "(or make the real header the first line)"
            )
    return ""
