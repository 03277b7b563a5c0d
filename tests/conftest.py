"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from crossstitch.cli.app import app


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run the CLI in-process in an empty folder; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, list(args))
        return result.exit_code, result.stdout, result.stderr

    return run
