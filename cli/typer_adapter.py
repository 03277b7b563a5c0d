"""The one place that knows how Typer reports usage errors it does not print itself.

With ``standalone_mode=False`` Typer raises its usage errors (an unknown option, a missing
argument, a value that does not convert) as exceptions of its vendored Click, whose classes it
does not export. They share an interface: ``format_message()`` and an integer ``exit_code``,
with the failing command's context in ``ctx``. ``tests/test_cli.py`` checks this interface, so
an upgrade that changes it fails there, loudly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UsageProblem:
    """A usage error as the CLI prints it: the message, a hint line, the exit code."""

    message: str
    hint: str | None
    exit_code: int


def usage_error(exc: BaseException) -> UsageProblem | None:
    """The usage error ``exc`` stands for, or None when it is some other failure.

    Where the value of an option failed to convert, the message quotes that value.
    """
    format_message = getattr(exc, "format_message", None)
    exit_code = getattr(exc, "exit_code", None)
    if not callable(format_message) or not isinstance(exit_code, int):
        return None
    message = " ".join(format_message().split())
    errors = getattr(exc.__cause__, "errors", None)
    inputs = [e["input"] for e in errors() if "input" in e] if callable(errors) else []
    if inputs:
        message = f"{message.rstrip('.')} (got {inputs[0]!r})"
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    hint = f"Try '{path} --help' for help." if path else None
    return UsageProblem(message, hint, exit_code)
