"""The full matrix, on demand (`pytest -m slow tests/test_matrix.py`): every torchvision
architecture builds with two tasks, exports to every format and verifies. It runs the same code
as scripts/coverage.py, which records these runs for the README."""

import importlib.util
from pathlib import Path

import pytest

from crossstitch.stages import architectures

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "coverage.py"


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("coverage_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(architectures()))
def test_architecture_exports_and_verifies_in_every_format(coverage, arch):
    result = coverage.run_one(arch)
    failed = {f: r for f, r in result["formats"].items() if not r["passed"]}
    assert not failed, failed
