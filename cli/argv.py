"""Multi-value options in the shell's natural form, before Typer parses the command line.

``--tasks seg depth`` is rewritten to ``--tasks seg --tasks depth`` (click options take one
value per occurrence), so the three forms of `--tasks` reach the command as one list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

INTEGER = re.compile(r"^-?\d+$")

GREEDY_OPTIONS: dict[str, Callable[[str], bool]] = {
    "--tasks": lambda token: not token.startswith("-"),
    "-t": lambda token: not token.startswith("-"),
    "--stages": lambda token: not token.startswith("-"),
    "--input-size": lambda token: bool(INTEGER.match(token)),
}


def expand_multi_values(args: Sequence[str]) -> list[str]:
    """Repeat a greedy option before each further value that follows its first one."""
    out: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        out.append(token)
        index += 1
        if token == "--":
            out.extend(args[index:])
            break
        option = token.split("=", 1)[0]
        accepts = GREEDY_OPTIONS.get(option)
        if accepts is None:
            continue
        if "=" not in token and index < len(args):
            out.append(args[index])
            index += 1
        while index < len(args) and accepts(args[index]):
            out.extend([option, args[index]])
            index += 1
    return out


def split_commas(values: Sequence[str]) -> list[str]:
    """``["seg,depth", "normals"]`` -> ``["seg", "depth", "normals"]``; empty items dropped."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]
