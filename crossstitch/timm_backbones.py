"""timm backbones: one timm model per task, cut into stages at its feature points.

A timm model states its stages as data (``feature_info``); ``timm.create_model(name,
features_only=True)`` runs them as one sequence of modules for most models. That sequence is cut
after each feature point, so with identity units each task's stage outputs are the
features-only model's outputs bit for bit (docs/design.md §4). Models whose features are not
taken along one sequence (multi-branch HRNet, forward hooks, ViT-style getters) are refused with
the reason before anything is built. timm is imported inside the functions only: it is an
optional dependency, and ``import crossstitch`` must stay cheap.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from crossstitch.config import (
    INTERPOLATIONS,
    TIMM_NAME,
    CrossStitchConfig,
    Preprocess,
    check_tasks,
)
from crossstitch.errors import CrossStitchError, first_line
from crossstitch.stages import StageInfo

PREFIX = "timm/"
MISSING = 'timm is not installed; pip install "crossstitch[timm]"'
# Feature extractors that timm builds for one family and that run their blocks in order:
# the stem's children, then one block after another, features after the stem (stage 0) or after
# the blocks that end a stage.
BLOCK_FEATURES = ("EfficientNetFeatures", "MobileNetV3Features")
SEQUENTIAL_FEATURES = ("FeatureListNet", "FeatureDictNet")
WHY_NOT = {
    "FeatureGetterNet": "its features come from a getter (forward_intermediates) inside one "
    "network, as for ViT and LeViT: crossstitch does not split those blocks into stages",
    "FeatureHookNet": "its features are taken by forward hooks inside modules, not at the end of "
    "a module on one sequential path",
    "HighResolutionNetFeatures": "its stages run several resolution branches side by side "
    "(multi-branch, as HRNet): its features do not lie on one sequential path",
}


def import_timm() -> ModuleType:
    """The timm package, or one error saying how to install it."""
    try:
        import timm
    except ImportError as exc:
        raise CrossStitchError(MISSING) from exc
    return timm


def timm_name(arch: str) -> str | None:
    """The timm model name in ``timm/NAME``, or None for a torchvision architecture name."""
    return arch[len(PREFIX) :] if arch.startswith(PREFIX) else None


def check_name(name: object) -> str:
    """A timm model name timm knows, with an optional pretrained tag; else a "did you mean".
    The CLI's ``timm/`` prefix is accepted and dropped."""
    if isinstance(name, str) and name.startswith(PREFIX):
        name = name[len(PREFIX) :]
    if not isinstance(name, str) or not TIMM_NAME.fullmatch(name):
        raise CrossStitchError(
            f"not a timm model name: {name!r} (letters, digits and '_', an optional .tag)",
            param="arch",
        )
    timm = import_timm()
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base.lower(), timm.list_models(), n=3, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(PREFIX + c for c in close)}?"
            if close
            else "run `crossstitch list --timm PATTERN` to search them"
        )
        raise CrossStitchError(f"unknown timm model {base!r}; {hint}", param="arch")
    if tag:
        tagged = timm.list_pretrained(f"{base}.*")
        if name not in tagged:
            known = ", ".join(t.partition(".")[2] for t in tagged) or "none"
            raise CrossStitchError(
                f"{base} has no pretrained tag {tag!r}; its tags: {known}", param="arch"
            )
    return name


@dataclass(frozen=True)
class Plan:
    """How a timm model is stitched: its family, layout, fixed input size and stages, and the
    bytes of one features-only copy's weights."""

    name: str
    family: str
    layout: str
    input_size: int | None
    stages: tuple[StageInfo, ...]
    pretrained_cfg: Mapping[str, Any]
    weights_bytes: int


def family_name(name: str) -> str:
    """``timm_<module>``: the timm module that defines the model, e.g. ``timm_resnet``."""
    timm = import_timm()
    module = timm.models.model_entrypoint(name.partition(".")[0]).__module__
    return "timm_" + module.rsplit(".", 1)[-1]


