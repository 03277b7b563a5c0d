"""The fused C kernel: bit-exact with the unit's torch ops, taken only where that is safe.

Every test runs whether or not the extension was built; only the assertions that the fused path
was taken are skipped without it.
"""

import pytest
import torch

from crossstitch import CrossStitchUnit, fused
from crossstitch.reference import reference_stitch
from helpers import build, image, randomize_units

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


def _case(tasks: int, granularity: str, layout: str):
    """A unit with special values in its weight, features for it, and its inference output."""
    channel_dim, shape = LAYOUTS[layout]
    unit = _unit(tasks, granularity, channel_dim, shape[channel_dim])
    xs = _features(tasks, shape)
    with torch.no_grad():
        got = list(unit(dict(zip(unit.tasks, xs, strict=True))).values())
    return unit, xs, channel_dim, got


@pytest.mark.parametrize("tasks", [2, 3, 5])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inference_equals_the_torch_ops_bit_for_bit_in_place_or_not(tasks, granularity, layout):
    unit, xs, channel_dim, got = _case(tasks, granularity, layout)
    with torch.no_grad():
        want = unit.mix(xs)
        kernels = [got]
        if fused.AVAILABLE:
            kernels.append(fused.stitch(unit.weight, xs, channel_dim))
            for threads in (1, 3):
                inputs = [x.clone() for x in xs]
                kernels.append(fused.stitch_(unit.weight, inputs, channel_dim, threads=threads))
                assert all(a is b for a, b in zip(kernels[-1], inputs, strict=True))
    for outputs in kernels:
        for a, b in zip(outputs, want, strict=True):
            assert a.shape == b.shape and a.is_contiguous() and _same_bits(a, b)


@pytest.mark.parametrize("tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inference_equals_the_reference_bit_for_bit(tasks, granularity, layout):
    """To the bit, signed zeros included; these small shapes all end in a partial vector."""
    unit, xs, channel_dim, got = _case(tasks, granularity, layout)
    with torch.no_grad():
        want = reference_stitch(unit.weight, xs, channel_dim)
    assert all(_same_bits(a, b) for a, b in zip(got, want, strict=True))


@needs_fused
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_split_over_threads_changes_nothing(granularity, layout):
    """The mix is the same to the bit for any thread count; the weight's gradient is the
    float64 sum rounded once to float32, whatever the count."""
    channel_dim = LAYOUTS[layout][0]
    shape = (3, 64, 33, 31) if layout == "nchw" else (3, 33, 31, 1100)
    unit = _unit(5, granularity, channel_dim, shape[channel_dim])
    xs = _features(5, shape)
    plain, grads = [torch.randn(shape) for _ in range(5)], [torch.randn(shape) for _ in range(5)]
    axes = [d for d in range(len(shape)) if granularity == "layer" or d != channel_dim % len(shape)]
    exact = torch.stack(
        [torch.stack([(g.double() * x.double()).sum(axes) for x in plain]) for g in grads]
    ).view(unit.weight.shape)
    with torch.no_grad():
        want = unit.mix(xs)
        for threads in (1, 2, 3, 7, 100):
            got = fused.stitch(unit.weight, xs, channel_dim, threads=threads)
            assert all(_same_bits(a, b) for a, b in zip(got, want, strict=True))
            grad = fused.weight_grad(unit.weight, grads, plain, channel_dim, threads=threads)
            assert grad.dtype == torch.float32 and grad.shape == unit.weight.shape
            torch.testing.assert_close(grad.double(), exact, rtol=1e-6, atol=1e-6)


def _count_in_place(monkeypatch) -> list[int]:
    """Counts the calls of ``fused.stitch_`` from now on, in a one-element list."""
    count = [0]
    original = fused.stitch_

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "stitch_", counted)
    return count


@needs_fused
@pytest.mark.parametrize("features", ["last", "all"])
def test_backbone_inference_writes_over_its_own_stage_outputs(monkeypatch, features):
    """Same outputs as the torch ops, every unit in place, nothing allocated for the units."""
    model = build(features=features).eval()
    randomize_units(model)
    with torch.no_grad():
        monkeypatch.setattr(fused, "AVAILABLE", False)
        want = model(image())
        monkeypatch.setattr(fused, "AVAILABLE", True)
        count = _count_in_place(monkeypatch)
        got = model(image())
    assert count[0] == len(model.cross_stitch)
    assert list(got) == list(want)
    assert all(torch.equal(got[name], want[name]) for name in want)


def _keeper(kept: list, clones: list, view: bool = False, only=None):
    """A forward hook that keeps the module's output (or a view of it) and a copy of it."""

    def hook(module, args, output):
        if only is None or module is only:
            kept.append(output[:1] if view else output)
            clones.append(kept[-1].clone())

    return hook


def _input_keeper(kept: list, clones: list):
    """A forward pre-hook that keeps a unit's input features and copies of them."""

    def hook(module, args):
        kept.extend(args[0].values())
        clones.extend(x.clone() for x in args[0].values())

    return hook


