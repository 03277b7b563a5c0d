"""The fused C kernel: bit-exact with the unit's torch ops, taken only where that is safe.

Every test runs whether or not the extension was built; only the assertions that the fused path
was taken are skipped without it.
"""

import pytest
import torch

from crossstitch import CrossStitchUnit, fused
from crossstitch.reference import reference_stitch
from helpers import build, image

needs_fused = pytest.mark.skipif(
    not fused.AVAILABLE, reason="the fused C extension was not built in this install"
)

LAYOUTS = {
    "nchw": (1, (3, 7, 1, 5)),
    "nchw-batch1": (1, (1, 7, 5)),
    "nc": (1, (3, 7)),
    "tokens": (-1, (3, 5, 7)),
    "nhwc": (-1, (1, 2, 3, 7)),
    "nhwc-batch3": (-1, (3, 1, 5, 7)),
}
SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 1e-30, 3e38]


def _unit(tasks: int, granularity: str, channel_dim: int, channels: int, seed: int = 0):
    unit = CrossStitchUnit(
        [f"t{i}" for i in range(tasks)], channels, granularity=granularity, channel_dim=channel_dim
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        unit.weight.copy_(torch.randn(unit.weight.shape, generator=generator))
        flat = unit.weight.view(-1)
        flat[::5] = torch.tensor(SPECIAL)[torch.arange(0, flat.numel(), 5) % len(SPECIAL)]
    return unit


def _features(tasks: int, shape: tuple[int, ...], seed: int = 1) -> list[torch.Tensor]:
    """Random features, a quarter of them scaled far out, and every special value in each task
    (signed zeros, infinities, NaN, denormals) at a random place."""
    generator = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(tasks):
        exponent = torch.randint(-40, 38, shape, generator=generator)
        far = torch.rand(shape, generator=generator) < 0.25
        x = torch.randn(shape, generator=generator) * torch.where(far, 10.0**exponent, 1.0)
        x.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL)[: x.numel()]
        xs.append(x.view(-1)[torch.randperm(x.numel(), generator=generator)].view(shape))
    return xs


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit, signed zeros included; NaN matches NaN whatever its payload."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(
        a.masked_fill(nan, 0).view(torch.int32), b.masked_fill(nan, 0).view(torch.int32)
    )


@pytest.mark.parametrize("tasks", [2, 3, 5])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inference_equals_the_torch_ops_bit_for_bit(tasks, granularity, layout):
    channel_dim, shape = LAYOUTS[layout]
    unit = _unit(tasks, granularity, channel_dim, shape[channel_dim])
    xs = _features(tasks, shape)
    with torch.no_grad():
        got = list(unit(dict(zip(unit.tasks, xs, strict=True))).values())
        want = unit.mix(xs)
        direct = fused.stitch(unit.weight, xs, channel_dim) if fused.AVAILABLE else want
    for a, b, c in zip(got, want, direct, strict=True):
        assert a.shape == b.shape and a.is_contiguous()
        assert _same_bits(a, b) and _same_bits(c, b)


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inference_equals_the_reference_bit_for_bit(tasks, granularity, layout):
    """``torch.equal``, NaN matching NaN; not to the bit, as the reference's sum starts at +0.0
    and so turns a sum of negative zeros positive. Not for five tasks: ``torch.sum`` over five or
    more small stacked tensors does not add in order, so the reference differs in the last bit."""
    channel_dim, shape = LAYOUTS[layout]
    unit = _unit(tasks, granularity, channel_dim, shape[channel_dim])
    xs = _features(tasks, shape)
    with torch.no_grad():
        got = list(unit(dict(zip(unit.tasks, xs, strict=True))).values())
        want = reference_stitch(unit.weight, xs, channel_dim)
    for a, b in zip(got, want, strict=True):
        nan = a.isnan()
        assert torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


@needs_fused
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_split_over_threads_changes_nothing(granularity, layout):
    channel_dim = LAYOUTS[layout][0]
    shape = (3, 64, 33, 31) if layout == "nchw" else (3, 33, 31, 1100)
    unit = _unit(5, granularity, channel_dim, shape[channel_dim])
    xs = _features(5, shape)
    with torch.no_grad():
        want = unit.mix(xs)
        for threads in (1, 2, 3, 7, 100):
            got = fused.stitch(unit.weight, xs, channel_dim, threads=threads)
            assert all(_same_bits(a, b) for a, b in zip(got, want, strict=True))


@needs_fused
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_takes_the_fused_path(context):
    model = build().eval()
    before = fused.calls
    with context():
        model(image(batch=1))
    assert fused.calls - before == len(model.cross_stitch)


@needs_fused
def test_no_grad_inputs_take_the_fused_path_with_grad_enabled():
    unit = _unit(2, "channel", 1, 7)
    unit.weight.requires_grad_(False)
    before = fused.calls
    unit(dict(zip(unit.tasks, _features(2, (2, 7, 3)), strict=True)))
    assert fused.calls == before + 1


def _calls(unit: CrossStitchUnit, xs: list[torch.Tensor]) -> int:
    before = fused.calls
    out = unit(dict(zip(unit.tasks, xs, strict=True)))
    with torch.no_grad():
        want = unit.mix(xs)
    assert all(_same_bits(a, b) for a, b in zip(out.values(), want, strict=True))
    return fused.calls - before


def test_training_runs_the_torch_ops_and_gets_gradients():
    unit = _unit(3, "channel", 1, 4)
    xs = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    assert _calls(unit, xs) == 0
    sum(o.sum() for o in unit(dict(zip(unit.tasks, xs, strict=True))).values()).backward()
    assert unit.weight.grad is not None


@pytest.mark.parametrize(
    "case", ["channels-last memory", "transposed", "float64", "shapes differ", "input needs grad"]
)
def test_inference_keeps_the_torch_ops_where_the_kernel_does_not_apply(case):
    unit = _unit(2, "channel", 1, 4)
    xs = [torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)]
    context = torch.no_grad()
    if case == "channels-last memory":
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    elif case == "transposed":
        xs = [x.transpose(2, 3) for x in xs]
    elif case == "float64":
        unit.double()
        xs = [x.double() for x in xs]
    elif case == "shapes differ":
        xs[1] = xs[1][:1]
    else:
        xs[0].requires_grad_(True)
        unit.weight.requires_grad_(False)
        context = torch.enable_grad()
    with context:
        assert _calls(unit, xs) == 0


class _Pair(torch.nn.Module):
    """Two tensors in, two out: a unit in the shape tracing and export want."""

    def __init__(self) -> None:
        super().__init__()
        self.unit = _unit(2, "channel", 1, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.unit({"t0": a, "t1": b})
        return out["t0"], out["t1"]


def test_tracing_and_export_record_the_torch_ops():
    module = _Pair().eval()
    example = (torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3))
    before = fused.calls
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
        program = torch.export.export(module, example)
    assert fused.calls == before
    graph = str(traced.inlined_graph)
    assert "aten::mul" in graph and "aten::add" in graph
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"aten.mul.Tensor", "aten.add_.Tensor"} <= targets


def test_without_the_extension_the_torch_ops_run(monkeypatch):
    monkeypatch.setattr(fused, "AVAILABLE", False)
    unit = _unit(3, "layer", -1, 6)
    xs = _features(3, (2, 4, 6))
    with torch.no_grad():
        assert _calls(unit, xs) == 0
    assert fused.kernel_name(False) == "torch ops (fused C kernel not built)"