def layout_of(features: Any) -> str:
    """How the feature maps are laid out: ``nchw``, or ``nhwc`` (Swin); tokens are refused."""
    fmt = getattr(features, "output_fmt", None)
    fmt = str(getattr(fmt, "value", fmt) or "NCHW")
    if fmt in ("NCHW", "NHWC"):
        return fmt.lower()
    raise CrossStitchError(f"its features are {fmt} tokens, not feature maps", param="arch")


def _flat_children(module: Any) -> list[tuple[str, Any]]:
    """Children in order, one level of ``nn.Sequential`` flattened as ``outer_inner``."""
    from torch import nn

    layers = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            layers += [(f"{name}_{inner}", grand) for inner, grand in child.named_children()]
        else:
            layers.append((name, child))
    return layers


def cut_points(features: Any) -> tuple[list[tuple[str, Any]], list[str]]:
    """The features-only model's modules in order and the names after which features are
    taken; a model whose features do not lie on that one path is refused with the reason."""
    kind = type(features).__name__
    if kind in SEQUENTIAL_FEATURES:
        if getattr(features, "concat", False):
            raise CrossStitchError(
                "its feature points return several tensors that timm concatenates", param="arch"
            )
        return list(features.items()), list(features.return_layers)
    if kind in BLOCK_FEATURES and getattr(features, "feature_hooks", None) is None:
        layers = _flat_children(features)
        stem = [name for name, _ in layers if not name.startswith("blocks_")]
        points = [
            stem[-1] if stage == 0 else f"blocks_{stage - 1}"
            for stage in (info["stage"] for info in features.feature_info.get_dicts())
        ]
        return layers, points
    reason = WHY_NOT.get(kind) or (
        f"timm computes its features in its own forward ({kind}), not along one sequence of "
        "modules that can be cut into stages"
    )
    raise CrossStitchError(reason, param="arch")


def stage_modules(features: Any) -> OrderedDict[str, Any]:
    """The features-only model cut after each feature point, each stage an ``nn.Sequential``
    named after the module that ends it (dots as ``_``, as timm's own features modules do)."""
    from torch import nn

    layers, points = cut_points(features)
    names = [name for name, _ in layers]
    missing = [p for p in points if p not in names]
    if missing or [p for p in names if p in points] != points:
        raise CrossStitchError(
            f"its feature points ({', '.join(points)}) are not in the order of its modules",
            param="arch",
        )
    stages: OrderedDict[str, Any] = OrderedDict()
    group: OrderedDict[str, Any] = OrderedDict()
    for name, module in layers:
        group[name] = module
        if name in points:
            stages[name] = nn.Sequential(group)
            group = OrderedDict()
        if len(stages) == len(points):
            break
    return stages


def create(name: str, **kwargs: Any) -> Any:
    """``timm.create_model(name, features_only=True, ...)``; failures of timm itself are refused
    with their first line."""
    timm = import_timm()
    try:
        return timm.create_model(name, features_only=True, **kwargs)
    except CrossStitchError:
        raise
    except Exception as exc:
        raise CrossStitchError(
            f"timm could not build {name} ({type(exc).__name__}: {first_line(exc, 200)})",
            param="arch",
        ) from exc


def plan(name: str) -> Plan:
    """Everything needed to stitch ``name``, found on the meta device: nothing is allocated and
    no weight is read. Refuses a model that cannot be cut into stages, with the reason."""
    import torch

    from crossstitch.backbone import PROBE_SIZE, stage_infos
    from crossstitch.memory import weights_bytes
    from crossstitch.shapes import meta_forward, meta_images

    name = check_name(name)
    with torch.device("meta"):
        features = create(name)
    stages = stage_modules(features)
    layout = layout_of(features)
    cfg = dict(features.pretrained_cfg)
    input_size = cfg["input_size"][-1] if cfg.get("fixed_input_size") else None
    x = meta_images((input_size or PROBE_SIZE,) * 2)
    shapes = {}
    for stage, module in stages.items():
        x = meta_forward(module, x)
        if not isinstance(x, torch.Tensor):
            raise CrossStitchError(
                f"its stage {stage} returns a {type(x).__name__}, not one feature map",
                param="arch",
            )
        shapes[stage] = x.shape
    infos = stage_infos(shapes, input_size or PROBE_SIZE, layout)
    return Plan(
        name, family_name(name), layout, input_size, tuple(infos), cfg, weights_bytes(features)
    )


