"""The cross-stitch backbone: one network per task, cross-stitch units between their stages."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from crossstitch.config import CrossStitchConfig, check_tasks
from crossstitch.dilation import apply_output_stride, check_output_stride
from crossstitch.errors import CrossStitchError
from crossstitch.families import Split, channel_dim, family_of, nominal_reduction, resolution
from crossstitch.heads import build_heads, check_heads, head_output
from crossstitch.recompute import run_stage
from crossstitch.shapes import meta_forward, meta_images
from crossstitch.stages import StageInfo, arch_spec, check_fixed_size, check_head_layout
from crossstitch.units import CrossStitchUnit
from crossstitch.weights import (
    MODULES_SOURCE,
    Weights,
    apply_state,
    build_classifier,
    default_preprocess,
    load_state_file,
    preprocess_for,
    resolve_weights,
)

PROBE_SIZE = 224
# Where smallest_export_size gives up: no architecture here needs more.
LARGEST_PROBE = 1024
# Recombines the task features after one stage: ``stitch(stage, {task: features})``.
Stitch = Callable[[str, dict[str, Tensor]], dict[str, Tensor]]


def stage_output(task: str, stage: str) -> str:
    """The output name of a task's features after one stitched stage, e.g. ``seg.layer1``."""
    return f"{task}.{stage}"


def task_weight_paths(task_weights: Mapping[str, str | os.PathLike[str]] | None) -> dict[str, str]:
    """``task_weights`` with every file as a plain path string; anything else is refused."""
    files = {}
    for task, path in (task_weights or {}).items():
        if not isinstance(path, str | os.PathLike):
            raise CrossStitchError(
                f"the file of task {task!r} must be a path, got {path!r}", param="task_weights"
            )
        files[task] = os.fspath(path)
    return files


def check_weight_files(shared: tuple[str, str | None], files: Mapping[str, str]) -> None:
    """Refuse a weights file that is missing: ``shared`` is (option, path or None), ``files``
    the task weights."""
    for param, path in [shared, *(("task_weights", p) for p in files.values())]:
        if path is not None and not os.path.isfile(path):
            raise CrossStitchError(f"{path} does not exist or is not a file", param=param)


def select_stages(available: Sequence[str], stages: Sequence[str] | str | None) -> tuple[str, ...]:
    """The stitched stages in network order; ``None`` or ``"all"`` mean every stage."""
    if stages is None or stages == "all" or list(stages) == ["all"]:
        return tuple(available)
    requested = [stages] if isinstance(stages, str) else list(stages)
    unknown = [str(s) for s in requested if s not in available]
    if unknown:
        raise CrossStitchError(
            f"unknown stage {', '.join(map(repr, unknown))}; stages are: {', '.join(available)} "
            "(or all)",
            param="stages",
        )
    if not requested:
        raise CrossStitchError(
            f"choose at least one stage to stitch from: {', '.join(available)}", param="stages"
        )
    return tuple(s for s in available if s in requested)


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
    """Output shape of each stage for a batch of ``input_size`` images, on the meta device."""
    x = meta_forward(backbone.stem, meta_images(input_size))
    shapes = {}
    for name, stage in backbone.stages.items():
        x = meta_forward(stage, x)
        shapes[name] = x.shape
    return shapes


