"""The full matrix, on demand (`pytest -m slow tests/test_matrix.py`): every torchvision
architecture builds with two tasks, exports to every format and verifies. It runs the same code
as scripts/coverage.py, which records these runs in docs/architectures.md."""

import pytest

from crossstitch.stages import architectures
from helpers import load_script


@pytest.fixture(scope="module")
def coverage():
    return load_script("coverage")


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(architectures()))
def test_architecture_exports_and_verifies_in_every_format(coverage, arch):
    result = coverage.run_one(arch)
    failed = {f: r for f, r in result["formats"].items() if not r["passed"]}
    assert not failed, failed