def preprocess_of(
    cfg: Mapping[str, Any], pretrained: bool, input_size: int | None = None
) -> Preprocess:
    """The input transform of the weights timm's pretrained config describes; ImageNet
    defaults for random init, cropped to the one size a fixed-size model takes."""
    if not pretrained:
        from crossstitch.weights import default_preprocess

        return default_preprocess(input_size)
    interpolation = cfg.get("interpolation", "bilinear")
    tag = f".{cfg['tag']}" if cfg.get("tag") else ""
    return Preprocess.from_crop(
        int(cfg["input_size"][-1]),
        source=f"timm {cfg.get('architecture', '')}{tag}",
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        mean=cfg.get("mean", Preprocess.mean),
        std=cfg.get("std", Preprocess.std),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
    )


def timm_config(
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
    heads: Mapping[str, Any] | None = None,
    features: str = "last",
    checkpoint_stages: bool = False,
) -> CrossStitchConfig:
    """The config ``from_timm`` builds, every option checked; only meta tensors are made."""
    from crossstitch.backbone import check_weight_files, select_stages, task_weight_paths
    from crossstitch.heads import check_heads
    from crossstitch.stages import check_head_layout

    timm = import_timm()
    tasks = check_tasks(tasks)
    heads = check_heads(heads, tasks)
    if pretrained not in (False, True):
        raise CrossStitchError(f"must be True or False, got {pretrained!r}", param="pretrained")
    if pretrained and weights_file is not None:
        raise CrossStitchError("give either pretrained=True or a weights_file, not both")
    files = task_weight_paths(task_weights)
    if weights_file is not None and not isinstance(weights_file, str | os.PathLike):
        raise CrossStitchError(f"must be a path, got {weights_file!r}", param="weights_file")
    shared = os.fspath(weights_file) if weights_file is not None else None
    check_weight_files(("weights_file", shared), files)
    found = plan(name)
    if heads:
        check_head_layout(PREFIX + name, found.layout)
    return CrossStitchConfig(
        arch=found.name,
        family=found.family,
        tasks=tasks,
        alpha=alpha,
        beta=beta,
        granularity=granularity,
        stages=select_stages([s.name for s in found.stages], stages),
        heads={t: h for t, h in heads.items() if isinstance(h, int)},
        features=features,
        weights="pretrained" if pretrained else None,
        weights_file=shared,
        task_weights=files,
        input_size=found.input_size,
        preprocess=preprocess_of(
            found.pretrained_cfg, pretrained or shared is not None, found.input_size
        ),
        checkpoint_stages=checkpoint_stages,
        source="timm",
        library_version=timm.__version__,
    )


def read_state(path: str) -> dict[str, Any]:
    """A timm state_dict file read as data only (``crossstitch.weights.load_state_file``:
    safetensors, or a checked ``torch.save`` archive with ``weights_only=True``)."""
    from crossstitch.weights import load_state_file

    return load_state_file(path)


def create_loaded(
    name: str, state: Mapping[str, Any] | None, source: str | None, param: str = "weights_file"
) -> Any:
    """The features-only model with a classifier state_dict loaded the way timm loads its own
    pretrained files: timm's key filter for the model, then a strict load."""
    if state is None:
        return create(name)
    try:
        return import_timm().create_model(
            name,
            features_only=True,
            pretrained=True,
            pretrained_cfg_overlay={"state_dict": dict(state)},
        )
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CrossStitchError(
            f"{source} does not fit timm model {name} ({first_line(exc, 300)})",
            param=param,
        ) from exc


