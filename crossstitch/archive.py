"""Refuse torch zip archives that would run code or exhaust memory when torch opens them.

``torch.save`` checkpoints, TorchScript files and ``torch.export`` pt2 files are zip archives.
``check_archive`` reads the zip directory, disassembles the pickles with ``pickletools`` and
parses the program JSON, so nothing from the file runs and nothing large is unpacked.
"""

from __future__ import annotations

import io
import json
import pickletools
import posixpath
import re
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from crossstitch.errors import CrossStitchError, first_line

MIB = 2**20
#: The largest pickle, nested archive or program JSON read into memory to be checked.
MAX_CHECKED_BYTES = 64 * MIB
#: How much a compressed member may grow; torch itself stores members uncompressed.
MAX_EXPANSION = 100
#: Archives inside archives; pt2 files hold ``torch.save`` payloads one level down.
MAX_NESTING = 3

#: What ``torch.save`` writes for tensors, parameters and plain containers: a small part of what
#: ``torch.load(weights_only=True)`` accepts, named as strings so no private API is touched.
TENSOR_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.Size",
        "torch.device",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        *(
            f"torch.{name}"
            for name, value in vars(torch).items()
            if isinstance(value, torch.dtype)
            or (isinstance(value, type) and name.endswith("Storage"))
        ),
    }
)
#: TorchScript pickles also name the archive's compiled classes and torch's list helpers. torch
#: reads them with its C++ unpickler, which cannot import Python code, and ``torch.load`` hands
#: any archive holding a ``constants.pkl`` to that reader, so only such archives get these names.
TORCHSCRIPT_PREFIXES = ("__torch__.", "torch.jit._pickle.")

_ZIP_MAGIC = b"PK\x03\x04"
_PROTO_HEADS = frozenset(bytes([0x80, protocol]) for protocol in range(2, 6))
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    zlib.error,
    NotImplementedError,  # an unsupported compression method
    RuntimeError,  # an encrypted member
)
_STRING_PUSHES = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_STACK_NEUTRAL = frozenset({"PROTO", "FRAME"})

# What ``sympy.srepr`` writes for shape expressions: calls of sympy classes, keyword arguments,
# numbers, quoted names and numbers, and a few constants.
_EXPRESSION_ATOMS = frozenset({"True", "False", "None", "oo", "zoo", "nan", "true", "false"})
_LOWERCASE_CALLS = frozenset({"floor", "ceiling"})
_EXPRESSION_OPS = frozenset({"(", ")", ",", "=", "-"})
_QUOTED = re.compile(r"'(?:[A-Za-z][A-Za-z0-9_]*|[-+]?[0-9][0-9.]*(?:e[-+]?[0-9]+)?)'")


@dataclass(frozen=True)
class _Where:
    """The file being checked and the chain of members leading to the current archive."""

    what: str
    path: Path
    trail: tuple[str, ...] = ()

    def refuse(self, text: str) -> CrossStitchError:
        return CrossStitchError(f"{self.what} {self.path} {text}")

    def member(self, name: str) -> str:
        return " inside ".join((name, *reversed(self.trail)))

    def inside(self, name: str) -> _Where:
        return _Where(self.what, self.path, (*self.trail, name))


def member_names(path: Path, what: str) -> list[str]:
    """The names of ``path``'s members, read from its zip directory after the directory checks
    of ``check_archive`` (names, declared sizes); no member is read.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except _ZIP_ERRORS as exc:
        raise CrossStitchError(
            f"{what} {path} is not a readable zip archive ({first_line(exc, 200)})"
        ) from exc
    _check_directory(infos, path.stat().st_size, _Where(what, path))
    return [info.filename for info in infos]


def check_archive(path: Path, what: str) -> None:
    """Raise ``CrossStitchError`` unless torch can open ``path`` without running code from it.

    Refused: files that are not zip archives; member names that are absolute, hold ``..`` or
    repeat; declared sizes far beyond the file's own (zip bombs); pickles importing anything
    outside ``TENSOR_GLOBALS`` (``TORCHSCRIPT_PREFIXES`` too in TorchScript archives); the pt2
    members ``torch.export.load`` unpickles without restriction or loads as native code; and
    pt2 shape expressions that are not plain ``sympy.srepr`` output, as torch evaluates them.
    Nested archives get the same checks. ``what`` names the kind of file in messages.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            _check(archive, path.stat().st_size, _Where(what, path), 0)
    except _ZIP_ERRORS as exc:
        raise CrossStitchError(
            f"{what} {path} is not a readable zip archive ({first_line(exc, 200)})"
        ) from exc