# Holder: how many of resnet18's four units may still write in place. A hook on one stage or
# unit stops only that unit; a global hook or grad mode stops all of them.
HOLDERS = {
    "stage hook": 3,
    "stage hook keeps a view": 3,
    "unit pre-hook": 3,
    "global hook": 0,
    "grad mode": 0,
}


@needs_fused
@pytest.mark.parametrize("holder", list(HOLDERS))
def test_in_place_leaves_what_anything_else_holds(monkeypatch, holder):
    """Features that a hook, a view or autograd could still see are never written over."""
    model = build().eval()
    randomize_units(model)
    stage = model.backbones[model.tasks[0]].stages["layer2"]
    unit = model.cross_stitch["layer2"]
    kept, clones = [], []
    if holder == "unit pre-hook":
        handle = unit.register_forward_pre_hook(_input_keeper(kept, clones))
    elif holder == "global hook":
        hook = _keeper(kept, clones, only=stage)
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
    else:
        handle = stage.register_forward_hook(_keeper(kept, clones, view=holder.endswith("view")))
    if holder == "grad mode":
        model.requires_grad_(False)
    context = torch.enable_grad() if holder == "grad mode" else torch.no_grad()
    count = _count_in_place(monkeypatch)
    with context:
        got = model(image())
    in_place = count[0]
    handle.remove()
    with torch.no_grad():
        want = model(image())
    assert kept and all(torch.equal(a, b) for a, b in zip(kept, clones, strict=True))
    assert all(torch.equal(got[task], want[task]) for task in want)
    assert in_place == HOLDERS[holder]


@needs_fused
def test_a_caller_that_keeps_its_features_keeps_them_unchanged():
    unit = _unit(3, "channel", 1, 7)
    xs = _features(3, (2, 7, 3))
    clones = [x.clone() for x in xs]
    with torch.no_grad():
        out = unit(dict(zip(unit.tasks, xs, strict=True)), reuse_inputs=True)
        want = unit.mix(clones)
    assert all(_same_bits(a, b) for a, b in zip(xs, clones, strict=True))
    assert all(_same_bits(a, b) for a, b in zip(out.values(), want, strict=True))


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


def _gradients(outputs, grads, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outputs, inputs, grads, create_graph=True))


@pytest.mark.parametrize("tasks", [2, 3, 5])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("layout", ["nchw", "nc", "tokens", "nhwc-batch3"])
def test_training_takes_the_kernel_and_matches_the_torch_ops_gradients(tasks, granularity, layout):
    """Forward bit for bit; gradients (and gradients of gradients) to float32 rounding."""
    channel_dim, shape = LAYOUTS[layout]
    unit = _unit(tasks, granularity, channel_dim, shape[channel_dim], seed=2)
    with torch.no_grad():
        unit.weight.copy_(torch.randn(unit.weight.shape))
    xs = [torch.randn(shape, requires_grad=True) for _ in range(tasks)]
    grads = [torch.randn(shape) for _ in range(tasks)]
    before = fused.calls
    got = list(unit(dict(zip(unit.tasks, xs, strict=True))).values())
    assert fused.calls - before == (1 if fused.AVAILABLE else 0)
    want = unit.mix(xs)
    assert all(_same_bits(a, b) for a, b in zip(got, want, strict=True))
    first = _gradients(got, grads, [unit.weight, *xs])
    expected = _gradients(want, grads, [unit.weight, *xs])
    for a, b in zip(first, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), unit.weight)[0]
    torch.testing.assert_close(
        second,
        torch.autograd.grad(sum(g.square().sum() for g in expected), unit.weight)[0],
        rtol=1e-4,
        atol=1e-4,
    )


@needs_fused
def test_training_gives_gradients_only_where_asked():
    """Only ``t0``'s output has a gradient: the other rows of the weight, which hold infinities
    and NaN, add nothing to the inputs' gradients."""
    unit = _unit(3, "channel", 1, 4)
    xs = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    xs[1].requires_grad_(True)
    out = unit(dict(zip(unit.tasks, xs, strict=True)))
    out["t0"].sum().backward()
    assert xs[0].grad is None and xs[2].grad is None
    assert xs[1].grad is not None and unit.weight.grad is not None
    torch.testing.assert_close(
        xs[1].grad, unit.weight[0, 1].detach().view(1, 4, 1, 1).expand(2, 4, 3, 3), equal_nan=True
    )


@pytest.mark.parametrize("case", ["channels-last memory", "transposed", "float64", "shapes differ"])
def test_inference_keeps_the_torch_ops_where_the_kernel_does_not_apply(case):
    unit = _unit(2, "channel", 1, 4)
    xs = [torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)]
    if case == "channels-last memory":
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    elif case == "transposed":
        xs = [x.transpose(2, 3) for x in xs]
    elif case == "float64":
        unit.double()
        xs = [x.double() for x in xs]
    else:
        xs[1] = xs[1][:1]
    with torch.no_grad():
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
