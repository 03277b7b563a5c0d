"""`torch.compile(model, fullgraph=True)`: one graph, no break, for inference and training.

``fullgraph=True`` turns any graph break into an error, so a passing call proves there is none.
The ``aot_eager`` backend captures the forward and backward graphs as inductor would, without
generating code, so every family is checked in seconds; inductor itself runs in the slow set.
"""

import pytest
import torch

from helpers import build, image, randomize_units

# One architecture per family at the smallest input it takes (fixed-size models at theirs).
FAMILIES = {
    "alexnet": ("alexnet", 64),
    "convnext": ("convnext_tiny", 64),
    "densenet": ("densenet121", 64),
    "efficientnet": ("efficientnet_b0", 64),
    "googlenet": ("googlenet", 64),
    "inception": ("inception_v3", 96),
    "maxvit": ("maxvit_t", 224),
    "mnasnet": ("mnasnet0_5", 64),
    "mobilenet_v2": ("mobilenet_v2", 64),
    "mobilenet_v3": ("mobilenet_v3_small", 64),
    "regnet": ("regnet_x_400mf", 64),
    "resnet": ("resnet18", 64),
    "shufflenet": ("shufflenet_v2_x0_5", 64),
    "squeezenet": ("squeezenet1_0", 64),
    "swin": ("swin_t", 64),
    "vgg": ("vgg11", 64),
    "vit": ("vit_b_32", 224),
}
DEFAULT_SUITE = ("resnet", "swin")


def _check_compiles(model: torch.nn.Module, size: int, backend: str) -> None:
    """Inference equal to eager, then a training step whose gradients match eager's."""
    torch.compiler.reset()
    randomize_units(model)
    x = image(batch=2, size=size)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    model.eval()
    with torch.no_grad():
        want, got = model(x), compiled(x)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
    model.train()
    grads = []
    for call in (model, compiled):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same stochastic depth in both (Swin, ConvNeXt)
        sum(o.float().mean() for o in call(x).values()).backward()
        grads.append([p.grad.clone() for p in model.cross_stitch.parameters()])
    for eager, traced in zip(*grads, strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "family",
    [f if f in DEFAULT_SUITE else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
def test_every_family_compiles_to_one_graph(family):
    arch, size = FAMILIES[family]
    _check_compiles(build(arch), size, backend="aot_eager")


@pytest.mark.parametrize(
    "options",
    [{"heads": {"seg": 3}, "features": "all"}, {"output_stride": 8, "granularity": "layer"}],
    ids=["heads-all-features", "dilated-layer-units"],
)
def test_heads_features_and_dilation_compile_to_one_graph(options):
    _check_compiles(
        build("resnet18", tasks=["seg", "depth", "normals"], **options), 64, "aot_eager"
    )


@pytest.mark.slow
def test_inductor_compiles_the_model_and_its_training_step():
    _check_compiles(build("resnet18"), 64, backend="inductor")