def stage_infos(shapes: Mapping[str, torch.Size], size: int, layout: str) -> list[StageInfo]:
    """Each stage's name, channels and reduction, from its output shape at a ``size`` input."""
    return [
        StageInfo(
            name,
            shape[channel_dim(layout)],
            nominal_reduction(size, resolution(shape, layout), layout),
        )
        for name, shape in shapes.items()
    ]


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
    ``checkpoint_stages=True`` trades compute for training memory (``crossstitch.recompute``).
    ``model.config`` is the frozen ``CrossStitchConfig`` that describes the model.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        *,
        alpha: float = 0.9,
        beta: float | None = None,
        granularity: str = "channel",
        stages: Sequence[str] | str | None = None,
        heads: Mapping[str, int | nn.Module] | None = None,
        features: str = "last",
        checkpoint_stages: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(models, Mapping):
            raise CrossStitchError(
                f"must map task names to models, got {type(models).__name__}", param="models"
            )
        tasks = check_tasks(list(models))
        heads = check_heads(heads, tasks)
        families = {family_of(m) for m in models.values()}
        if len(families) > 1:
            names = sorted(f.name for f in families)
            raise CrossStitchError(f"all task models must be of one family, got {names}")
        (family,) = families
        if heads:
            check_head_layout(family.name, family.layout)
        fixed = family.fixed_size(next(iter(models.values())))
        config = CrossStitchConfig(
            arch=None,
            family=family.name,
            tasks=tasks,
            alpha=alpha,
            beta=beta,
            granularity=granularity,
            heads={t: h for t, h in heads.items() if isinstance(h, int)},
            features=features,
            input_size=fixed,
            checkpoint_stages=checkpoint_stages,
            preprocess=default_preprocess(fixed, MODULES_SOURCE),
        )
        self.tasks = list(tasks)
        self.layout = family.layout
        self.channel_dim = family.channel_dim
        self.input_size = config.input_size
        self.features = config.features
        self.checkpoint_stages = config.checkpoint_stages
        self.backbones = nn.ModuleDict(
            {task: TaskBackbone(family.split(model)) for task, model in models.items()}
        )
        self.stages = self._stage_info(self.input_size or PROBE_SIZE)
        stitched = select_stages([s.name for s in self.stages], stages)
        self.cross_stitch = nn.ModuleDict(
            {
                s.name: CrossStitchUnit(
                    self.tasks,
                    s.channels,
                    granularity=config.granularity,
                    alpha=config.alpha,
                    beta=config.beta,
                    channel_dim=self.channel_dim,
                )
                for s in self.stages
                if s.name in stitched
            }
        )
        self.heads = build_heads(heads, self.stages[-1].channels)
        self.config = dataclasses.replace(config, stages=stitched)

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

    def check_input_size(self, size: Sequence[int]) -> None:
        """Refuse an input size that a fixed-size model (ViT, MaxViT) cannot take."""
        check_fixed_size(self.config.arch or self.config.family, self.input_size, tuple(size))

    def smallest_export_size(self, at_least: int = 32) -> int:
        """The smallest square input, a multiple of 32 from ``at_least`` up, at which every stage
        has features of at least 2x2: exporters specialise a dimension of size 1, so an artifact
        exported at that size would accept no other. Sizes at which a layer refuses its input
        (a kernel larger than the padded map, as in Inception) count as too small.
        """
        if self.input_size is not None:
            return self.input_size
        backbone = self.backbones[self.tasks[0]]

        def large_enough(size: int) -> bool:
            try:
                shapes = probe_shapes(backbone, (size, size))
            except RuntimeError:
                return False
            return min(resolution(s, self.layout) for s in shapes.values()) >= 2

        size = -(-at_least // 32) * 32
        while not large_enough(size):
            size += 32
            if size > LARGEST_PROBE:
                raise CrossStitchError(
                    f"no input up to {LARGEST_PROBE}x{LARGEST_PROBE} keeps every stage of "
                    f"{self.config.arch} at 2x2 or more"
                )
        return size

    def _stage_info(self, size: int) -> list[StageInfo]:
        per_task = {
            task: probe_shapes(backbone, (size, size)) for task, backbone in self.backbones.items()
        }
        first = per_task[self.tasks[0]]
        for task, shapes in per_task.items():
            if shapes != first:
                raise CrossStitchError(
                    f"the backbone of task {task!r} has other stage shapes than that of "
                    f"{self.tasks[0]!r}; cross-stitching needs identical architectures",
                    param="models",
                )
        return stage_infos(first, size, self.layout)

    @classmethod
    def from_torchvision(
        cls,
        arch: str,
        *,
        tasks: Sequence[str],
        weights: Weights = None,
        alpha: float = 0.9,
        beta: float | None = None,
        granularity: str = "channel",
        stages: Sequence[str] | str | None = None,
        task_weights: Mapping[str, str | os.PathLike[str]] | None = None,
        heads: Mapping[str, int | nn.Module] | None = None,
        output_stride: int = 32,
        features: str = "last",
        checkpoint_stages: bool = False,
    ) -> CrossStitchBackbone:
        """Build from a torchvision architecture name, one copy of the network per task.

        ``weights`` gives every task the same start: torchvision weights by name
        (``"DEFAULT"``, ``"IMAGENET1K_V1"``) or enum (``ResNet50_Weights.DEFAULT``), or a
        classifier state_dict file as a ``pathlib.Path``. ``task_weights`` maps tasks to
        single-task state_dict files applied on top. ``output_stride`` 16 or 8 dilates the last
        stages instead of striding (ResNet family only). ``checkpoint_stages`` recomputes each
        task's stages in backward instead of keeping their activations. Every option is checked
        before anything is built; memory is not (see ``crossstitch.memory.check_build``).
        """
        modules = {t: h for t, h in (heads or {}).items() if isinstance(h, nn.Module)}
        config = torchvision_config(
            arch,
            tasks=tasks,
            weights=weights,
            alpha=alpha,
            beta=beta,
            granularity=granularity,
            stages=stages,
            task_weights=task_weights,
            heads=heads,
            output_stride=output_stride,
            features=features,
            checkpoint_stages=checkpoint_stages,
        )
        return build(config, head_modules=modules)

    @classmethod
    def from_timm(
        cls,
        name: str,
        *,
        tasks: Sequence[str],
        pretrained: bool = False,
        weights_file: str | os.PathLike[str] | None = None,
        alpha: float = 0.9,
        beta: float | None = None,
        granularity: str = "channel",
        stages: Sequence[str] | str | None = None,
        task_weights: Mapping[str, str | os.PathLike[str]] | None = None,
        heads: Mapping[str, int | nn.Module] | None = None,
        features: str = "last",
        checkpoint_stages: bool = False,
    ) -> CrossStitchBackbone:
        """Build from a timm model name (``"resnet50d"``, ``"convnext_atto.d2_in1k"``), one
        features-only timm model per task, cut into stages at its feature points.

        ``pretrained=True`` loads timm's weights (downloaded into its cache); ``weights_file`` and
        ``task_weights`` are timm classifier state_dicts (.pth, .pt or .safetensors), loaded
        with timm's key filters. Needs the ``timm`` extra; see ``crossstitch.timm_backbones``.
        """
        from crossstitch.timm_backbones import build_timm, timm_config

        modules = {t: h for t, h in (heads or {}).items() if isinstance(h, nn.Module)}
        config = timm_config(
            name,
            tasks=tasks,
            pretrained=pretrained,
            weights_file=weights_file,
            alpha=alpha,
            beta=beta,
            granularity=granularity,
            stages=stages,
            task_weights=task_weights,
            heads=heads,
            features=features,
            checkpoint_stages=checkpoint_stages,
        )
        return build_timm(config, head_modules=modules)

    def run(self, x: Tensor, stitch: Stitch | None) -> dict[str, Tensor]:
        """Every task's network stage by stage on ``x``; ``stitch`` recombines the features after
        each stitched stage (``None``: the bare backbones). The one stage loop behind ``forward``,
        the reference formulation and the benchmark's baseline. With ``checkpoint_stages``, a
        training step recomputes each task's stem and stages but the last in backward instead of
        keeping their activations (docs/design.md §12); inference and exports run them plainly.
        """
        recompute = self.checkpoint_stages and self.training and torch.is_grad_enabled()
        names = list(self.backbones[self.tasks[0]].stages)
        feats = {task: run_stage(net.stem, x, recompute) for task, net in self.backbones.items()}
        stitched = {}
        for name in names:
            again = recompute and name != names[-1]
            feats = {
                task: run_stage(net.stages[name], feats[task], again)
                for task, net in self.backbones.items()
            }
            if name in self.cross_stitch:
                if stitch is not None:
                    feats = stitch(name, feats)
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

    def stitch(self, stage: str, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The unit after ``stage`` applied to the task features."""
        return self.cross_stitch[stage](features)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.run(x, self.stitch)


def torchvision_config(
    arch: str,
    *,
    tasks: Sequence[str],
    weights: Weights = None,
    alpha: float = 0.9,
    beta: float | None = None,
    granularity: str = "channel",
    stages: Sequence[str] | str | None = None,
    task_weights: Mapping[str, str | os.PathLike[str]] | None = None,
    heads: Mapping[str, int | nn.Module] | None = None,
    output_stride: int = 32,
    features: str = "last",
    checkpoint_stages: bool = False,
) -> CrossStitchConfig:
    """The config ``from_torchvision`` builds, every option checked; nothing is built or read."""
    if not isinstance(arch, str):
        raise CrossStitchError(f"must be an architecture name, got {arch!r}", param="arch")
    spec = arch_spec(arch)
    tasks = check_tasks(tasks)
    heads = check_heads(heads, tasks)
    if heads:
        check_head_layout(arch, spec.layout)
    check_output_stride(arch, spec.family, output_stride)
    name, weights_file = resolve_weights(arch, weights)
    files = task_weight_paths(task_weights)
    config = CrossStitchConfig(
        arch=arch,
        family=spec.family,
        tasks=tasks,
        alpha=alpha,
        beta=beta,
        granularity=granularity,
        stages=select_stages([s.name for s in spec.stages], stages),
        heads={t: h for t, h in heads.items() if isinstance(h, int)},
        output_stride=output_stride,
        features=features,
        weights=name,
        weights_file=weights_file,
        task_weights=files,
        input_size=spec.input_size,
        checkpoint_stages=checkpoint_stages,
        preprocess=preprocess_for(arch, name, weights_file, spec.input_size),
    )
    check_weight_files(("weights", weights_file), files)
    return config


def build(
    config: CrossStitchConfig,
    *,
    load_weights: bool = True,
    head_modules: Mapping[str, nn.Module] | None = None,
) -> CrossStitchBackbone:
    """The model ``config`` describes, one copy of the classifier per task (timm models: see
    ``crossstitch.timm_backbones.build_timm``).

    ``load_weights=False`` builds the network the named weights imply without loading them, as
    ``crossstitch.load`` does before loading its own; the state_dict files are then not read.
    """
    if config.source == "timm":
        from crossstitch.timm_backbones import build_timm

        return build_timm(config, load_weights=load_weights, head_modules=head_modules)
    if config.arch is None:
        raise CrossStitchError("the config names no architecture to build", param="arch")
    tasks = list(config.tasks)
    files = dict(config.task_weights) if load_weights else {}
    states = {task: load_state_file(path) for task, path in files.items()}
    shared = load_state_file(config.weights_file) if load_weights and config.weights_file else None
    base = build_classifier(config.arch, config.weights, load=load_weights)
    head = family_of(base).head
    if shared is not None:
        apply_state(base, shared, head, f"weights file {config.weights_file}")
    apply_output_stride(base, config.family, config.output_stride)
    models = {task: copy.deepcopy(base) for task in tasks[:-1]}
    models[tasks[-1]] = base
    for task, state in states.items():
        apply_state(models[task], state, head, f"task weights {files[task]}")
    return assemble(models, config, head_modules)


def assemble(
    models: Mapping[str, nn.Module],
    config: CrossStitchConfig,
    head_modules: Mapping[str, nn.Module] | None = None,
) -> CrossStitchBackbone:
    """The model over per-task networks already built for ``config``, which it records."""
    model = CrossStitchBackbone(
        models,
        alpha=config.alpha,
        beta=config.beta,
        granularity=config.granularity,
        stages=config.stages,
        heads={**config.head_channels, **(head_modules or {})},
        features=config.features,
        checkpoint_stages=config.checkpoint_stages,
    )
    model.config = dataclasses.replace(config, input_size=model.input_size)
    return model
