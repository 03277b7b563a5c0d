"""Hostile files for the archive checks: pickles that call a function, rewritten zips, a zip bomb.

The pickles are written opcode by opcode, so each test knows exactly which opcodes it exercises.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path


def _text(value: str) -> bytes:
    """A protocol 2+ string push: BINUNICODE."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _args(args: tuple[str, ...], protocol: int) -> bytes:
    if protocol == 0:
        return b"(" + b"".join(b"V" + a.encode() + b"\n" for a in args) + b"t"
    return b"(" + b"".join(_text(a) for a in args) + b"t"


def call_pickle(module: str, name: str, *args: str, protocol: int = 2) -> bytes:
    """A pickle that calls ``module.name(*args)`` when loaded: GLOBAL below protocol 4, else
    STACK_GLOBAL with memoised names in a frame, as Python's own pickler writes them."""
    call = _args(args, protocol) + b"R."
    if protocol == 0:
        return b"c" + f"{module}\n{name}\n".encode() + call
    if protocol < 4:
        return bytes([0x80, protocol]) + b"c" + f"{module}\n{name}\n".encode() + call
    body = b"\x8c" + bytes([len(module)]) + module.encode() + b"\x94"
    body += b"\x8c" + bytes([len(name)]) + name.encode() + b"\x94" + b"\x93" + call
    return b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body


def inst_pickle(module: str, name: str, *args: str) -> bytes:
    """A protocol 0 pickle that calls ``module.name(*args)`` through the INST opcode."""
    return _args(args, 0)[:-1] + b"i" + f"{module}\n{name}\n".encode() + b"."


def popped_names_pickle(module: str, name: str, *args: str) -> bytes:
    """STACK_GLOBAL on ``module.name`` after harmless names were pushed and popped again, which
    fools a scanner that takes the last two strings pushed."""
    names = _text(module) + _text(name) + _text("torch") + _text("Size") + b"00"
    return b"\x80\x04" + names + b"\x93" + _args(args, 4) + b"R."


def memo_names_pickle(module: str, name: str, *args: str) -> bytes:
    """STACK_GLOBAL on ``module.name`` whose strings come back from the memo (BINPUT, BINGET)."""
    names = _text(module) + b"q\x00" + _text(name) + b"q\x01" + b"00" + b"h\x00h\x01"
    return b"\x80\x04" + names + b"\x93" + _args(args, 4) + b"R."


def rezip(data: bytes, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> bytes:
    """``data``, a zip, with the named members replaced (each must exist) and others added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        missing = set(replace) - set(src.namelist())
        if missing:
            raise KeyError(f"no members {sorted(missing)} in the archive")
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info)))
        for name, member in (add or {}).items():
            dst.writestr(name, member)
    return out.getvalue()


def member_named(data: bytes, suffix: str) -> str:
    """The one member of the zip ``data`` whose name ends with ``suffix``."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(suffix)]
    return name


def zip_bomb(path: Path, expanded: int, name: str = "archive/data/0") -> None:
    """Write a zip whose one deflated member really inflates to ``expanded`` zero bytes.

    Deflate compresses at most about 1000:1, so the file is ``expanded / 1000`` bytes; it is
    built from one repeated block instead of compressing gigabytes. The CRC is left at zero:
    no reader gets that far.
    """
    chunk = 2**20
    if expanded % chunk or expanded >= 2**32:
        raise ValueError("expanded must be a whole number of MiB below 4 GiB")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = first + block * (expanded // chunk - 1) + compressor.flush()
    encoded = name.encode()
    sizes = struct.pack("<III", 0, len(stream), expanded)  # crc, compressed, uncompressed
    local = b"PK\x03\x04" + struct.pack("<HHHHH", 20, 0, 8, 0, 0) + sizes
    local += struct.pack("<HH", len(encoded), 0) + encoded
    central = b"PK\x01\x02" + struct.pack("<HHHHHH", 20, 20, 0, 8, 0, 0) + sizes
    central += struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0, 0) + encoded
    end = b"PK\x05\x06" + struct.pack(
        "<HHHHIIH", 0, 0, 1, 1, len(central), len(local) + len(stream), 0
    )
    path.write_bytes(local + stream + central + end)


def hostile_sample_inputs(pt2: bytes) -> bytes:
    """The sample inputs, a nested torch.save archive, with a hostile data.pkl."""
    name = member_named(pt2, "data/sample_inputs/model.pt")
    inputs = rezip(
        pt2_member(pt2, name),
        {"archive/data.pkl": call_pickle("builtins", "open", "MARKER_sample_inputs", "w")},
    )
    return rezip(pt2, {name: inputs})


def hostile_pickled_weight(pt2: bytes) -> bytes:
    """A weight marked use_pickle in the config, its bytes a protocol 0 pickle."""
    config_name = member_named(pt2, "data/weights/model_weights_config.json")
    config = json.loads(pt2_member(pt2, config_name))
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    weight = member_named(pt2, f"data/weights/{entry['path_name']}")
    payload = call_pickle("builtins", "open", "MARKER_weight", "w", protocol=0)
    return rezip(pt2, {config_name: json.dumps(config).encode(), weight: payload})


def hostile_opaque_constant(pt2: bytes) -> bytes:
    """An opaque object among the constants: a protocol 0 pickle under a plain name, posing as
    a raw tensor in the config, which torch.export.load unpickles because of its name."""
    weights = json.loads(pt2_member(pt2, member_named(pt2, "model_weights_config.json")))
    config_name = member_named(pt2, "data/constants/model_constants_config.json")
    config = json.loads(pt2_member(pt2, config_name))
    config["config"]["extra"] = {
        **next(iter(weights["config"].values())),
        "path_name": "opaque_obj_0",
        "use_pickle": False,
    }
    payload = call_pickle("builtins", "open", "MARKER_opaque", "w", protocol=0)
    payload += bytes(-len(payload) % 8)  # whole elements, as a raw tensor must have
    root = config_name.split("/")[0]
    return rezip(
        pt2,
        {config_name: json.dumps(config).encode()},
        {f"{root}/data/constants/opaque_obj_0": payload},
    )


def hostile_expression(pt2: bytes) -> bytes:
    """A shape expression, which torch.export.load gives to sympy.sympify, that opens a file."""
    name = member_named(pt2, "models/model.json")
    program = pt2_member(pt2, name)
    code = b"__import__('builtins').open('MARKER_expression', 'w') and Symbol("
    assert b'"expr_str": "Symbol(' in program
    return rezip(pt2, {name: program.replace(b'"expr_str": "Symbol(', b'"expr_str": "' + code, 1)})


def pt2_member(pt2: bytes, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(pt2)) as archive:
        return archive.read(name)
