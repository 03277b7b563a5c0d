"""The catalogue that `crossstitch list` reads agrees with torchvision and with built models."""

import pytest

from crossstitch.stages import architectures
from helpers import build, load_script


@pytest.fixture(scope="module")
def generator():
    return load_script("update_catalog")


def test_catalog_matches_torchvision(generator):
    for name, spec in architectures().items():
        entry = generator.describe(name)
        assert entry["family"] == spec.family
        assert [tuple(s) for s in entry["stages"]] == [
            (s.name, s.channels, s.reduction) for s in spec.stages
        ]
        assert tuple(entry["weights"]) == spec.weights


def test_issue_families_are_all_listed():
    names = set(architectures())
    for arch in [
        "resnet18",
        "resnet152",
        "resnext50_32x4d",
        "wide_resnet50_2",
        "vgg11",
        "vgg19_bn",
    ]:
        assert arch in names


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "vgg13"])
def test_built_model_stages_match_catalog(arch):
    assert tuple(build(arch).stages) == architectures()[arch].stages
