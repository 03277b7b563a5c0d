"""Fixtures shared by the tests."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import crossstitch
from crossstitch.cli.app import app
from helpers import build, randomize_units, without_progress


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run the CLI in-process in an empty folder; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, list(args))
        return result.exit_code, result.stdout, without_progress(result.stderr)

    return run


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A ResNet-18 checkpoint with two tasks, exported to every format by the CLI."""
    folder = tmp_path_factory.mktemp("exported")
    model = build()
    randomize_units(model)
    crossstitch.save(model, folder / "crossstitch.safetensors")
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--model",
            str(folder / "crossstitch.safetensors"),
            "--format",
            "all",
            "--input-size",
            "96",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    return folder, json.loads(result.stdout)