def load_tensors(path: Path, what: str) -> object:
    """A ``torch.save`` file's contents, read as data only: the archive checked, then
    ``torch.load(weights_only=True)``. A refusal never passes on torch's advice to load the
    file unrestricted.
    """
    check_archive(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = first_line(exc, 200)
        if "weights_only" in str(exc) or "Weights only" in reason:
            reason = "it holds objects other than tensors and plain containers"
        raise CrossStitchError(f"{path} is not a readable {what} ({reason})") from exc


def _check(archive: zipfile.ZipFile, size: int, where: _Where, depth: int) -> None:
    """Check one archive of ``size`` bytes: its directory first, then its members one by one."""
    infos = archive.infolist()
    _check_directory(infos, size, where)
    torchscript = any(_record(info.filename) == "constants.pkl" for info in infos)
    unpickled = _unpickled_by_export(archive, infos, where)
    for info in infos:
        name, record = info.filename, _record(info.filename)
        if info.is_dir():
            continue
        if "/data/aotinductor/" in f"/{name}":
            raise where.refuse(
                f"holds compiled code ({where.member(name)}) that torch.export.load would load "
                "and run; it was refused without loading it"
            )
        with archive.open(info) as member:
            head = member.read(4)
        if head == _ZIP_MAGIC:
            if depth == MAX_NESTING:
                raise where.refuse(f"nests archives more than {MAX_NESTING} deep; it was refused")
            data = _read(archive, info, where)
            with zipfile.ZipFile(io.BytesIO(data)) as nested:
                _check(nested, len(data), where.inside(name), depth + 1)
        elif name.endswith("pkl") or record in unpickled or head[:2] in _PROTO_HEADS:
            found = _refused_global(_read(archive, info, where), torchscript)
            if found is not None:
                raise where.refuse(
                    f"holds Python objects other than tensors: its member {where.member(name)} "
                    f"would import {found}; it was refused without running anything"
                )
        elif name.endswith(".json") and (
            "/models/" in f"/{name}" or record == "serialized_exported_program.json"
        ):
            _check_expressions(_load_json(archive, info, where), name, where)


def _record(name: str) -> str:
    """A member's name as torch's reader sees it: without the archive's top folder."""
    return name.split("/", 1)[-1]


def _check_directory(infos: list[zipfile.ZipInfo], size: int, where: _Where) -> None:
    """Refuse unsafe names and expanding members from the zip directory alone, reading no data."""
    seen: set[str] = set()
    for info in infos:
        parts = info.filename.replace("\\", "/").split("/")
        if parts[0] == "" or ":" in parts[0] or ".." in parts:
            raise where.refuse(
                f"has a member named {info.filename!r} that points outside the archive; "
                "it was refused without unpacking it"
            )
        if info.filename in seen:
            raise where.refuse(
                f"has two members named {info.filename!r}; it was refused without unpacking it"
            )
        seen.add(info.filename)
        expansion = info.file_size / max(info.compress_size, 1)
        if info.file_size > MIB and expansion > MAX_EXPANSION:
            raise where.refuse(
                f"looks like a zip bomb: its member {where.member(info.filename)} would expand "
                f"{expansion:,.0f} times, to {info.file_size / MIB:,.0f} MiB; "
                "it was refused without unpacking it"
            )
    total = sum(info.file_size for info in infos)
    if total > 2 * size + MIB:
        raise where.refuse(
            f"looks like a zip bomb: it declares {total / MIB:,.0f} MiB of contents in "
            f"{size / MIB:,.1f} MiB; it was refused without unpacking it"
        )


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: _Where) -> bytes:
    """A member's bytes, refused before reading if it is too large to check."""
    if info.file_size > MAX_CHECKED_BYTES:
        raise where.refuse(
            f"has a member {where.member(info.filename)} of {info.file_size / MIB:,.0f} MiB, "
            f"more than the {MAX_CHECKED_BYTES // MIB} MiB that can be checked; "
            "it was refused without reading it"
        )
    return archive.read(info)


def _load_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: _Where) -> object:
    """A JSON member, parsed; refused if too large or not JSON."""
    try:
        return json.loads(_read(archive, info, where))
    except (ValueError, RecursionError) as exc:
        raise where.refuse(f"has a member {where.member(info.filename)} that is not JSON") from exc


