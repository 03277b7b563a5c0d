"""The one exception type that carries a message meant for the person at the keyboard."""

from __future__ import annotations

import re

# Characters that would move the cursor, recolour the terminal or set its title if printed.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class CrossStitchError(ValueError):
    """Bad input or a refused file: the message says what was wrong and what would be accepted.

    ``param`` names the Python parameter (or config field) at fault, when there is one; the
    message then starts with it (``output_stride: ...``), so the CLI can put its own option name
    in its place. Library callers can catch it as a ``ValueError``.
    """

    def __init__(self, detail: str, *, param: str | None = None) -> None:
        super().__init__(f"{param}: {detail}" if param else detail)
        self.param = param
        self.detail = detail


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line, shortened, for one-line reports of a library failure.

    Control characters are escaped: exception texts can quote bytes read from a file.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    text = CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