def create_pretrained(name: str) -> Any:
    """The features-only model with timm's own pretrained weights, downloaded if not cached."""
    timm = import_timm()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry messages would bury the one error below
    try:
        return timm.create_model(name, features_only=True, pretrained=True)
    except Exception as exc:
        raise CrossStitchError(
            f"timm's pretrained weights for {name} are neither in its cache nor downloadable "
            f"({type(exc).__name__}); download them where you are online, or pass the "
            "classifier's state_dict file as weights_file (--weights-file PATH)"
        ) from exc
    finally:
        hub_log.setLevel(level)


def build_timm(
    config: CrossStitchConfig,
    *,
    load_weights: bool = True,
    head_modules: Mapping[str, Any] | None = None,
) -> Any:
    """The model a timm ``config`` describes: one features-only timm model per task, cut into
    stages. Tasks without a file of their own start from one copy of the same weights.

    ``load_weights=False`` builds the architecture only, as ``crossstitch.load`` does.
    """
    from crossstitch.backbone import assemble
    from crossstitch.families import Family, Staged, split_staged

    if config.arch is None:
        raise CrossStitchError("the config names no timm model to build", param="arch")
    name = check_name(config.arch)
    own = dict(config.task_weights) if load_weights else {}
    files = {p: read_state(p) for p in dict.fromkeys(own.values())}
    if load_weights and config.weights_file:
        base = create_loaded(name, read_state(config.weights_file), config.weights_file)
    elif load_weights and config.weights == "pretrained":
        base = create_pretrained(name)
    else:
        base = create(name)
    layout = layout_of(base)
    family = Family(
        config.family,
        Staged,
        split_staged,
        head=(),
        layout=layout,
        fixed_size=lambda model: config.input_size,
    )
    models = {}
    for task in config.tasks:
        if task in own:
            features = create_loaded(name, files[own[task]], own[task], "task_weights")
        else:
            features = base if task == config.tasks[-1] else copy.deepcopy(base)
        models[task] = Staged(stage_modules(features), family)
    return assemble(models, config, head_modules)


def pads_from_input_size(model: Any) -> bool:
    """Whether ``model`` holds timm's TensorFlow-style "same" padding layers (the ``tf_``
    models), which compute every pad from the input's height and width with ``math.ceil``."""
    from timm.layers import AvgPool2dSame, Conv2dSame, ScaledStdConv2dSame, StdConv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    same = (AvgPool2dSame, Conv2dSame, MaxPool2dSame, ScaledStdConv2dSame, StdConv2dSame)
    return any(isinstance(module, same) for module in model.modules())


@dataclass(frozen=True)
class Listed:
    """One timm model as ``crossstitch list --timm`` shows it: its stages, or why it is refused."""

    name: str
    family: str | None
    input_size: int | None
    stages: tuple[StageInfo, ...]
    refused: str | None


def matching(pattern: str) -> list[str]:
    """timm model names matching a shell-style ``pattern``; none is refused with the closest."""
    if len(pattern) > 100 or not pattern.isprintable():
        raise CrossStitchError(f"not a model name pattern: {pattern!r}", param="pattern")
    timm = import_timm()
    names = timm.list_models(pattern)
    if not names:
        close = difflib.get_close_matches(pattern.lower(), timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "try a wildcard, e.g. 'resnet*'"
        raise CrossStitchError(f"no timm model matches {pattern!r}; {hint}", param="pattern")
    return names


def describe(name: str) -> Listed:
    """``name``'s stages found on the meta device, or the reason it cannot be stitched."""
    try:
        found = plan(name)
    except CrossStitchError as exc:
        return Listed(name, None, None, (), exc.detail)
    return Listed(name, found.family, found.input_size, found.stages, None)
