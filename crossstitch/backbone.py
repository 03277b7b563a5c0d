"""The cross-stitch backbone: one network per task, cross-stitch units between their stages."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from crossstitch.dilation import apply_output_stride, check_output_stride
from crossstitch.errors import CrossStitchError
from crossstitch.families import (
    Split,
    channel_dim,
    family_of,
    nominal_reduction,
    resolution,
)
from crossstitch.heads import build_heads, check_heads, head_output
from crossstitch.memory import build_bytes, check_fits
from crossstitch.stages import StageInfo, arch_spec, check_fixed_size, check_head_layout
from crossstitch.units import GRANULARITIES, CrossStitchUnit, check_init, default_beta
from crossstitch.weights import apply_state, build_classifier, load_state_file, resolve_weights

TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
PROBE_SIZE = 224
FEATURES = ("last", "all")


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Task names must be at least two, distinct, and usable as ONNX output names."""
    tasks = list(tasks)
    if len(tasks) < 2:
        raise CrossStitchError(
            f"a cross-stitch network needs at least two tasks, got {len(tasks)}: {tasks}"
        )
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise CrossStitchError(f"task names must be distinct; repeated: {', '.join(duplicates)}")
    reserved = nn.ModuleDict()
    for task in tasks:
        if not TASK_NAME.match(task):
            raise CrossStitchError(
                f"invalid task name '{task}': use letters, digits, '_' and '-', "
                "not starting with a digit or '-'"
            )
        if hasattr(reserved, task):
            raise CrossStitchError(f"task name '{task}' is reserved by torch.nn.Module; rename it")
    return tasks


def check_granularity(granularity: str) -> None:
    """Refuse anything but the two granularities."""
    if granularity not in GRANULARITIES:
        raise CrossStitchError(
            f"unknown granularity '{granularity}'; use one of: {', '.join(GRANULARITIES)}"
        )


def check_features(features: str) -> None:
    """Refuse anything but the two kinds of output: the last stage's features, or all stitched."""
    if features not in FEATURES:
        raise CrossStitchError(f"unknown features '{features}'; use one of: {', '.join(FEATURES)}")


def stage_output(task: str, stage: str) -> str:
    """The output name of a task's features after one stitched stage, e.g. ``seg.layer1``."""
    return f"{task}.{stage}"


def select_stages(available: Sequence[str], stages: Sequence[str] | str | None) -> list[str]:
    """The stitched stages in network order; ``None`` or ``"all"`` mean every stage."""
    if stages is None or stages == "all" or list(stages) == ["all"]:
        return list(available)
    requested = [stages] if isinstance(stages, str) else list(stages)
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise CrossStitchError(
            f"unknown stage {', '.join(repr(s) for s in unknown)}; "
            f"stages are: {', '.join(available)} (or all)"
        )
    if not requested:
        raise CrossStitchError(f"choose at least one stage to stitch from: {', '.join(available)}")
    return [s for s in available if s in requested]


class TaskBackbone(nn.Module):
    """One task's network cut into stages: the classifier's own modules, minus its head."""

    def __init__(self, split: Split) -> None:
        super().__init__()
        self.stem = split.stem
        self.stages = nn.ModuleDict(split.stages)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages.values():
            x = stage(x)
        return x


def probe_shapes(backbone: TaskBackbone, input_size: tuple[int, int]) -> dict[str, torch.Size]:
    """Output shape of each stage for a batch of ``input_size`` images, on the meta device.

    No memory is allocated and no weight is touched, so this is cheap for any model size. The
    batch is 2 so that batch norm in training mode accepts 1x1 features.
    """
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*backbone.named_parameters(), *backbone.named_buffers()]
    }
    x = torch.empty(2, 3, *input_size, device="meta")
    x = functional_call(backbone.stem, _prefixed(meta, "stem."), (x,))
    shapes = {}
    for name, stage in backbone.stages.items():
        x = functional_call(stage, _prefixed(meta, f"stages.{name}."), (x,))
        shapes[name] = x.shape
    return shapes


