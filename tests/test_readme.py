"""The README and the docs stay true: commands, Python examples, samples and error messages."""

import re
from pathlib import Path

import pytest

from helpers import load_script

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_fresh_machine_commands():
    first, second = _blocks("bash")[:2]
    assert first.strip().endswith("crossstitch build resnet18 --tasks seg depth")
    assert second.strip().endswith('pip install -e ".[test]" && pytest')
    ci = (README.parent / ".ci" / "run").read_text()
    assert second.strip().removesuffix(" && pytest") in ci


PYTHON_BLOCKS = _blocks("python")


def test_readme_shows_the_api_and_a_training_example():
    assert any("CrossStitchBackbone.from_torchvision(" in b for b in PYTHON_BLOCKS)
    assert any("crossstitch.param_groups(" in b for b in PYTHON_BLOCKS)


@pytest.mark.parametrize(
    "block", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_every_python_example_runs_and_writes_what_it_saves(tmp_path, monkeypatch, block):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    for saved in re.findall(r'crossstitch\.save\(\w+, "([^"]+)"\)', block):
        assert (tmp_path / saved).is_file()


def test_the_samples_in_the_docs_are_the_real_output():
    samples = load_script("docs_samples")
    text = samples.DOC.read_text()
    assert set(samples.MARKER.findall(text)) == set(samples.SAMPLES)
    assert samples.render(text) == text, "run python scripts/docs_samples.py"


def test_the_readme_stays_short_and_links_the_manual():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for doc in ("python", "cli", "architectures", "performance", "design"):
        assert f"(docs/{doc}.md)" in text
        assert (README.parent / "docs" / f"{doc}.md").is_file()


@pytest.mark.parametrize("options", [{"tasks": ["a", "b"], "output_stride": 12}, {"tasks": "seg"}])
def test_the_library_errors_shown_in_the_docs_are_real(options):
    import crossstitch

    with pytest.raises(crossstitch.CrossStitchError) as caught:
        crossstitch.CrossStitchBackbone.from_torchvision("resnet18", **options)
    assert f"\n{caught.value}\n" in (README.parent / "docs" / "python.md").read_text()
