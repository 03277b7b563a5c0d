"""check_archive passes torch's own files and refuses hostile ones before anything in them runs.

Each hostile file would create a marker file if its code ran; the controls show that it does
under torch's own loaders, so the refusals guard real holes.
"""

from __future__ import annotations

import io
import pickle
import random
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import crossstitch.archive
from crossstitch.archive import check_archive
from crossstitch.errors import CrossStitchError
from hostile import (
    call_pickle,
    hostile_expression,
    hostile_opaque_constant,
    hostile_pickled_weight,
    hostile_sample_inputs,
    inst_pickle,
    member_named,
    memo_names_pickle,
    popped_names_pickle,
    rezip,
    zip_bomb,
)

REFUSED_PICKLE = r"holds Python objects other than tensors: .* would import {}; it was refused"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("offset", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset


def saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    return saved(Tiny().state_dict())


@pytest.fixture(scope="module")
def pt2() -> bytes:
    """A pt2 with a dynamic batch, so its program holds shape expressions."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(Tiny(), (torch.randn(4, 3),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def torchscript() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Tiny()), buffer)
    return buffer.getvalue()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working folder, so a marker written by mistake stays inside it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


@pytest.mark.parametrize("kind", ["checkpoint", "pt2", "torchscript"])
def test_files_torch_writes_pass(kind, request, tmp_path):
    check_archive(write(tmp_path, "model", request.getfixturevalue(kind)), kind)


def test_a_hostile_checkpoint_is_refused_and_would_run_under_torch_load(checkpoint, tmp_path):
    marker = tmp_path / "MARKER"
    hostile = rezip(
        checkpoint,
        {member_named(checkpoint, "data.pkl"): call_pickle("builtins", "open", str(marker), "w")},
    )
    path = write(tmp_path, "hostile.pt", hostile)
    with pytest.raises(CrossStitchError, match=REFUSED_PICKLE.format("builtins.open")) as caught:
        check_archive(path, "checkpoint")
    assert not marker.exists()
    assert str(path) in str(caught.value) and "weights_only" not in str(caught.value)
    torch.load(path, weights_only=False).close()  # control: the file really runs code
    assert marker.exists()


HOSTILE_PICKLES = {
    "GLOBAL": (lambda m: call_pickle("builtins", "open", m, "w"), "builtins.open"),
    "STACK_GLOBAL": (
        lambda m: call_pickle("builtins", "open", m, "w", protocol=4),
        "builtins.open",
    ),
    "protocol 0": (lambda m: call_pickle("builtins", "open", m, "w", protocol=0), "builtins.open"),
    "INST": (lambda m: inst_pickle("builtins", "open", m, "w"), "builtins.open"),
    "names from the memo": (
        lambda m: memo_names_pickle("builtins", "open", m, "w"),
        "builtins.open",
    ),
    "names pushed then popped": (
        lambda m: popped_names_pickle("builtins", "open", m, "w"),
        "a name computed while unpickling",
    ),
}


@pytest.mark.parametrize("kind", HOSTILE_PICKLES)
def test_each_hostile_pickle_runs_code_when_unpickled(kind, tmp_path):
    make, _ = HOSTILE_PICKLES[kind]
    pickle.loads(make(str(tmp_path / "MARKER"))).close()
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    ("data", "found"),
    [
        *HOSTILE_PICKLES.values(),
        (lambda m: call_pickle("posix", "system", f"touch {m}"), "posix.system"),
        (lambda m: b"\x80\x02\x82\x01)R.", "entry 1 of the copyreg extension registry"),
        # TorchScript's class names are accepted in TorchScript archives only
        (lambda m: b"\x80\x02c__torch__\nTiny\n)\x81.", "__torch__.Tiny"),
    ],
    ids=[*HOSTILE_PICKLES, "posix.system", "EXT1", "TorchScript class"],
)
def test_a_checkpoint_pickle_importing_anything_but_tensors_is_refused(
    data, found, checkpoint, in_tmp
):
    hostile = rezip(checkpoint, {member_named(checkpoint, "data.pkl"): data("MARKER")})
    with pytest.raises(CrossStitchError, match=REFUSED_PICKLE.format(found)):
        check_archive(write(in_tmp, "hostile.pt", hostile), "checkpoint")
    assert not (in_tmp / "MARKER").exists()


HOSTILE_PT2 = {
    "sample_inputs": (hostile_sample_inputs, REFUSED_PICKLE.format("builtins.open")),
    "weight": (hostile_pickled_weight, REFUSED_PICKLE.format("builtins.open")),
    "opaque": (hostile_opaque_constant, REFUSED_PICKLE.format("builtins.open")),
    "expression": (hostile_expression, "holds a shape expression that is not plain arithmetic"),
}


@pytest.mark.parametrize("kind", HOSTILE_PT2)
def test_a_hostile_pt2_is_refused(kind, pt2, in_tmp):
    make, message = HOSTILE_PT2[kind]
    with pytest.raises(CrossStitchError, match=message):
        check_archive(write(in_tmp, f"{kind}.pt2", make(pt2)), "pt2 file")
    assert list(in_tmp.iterdir()) == [in_tmp / f"{kind}.pt2"]


def test_torch_export_load_runs_the_code_in_each_hostile_pt2(pt2, tmp_path):
    """The control: each refused pt2 really runs code under torch.export.load."""
    paths = [
        str(write(tmp_path, f"{kind}.pt2", make(pt2))) for kind, (make, _) in HOSTILE_PT2.items()
    ]
    script = (
        "import sys, torch\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        torch.export.load(path)\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *paths], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.glob("MARKER_*")) == sorted(
        f"MARKER_{kind}" for kind in HOSTILE_PT2
    )


def test_a_pt2_with_compiled_code_is_refused(pt2, tmp_path):
    root = member_named(pt2, "archive_format").split("/")[0]
    hostile = rezip(pt2, {}, {f"{root}/data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(CrossStitchError, match=r"holds compiled code .* would load and run"):
        check_archive(write(tmp_path, "aoti.pt2", hostile), "pt2 file")


@pytest.mark.parametrize("member", ["constants.pkl", "data.pkl"])
def test_a_hostile_torchscript_pickle_is_refused(member, torchscript, in_tmp):
    payload = call_pickle("posix", "system", "touch MARKER")
    hostile = rezip(torchscript, {member_named(torchscript, f"/{member}"): payload})
    with pytest.raises(CrossStitchError, match=REFUSED_PICKLE.format("posix.system")):
        check_archive(write(in_tmp, "hostile.ts", hostile), "TorchScript file")


def test_a_zip_bomb_is_refused_at_once_without_unpacking(tmp_path):
    path = tmp_path / "bomb.pt"
    zip_bomb(path, 2**31)
    with zipfile.ZipFile(path) as archive, archive.open(archive.infolist()[0]) as member:
        assert archive.infolist()[0].file_size == 2**31 and path.stat().st_size < 3 * 2**20
        assert member.read(2**22) == bytes(2**22)  # it really inflates to zeros
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CrossStitchError, match=r"looks like a zip bomb.*without unpacking"):
            check_archive(path, "checkpoint")
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 2**20


def test_a_member_expanding_far_beyond_its_size_is_refused_even_in_a_large_file(tmp_path):
    """Stored data makes the file big enough that the total stays in bounds; the ratio does not."""
    path = tmp_path / "mixed.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data/0", bytes(12 * 2**20))
        archive.writestr("archive/data/1", bytes(10 * 2**20), zipfile.ZIP_DEFLATED)
    with pytest.raises(CrossStitchError, match="member archive/data/1 would expand"):
        check_archive(path, "checkpoint")


def test_an_archive_declaring_far_more_than_its_size_is_refused(tmp_path):
    """Each member expands less than the per-member limit; together they exceed the file."""
    noise = random.Random(0)
    data = b"".join(noise.randbytes(16) + bytes(1008) for _ in range(12 * 1024))
    path = tmp_path / "expanding.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data/0", data, zipfile.ZIP_DEFLATED)
        info = archive.infolist()[0]
    assert info.file_size < crossstitch.archive.MAX_EXPANSION * info.compress_size
    with pytest.raises(CrossStitchError, match=r"declares 12 MiB of contents in 0\.\d MiB"):
        check_archive(path, "checkpoint")


@pytest.mark.parametrize("name", ["archive/../../evil.pkl", "/etc/evil", "archive/data.pkl"])
def test_members_named_outside_the_archive_or_twice_are_refused(name, checkpoint, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
        hostile = rezip(checkpoint, {}, {name: b"x"})
    with pytest.raises(CrossStitchError, match=r"outside the archive|two members") as caught:
        check_archive(write(tmp_path, "names.pt", hostile), "checkpoint")
    assert f"named {name!r}" in str(caught.value)


def test_a_pickle_too_large_to_check_is_refused_before_reading(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(crossstitch.archive, "MAX_CHECKED_BYTES", 1024)
    big = rezip(checkpoint, {member_named(checkpoint, "data.pkl"): pickle.dumps(bytes(4096))})
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda *a: pytest.fail("the member was read"))
    with pytest.raises(CrossStitchError, match="more than the 0 MiB that can be checked"):
        check_archive(write(tmp_path, "big.pt", big), "checkpoint")


def test_archives_nested_too_deep_are_refused(checkpoint, tmp_path):
    nested = checkpoint
    for depth in range(crossstitch.archive.MAX_NESTING + 1):
        nested = rezip(checkpoint, {}, {f"archive/nested{depth}.pt": nested})
    with pytest.raises(CrossStitchError, match="nests archives more than"):
        check_archive(write(tmp_path, "nested.pt", nested), "checkpoint")


@pytest.mark.parametrize("content", [b"not a zip at all", None])
def test_a_file_that_is_not_a_zip_archive_is_refused_by_name(content, tmp_path):
    path = tmp_path / "model.pt2"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CrossStitchError, match=f"pt2 file {path} is not a readable zip archive"):
        check_archive(path, "pt2 file")
