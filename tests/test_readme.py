"""The README's commands and its Python example stay true."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_fresh_machine_commands():
    first, second = _blocks("bash")[:2]
    assert first.strip().endswith("crossstitch build resnet18 --tasks seg depth")
    assert second.strip().endswith('pip install -e ".[test]" && pytest')
    ci = (README.parent / ".ci" / "run").read_text()
    assert second.strip().removesuffix(" && pytest") in ci


def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (example,) = _blocks("python")
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "m.pt").is_file()