def stage_infos(shapes: dict[str, torch.Size], size: int, layout: str) -> list[StageInfo]:
    """Each stage's name, channels and reduction, from its output shape at a ``size`` input."""
    return [
        StageInfo(
            name,
            shape[channel_dim(layout)],
            nominal_reduction(size, resolution(shape, layout), layout),
        )
        for name, shape in shapes.items()
    ]


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class CrossStitchBackbone(nn.Module):
    """Cross-stitch network (Misra et al., CVPR 2016) over torchvision backbones.

    Every task has its own backbone; all see the same image. After each stitched stage a
    ``CrossStitchUnit`` recombines the task features. ``forward`` returns, per task, the last
    stage's features, or for a task with a head that head's output resized to the input's height
    and width: ``{task: Tensor}``.

    ``heads`` maps a task to its head: a number of output channels builds a ``DenseHead``, an
    ``nn.Module`` is used as given (it maps ``[N, C, h, w]`` features to ``[N, C', h, w]``).

    ``features="all"`` returns instead every stitched stage's features of every task under
    ``"<task>.<stage>"``, plus each head's output under ``"<task>"``; see ``output_names``.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        alpha: float = 0.9,
        beta: float | None = None,
        granularity: str = "channel",
        stages: Sequence[str] | str | None = None,
        heads: Mapping[str, int | nn.Module] | None = None,
        features: str = "last",
    ) -> None:
        super().__init__()
        self.tasks = check_tasks(list(models))
        check_granularity(granularity)
        check_features(features)
        check_init(alpha, beta)
        heads = check_heads(heads, self.tasks)
        families = {family_of(m) for m in models.values()}
        if len(families) > 1:
            names = sorted(f.name for f in families)
            raise CrossStitchError(f"all task models must be of one family, got {names}")
        (family,) = families
        if heads:
            check_head_layout(family.name, family.layout)
        self.layout = family.layout
        self.channel_dim = family.channel_dim
        self.input_size = family.fixed_size(next(iter(models.values())))
        self.backbones = nn.ModuleDict(
            {task: TaskBackbone(family.split(model)) for task, model in models.items()}
        )
        self.stages = self._stage_info(self.input_size or PROBE_SIZE)
        stitched = select_stages([s.name for s in self.stages], stages)
        beta = default_beta(alpha, len(self.tasks)) if beta is None else beta
        self.cross_stitch = nn.ModuleDict(
            {
                s.name: CrossStitchUnit(
                    self.tasks, s.channels, granularity, alpha, beta, self.channel_dim
                )
                for s in self.stages
                if s.name in stitched
            }
        )
        self.heads = build_heads(heads, self.stages[-1].channels)
        self.features = features
        self.config: dict = {
            "arch": None,
            "family": family.name,
            "tasks": list(self.tasks),
            "alpha": float(alpha),
            "beta": float(beta),
            "granularity": granularity,
            "stages": stitched,
            "heads": {task: head for task, head in heads.items() if isinstance(head, int)},
            "input_size": self.input_size,
            "features": features,
        }

    @property
    def output_names(self) -> list[str]:
        """The keys of ``forward``'s dict in order: per task, its stitched stages then its head."""
        names = []
        for task in self.tasks:
            if self.features == "all":
                names += [stage_output(task, stage) for stage in self.cross_stitch]
            if task in self.heads or self.features == "last":
                names.append(task)
        return names

    def check_input_size(self, size: Sequence[int], option: str = "--input-size") -> None:
        """Refuse an input size that a fixed-size model (ViT, MaxViT) cannot take."""
        name = self.config.get("arch") or self.config["family"]
        check_fixed_size(name, self.input_size, tuple(size), option)

    def smallest_export_size(self, at_least: int = 32) -> int:
        """The smallest square input, a multiple of 32 from ``at_least`` up, at which every stage
        has features of at least 2x2: exporters specialise a dimension of size 1, so an artifact
        exported at that size would accept no other.
        """
        if self.input_size is not None:
            return self.input_size
        backbone = self.backbones[self.tasks[0]]
        size = -(-at_least // 32) * 32
        while (
            min(resolution(s, self.layout) for s in probe_shapes(backbone, (size, size)).values())
            < 2
        ):
            size += 32
        return size

    def _stage_info(self, size: int) -> list[StageInfo]:
        per_task = {
            task: probe_shapes(backbone, (size, size)) for task, backbone in self.backbones.items()
        }
        first = per_task[self.tasks[0]]
        for task, shapes in per_task.items():
            if shapes != first:
                raise CrossStitchError(
                    f"the backbone of task '{task}' has other stage shapes than that of "
                    f"'{self.tasks[0]}'; cross-stitching needs identical architectures"
                )
        return stage_infos(first, size, self.layout)

    @classmethod
    def from_torchvision(
        cls,
        arch: str,
        tasks: Sequence[str],
        weights: str | None = None,
        alpha: float = 0.9,
        beta: float | None = None,
        granularity: str = "channel",
        stages: Sequence[str] | str | None = None,
        task_weights: Mapping[str, str] | None = None,
        weights_file: str | None = None,
        heads: Mapping[str, int | nn.Module] | None = None,
        output_stride: int = 32,
        features: str = "last",
        load_weights: bool = True,
    ) -> CrossStitchBackbone:
        """Build from a torchvision architecture name, one copy of the network per task.

        ``weights`` names torchvision weights (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...) for all
        tasks, ``weights_file`` a classifier state_dict file for all tasks, and
        ``task_weights`` per-task state_dict files (single-task checkpoints) applied on top.
        ``heads`` attaches a head to some tasks and ``features`` chooses the outputs (see the
        class). ``output_stride`` 16 or 8 dilates the last stages instead of striding (ResNet
        family only). ``load_weights=False`` builds the network that ``weights`` imply without
        loading them, as ``crossstitch.load`` does before loading its own. All options are
        checked before anything is built.
        """
        spec = arch_spec(arch)
        tasks = check_tasks(tasks)
        check_granularity(granularity)
        check_features(features)
        check_output_stride(arch, spec.family, output_stride)
        check_init(alpha, beta)
        if check_heads(heads, tasks):
            check_head_layout(arch, spec.layout)
        select_stages([s.name for s in spec.stages], stages)
        weights = resolve_weights(arch, weights)
        task_weights = dict(task_weights or {})
        unknown = [t for t in task_weights if t not in tasks]
        if unknown:
            raise CrossStitchError(
                f"task weights given for unknown task {', '.join(unknown)}; "
                f"tasks are {', '.join(tasks)}"
            )
        check_fits(build_bytes(arch, len(tasks)), f"building {arch} with {len(tasks)} tasks")
        states = {task: load_state_file(path) for task, path in task_weights.items()}
        shared_state = load_state_file(weights_file) if weights_file else None

        base = build_classifier(arch, weights, load=load_weights)
        head = family_of(base).head
        if shared_state is not None:
            apply_state(base, shared_state, head, f"weights file {weights_file}")
        apply_output_stride(base, spec.family, output_stride)
        models = {task: copy.deepcopy(base) for task in tasks[:-1]}
        models[tasks[-1]] = base
        for task, state in states.items():
            apply_state(models[task], state, head, f"task weights {task_weights[task]}")
        model = cls(
            models,
            alpha=alpha,
            beta=beta,
            granularity=granularity,
            stages=stages,
            heads=heads,
            features=features,
        )
        model.config.update(
            arch=arch,
            output_stride=output_stride,
            weights=weights,
            weights_file=str(weights_file) if weights_file else None,
            task_weights={t: str(p) for t, p in task_weights.items()},
        )
        return model

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = {task: backbone.stem(x) for task, backbone in self.backbones.items()}
        stitched = {}
        for name in self.backbones[self.tasks[0]].stages:
            feats = {task: net.stages[name](feats[task]) for task, net in self.backbones.items()}
            if name in self.cross_stitch:
                feats = self.cross_stitch[name](feats, reuse_inputs=True)
                if self.features == "all":
                    stitched[name] = feats
        size = x.shape[-2:]
        out = {}
        for task in self.tasks:
            if self.features == "all":
                out.update({stage_output(task, s): f[task] for s, f in stitched.items()})
            if task in self.heads:
                out[task] = head_output(self.heads[task], feats[task], size)
            elif self.features == "last":
                out[task] = feats[task]
        return out