def _unpickled_by_export(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], where: _Where
) -> set[str]:
    """The records ``torch.export.load`` may unpickle with Python's pickle or torch's.

    That is every ``.pt`` payload (sample inputs, legacy weights and constants), opaque and custom
    objects among the constants, and the tensors the weight and constant configs mark
    ``use_pickle``: those can be any bytes, so the name alone does not show they are pickles.
    """
    records = [_record(info.filename) for info in infos]
    unpickled = {
        record
        for record in records
        if record.endswith(".pt")
        or posixpath.basename(record).startswith(("opaque_obj_", "custom_obj_"))
    }
    for record, info in zip(records, infos, strict=True):
        folder = "/".join(record.split("/")[:2]) + "/"
        if folder not in ("data/weights/", "data/constants/") or not record.endswith(
            "_config.json"
        ):
            continue
        config = _load_json(archive, info, where)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise where.refuse(f"has a member {where.member(info.filename)} that is not a config")
        unpickled |= {
            folder + str(entry.get("path_name"))
            for entry in entries.values()
            if entry.get("use_pickle")
        }
    return unpickled


def _refused_global(data: bytes, torchscript: bool) -> str | None:
    """The first global the pickles in ``data`` would import outside the allowlist, if any.

    Scans pickle after pickle, as torch's legacy format holds several in a row, and stops at bytes
    that are not pickle opcodes, where an unpickler stops too. ``STACK_GLOBAL`` takes its names
    from the stack, so string pushes and the memo are followed; anything less plain is refused.
    ``OBJ``, ``REDUCE`` and ``NEWOBJ`` only call what these globals brought in.
    """
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        memo: dict[int, str | None] = {}
        top: list[str | None] = []  # the top of the stack while it is known: None is not a str
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                op = opcode.name
                if op in _STRING_PUSHES:
                    top = [*top[-1:], arg]
                elif op in _MEMO_GETS:
                    top = [*top[-1:], memo.get(arg)]
                elif op in _MEMO_PUTS:
                    memo[len(memo) if arg is None else arg] = top[-1] if top else None
                elif op not in _STACK_NEUTRAL:
                    found = _imported(op, arg, top)
                    if found is not None and not (
                        found in TENSOR_GLOBALS
                        or (torchscript and found.startswith(TORCHSCRIPT_PREFIXES))
                    ):
                        return found
                    top = []
        except ValueError:
            return None
    return None


def _imported(op: str, arg: object, top: list[str | None]) -> str | None:
    """What an opcode imports, as ``module.name``, or None if it imports nothing."""
    if op in ("GLOBAL", "INST"):
        return str(arg).replace(" ", ".", 1)
    if op == "STACK_GLOBAL":
        if len(top) == 2 and isinstance(top[0], str) and isinstance(top[1], str):
            return f"{top[0]}.{top[1]}"
        return "a name computed while unpickling"
    if op.startswith("EXT"):
        return f"entry {arg} of the copyreg extension registry"
    return None


def _check_expressions(program: object, name: str, where: _Where) -> None:
    """Refuse a program whose shape expressions are more than ``sympy.srepr`` output.

    ``torch.export.load`` gives every ``expr_str`` to ``sympy.sympify``, which runs it with
    ``eval``; only calls of capitalised sympy classes with numbers and plain names pass.
    """
    for text in _expressions(program):
        if not _plain_expression(text):
            raise where.refuse(
                f"holds a shape expression that is not plain arithmetic ({str(text)[:80]!r} in "
                f"{where.member(name)}); torch would run it as Python code, so it was refused "
                "without running anything"
            )


def _expressions(value: object) -> Iterator[object]:
    """Every ``expr_str`` value in parsed JSON, walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "expr_str" in item:
                yield item["expr_str"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _plain_expression(text: object) -> bool:
    """Whether ``text`` has only the tokens ``sympy.srepr`` writes for shape expressions."""
    if not isinstance(text, str):
        return False
    try:
        tokens = [
            token
            for token in tokenize.generate_tokens(io.StringIO(text).readline)
            if token.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
        ]
    except (tokenize.TokenError, SyntaxError):
        return False
    following = [token.string for token in tokens[1:]] + [""]
    for token, after in zip(tokens, following, strict=True):
        word = token.string
        if token.type == tokenize.NAME:
            call = (
                after == "(" and word.isascii() and (word[0].isupper() or word in _LOWERCASE_CALLS)
            )
            plain = call or after == "=" or word in _EXPRESSION_ATOMS
        elif token.type == tokenize.STRING:
            plain = _QUOTED.fullmatch(word) is not None
        else:
            plain = token.type == tokenize.NUMBER or (
                token.type == tokenize.OP and word in _EXPRESSION_OPS
            )
        if not plain:
            return False
    return True
