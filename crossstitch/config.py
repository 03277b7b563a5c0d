"""A model's configuration: one frozen, typed record, checked once, read from files in one place.

Every field is checked when the record is made, whether from a builder's parameters or from a
file, so a model is never built from values of the wrong type or range (docs/design.md §4).
Older files lack newer fields; ``CrossStitchConfig.from_dict`` fills them from the field
defaults below, which are the only place those defaults live. torch is imported only to
check task names against ``nn.Module`` attributes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crossstitch.errors import CONTROL, CrossStitchError

GRANULARITIES = ("channel", "layer")
FEATURES = ("last", "all")
OUTPUT_STRIDES = (8, 16, 32)
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A timm model name, optionally with its pretrained tag after one dot: ``resnet50d.a1_in1k``.
TIMM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)?")
VERSION_TEXT = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
SOURCES = ("torchvision", "timm")
WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_]+")
# The input of every exported graph: a task of that name would collide with it.
RESERVED_TASKS = ("image",)
FLOAT32_MAX = 3.4028234663852886e38
MAX_CHANNELS = 2**31 - 1
MAX_INPUT_SIZE = 65536
MAX_SEED = 2**63 - 1
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The share of the resized image that the center crop keeps by default (224 of 256).
DEFAULT_CROP_PCT = 0.875
MAX_SOURCE = 200


def default_beta(alpha: float, num_tasks: int) -> float:
    """Off-diagonal init that makes every row of a unit a convex combination."""
    return (1.0 - alpha) / (num_tasks - 1)


def check_tasks(tasks: object) -> tuple[str, ...]:
    """At least two distinct names, each usable as a module key and an output name."""
    if isinstance(tasks, str | bytes) or not isinstance(tasks, Sequence):
        got = f"the string {tasks!r}" if isinstance(tasks, str) else type(tasks).__name__
        raise CrossStitchError(f"must be a list of task names, got {got}", param="tasks")
    bad = [t for t in tasks if not isinstance(t, str)]
    if bad:
        raise CrossStitchError(f"task names must be strings, got {bad[0]!r}", param="tasks")
    if len(tasks) < 2:
        raise CrossStitchError(
            f"a cross-stitch network needs two or more, got {list(tasks)}", param="tasks"
        )
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise CrossStitchError(
            f"names must be distinct; repeated: {', '.join(repeated)}", param="tasks"
        )
    for task in tasks:
        if not TASK_NAME.fullmatch(task):
            raise CrossStitchError(
                f"invalid name {task!r}: use letters, digits, '_' and '-', not starting with a "
                "digit or '-'",
                param="tasks",
            )
        if task in RESERVED_TASKS:
            raise CrossStitchError(
                f"the name {task!r} is reserved: it names the input of exported models",
                param="tasks",
            )
        if _is_module_attribute(task):
            raise CrossStitchError(
                f"the name {task!r} is reserved by torch.nn.Module; rename it", param="tasks"
            )
    return tuple(tasks)


def _is_module_attribute(name: str) -> bool:
    """Whether ``name`` is taken by ``nn.Module`` (a module dict cannot use it as a key)."""
    from torch import nn

    return name.startswith("_") or hasattr(nn.ModuleDict(), name)


def check_number(value: object, param: str) -> float:
    """A real number that float32 unit weights can hold."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CrossStitchError(f"must be a number, got {value!r}", param=param)
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise CrossStitchError(
            f"must be a finite number within float32 range (±3.4e38), got {value!r}", param=param
        )
    return float(value)


def check_int(value: object, param: str, low: int, high: int) -> int:
    """An integer (not a bool) from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CrossStitchError(
            f"must be an integer from {low} to {high}, got {value!r}", param=param
        )
    return value


def check_choice(value: object, param: str, choices: Sequence[Any]) -> Any:
    """One of ``choices``, of their type."""
    if value not in choices or type(value) is not type(choices[0]):
        options = ", ".join(map(str, choices))
        raise CrossStitchError(f"must be one of {options}, got {value!r}", param=param)
    return value


def check_name(value: object, param: str, pattern: re.Pattern[str], optional: bool) -> str | None:
    """A plain identifier-like name (no markup, no control characters), or None if allowed."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise CrossStitchError(f"is not a valid name: {value!r}", param=param)
    return value


def _pairs(value: object, param: str) -> tuple[tuple[str, Any], ...]:
    """A mapping (or a sequence of pairs) as a tuple of ``(key, value)`` pairs, keys strings."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in value)
    ):
        items = [tuple(p) for p in value]
    else:
        raise CrossStitchError(f"must map task names to values, got {value!r}", param=param)
    return tuple((k, v) for k, v in items)


@dataclass(frozen=True)
class Preprocess:
    """The input transform a model's weights expect, applied to RGB images scaled to [0, 1].

    Resize the shorter side to ``resize`` pixels (``interpolation``), center-crop ``crop``
    pixels square, subtract ``mean`` and divide by ``std`` per channel (R, G, B). ``source``
    says where the values come from: the named weights, or ImageNet defaults for random init.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    source: str = "ImageNet defaults (random init)"

    def __post_init__(self) -> None:
        check_int(self.resize, "preprocess.resize", 1, MAX_INPUT_SIZE)
        check_int(self.crop, "preprocess.crop", 1, MAX_INPUT_SIZE)
        check_choice(self.interpolation, "preprocess.interpolation", INTERPOLATIONS)
        for param in ("mean", "std"):
            value = getattr(self, param)
            if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
                raise CrossStitchError(
                    f"must be three numbers (R, G, B), got {value!r}", param=f"preprocess.{param}"
                )
            numbers = tuple(check_number(v, f"preprocess.{param}") for v in value)
            if param == "std" and not all(v > 0 for v in numbers):
                raise CrossStitchError(f"must be positive, got {value!r}", param="preprocess.std")
            object.__setattr__(self, param, numbers)
        if (
            not isinstance(self.source, str)
            or len(self.source) > MAX_SOURCE
            or CONTROL.search(self.source)
            or "[" in self.source
        ):
            raise CrossStitchError(
                f"must be a short plain text, got {self.source!r}", param="preprocess.source"
            )

    @classmethod
    def from_crop(
        cls,
        crop: int,
        *,
        source: str,
        crop_pct: float = DEFAULT_CROP_PCT,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> Preprocess:
        """The transform for a ``crop``-pixel input that keeps ``crop_pct`` of the resized image:
        resize to ``floor(crop / crop_pct)`` (224 and the default 0.875 give 256).
        """
        check_int(crop, "preprocess.crop", 1, MAX_INPUT_SIZE)
        if isinstance(crop_pct, bool) or not (
            isinstance(crop_pct, int | float) and 0 < crop_pct <= 1
        ):
            raise CrossStitchError(
                f"must be a number in (0, 1], got {crop_pct!r}", param="preprocess.crop_pct"
            )
        resize = math.floor(crop / crop_pct)
        return cls(resize, crop, mean, std, interpolation, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: the tuples as lists."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw: object) -> Preprocess:
        """Read a stored transform; unknown keys are ignored, missing ones take the defaults."""
        if isinstance(raw, Preprocess):
            return raw
        if not isinstance(raw, Mapping):
            raise CrossStitchError(f"must be an object, got {raw!r}", param="preprocess")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class CrossStitchConfig:
    """Everything that defines a cross-stitch model, enough to rebuild it offline.

    ``arch`` is the torchvision architecture, or with ``source="timm"`` the timm model name
    (None for a model built from your own modules); ``library_version`` the timm version a
    timm model was built with;
    ``stages`` the stitched stages in network order; ``heads`` pairs of (task, output channels);
    ``input_size`` the one square size a fixed-size model takes (None: any size).
    """

    arch: str | None
    family: str
    tasks: tuple[str, ...]
    alpha: float = 0.9
    beta: float | None = None
    granularity: str = "channel"
    stages: tuple[str, ...] = ()
    heads: tuple[tuple[str, int], ...] = ()
    output_stride: int = 32
    features: str = "last"
    weights: str | None = None
    weights_file: str | None = None
    task_weights: tuple[tuple[str, str], ...] = ()
    input_size: int | None = None
    seed: int | None = None
    preprocess: Preprocess = Preprocess()
    checkpoint_stages: bool = False
    source: str = "torchvision"
    library_version: str | None = None

    def __post_init__(self) -> None:
        tasks = check_tasks(self.tasks)
        alpha = check_number(self.alpha, "alpha")
        beta = default_beta(alpha, len(tasks)) if self.beta is None else self.beta
        heads = _pairs(self.heads, "heads")
        task_weights = _pairs(self.task_weights, "task_weights")
        for param, pairs in (("heads", heads), ("task_weights", task_weights)):
            unknown = [str(t) for t, _ in pairs if t not in tasks]
            if unknown:
                raise CrossStitchError(
                    f"given for unknown task {', '.join(unknown)}; tasks are {', '.join(tasks)}",
                    param=param,
                )
            if len({t for t, _ in pairs}) != len(pairs):
                raise CrossStitchError("names a task twice", param=param)
        for task, channels in heads:
            if (
                isinstance(channels, bool)
                or not isinstance(channels, int)
                or not (1 <= channels <= MAX_CHANNELS)
            ):
                raise CrossStitchError(
                    f"the head of task {task!r} must be a number of channels from 1 to "
                    f"{MAX_CHANNELS}, got {channels!r}",
                    param="heads",
                )
        for task, path in task_weights:
            if not isinstance(path, str):
                raise CrossStitchError(
                    f"the file of task {task!r} must be a path", param="task_weights"
                )
        if isinstance(self.stages, str) or not isinstance(self.stages, Sequence):
            raise CrossStitchError(
                f"must be a list of stage names, got {self.stages!r}", param="stages"
            )
        fields = {
            "source": check_choice(self.source, "source", SOURCES),
            "arch": check_name(
                self.arch, "arch", TIMM_NAME if self.source == "timm" else STAGE_NAME, True
            ),
            "library_version": check_name(
                self.library_version, "library_version", VERSION_TEXT, optional=True
            ),
            "family": check_name(self.family, "family", STAGE_NAME, optional=False),
            "tasks": tasks,
            "alpha": alpha,
            "beta": check_number(beta, "beta"),
            "granularity": check_choice(self.granularity, "granularity", GRANULARITIES),
            "stages": tuple(
                check_name(s, "stages", STAGE_NAME, optional=False) for s in self.stages
            ),
            "heads": tuple(sorted(heads, key=lambda pair: tasks.index(pair[0]))),
            "output_stride": check_choice(self.output_stride, "output_stride", OUTPUT_STRIDES),
            "features": check_choice(self.features, "features", FEATURES),
            "weights": check_name(self.weights, "weights", WEIGHTS_NAME, optional=True),
            "task_weights": tuple(sorted(task_weights, key=lambda pair: tasks.index(pair[0]))),
        }
        if self.weights_file is not None and not isinstance(self.weights_file, str):
            raise CrossStitchError("must be a path or None", param="weights_file")
        if self.input_size is not None:
            check_int(self.input_size, "input_size", 1, MAX_INPUT_SIZE)
        if self.seed is not None:
            check_int(self.seed, "seed", 0, MAX_SEED)
        fields["preprocess"] = Preprocess.from_dict(self.preprocess)
        fields["checkpoint_stages"] = check_choice(
            self.checkpoint_stages, "checkpoint_stages", (False, True)
        )
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def model_name(self) -> str:
        """The model's name as the CLI takes it: ``timm/NAME`` for a timm model."""
        return f"timm/{self.arch}" if self.source == "timm" else str(self.arch)

    @property
    def head_channels(self) -> dict[str, int]:
        """The heads as a dict: task to number of output channels."""
        return dict(self.heads)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values: tuples as lists, pairs as objects."""
        raw = dataclasses.asdict(self)
        raw.update(
            tasks=list(self.tasks),
            stages=list(self.stages),
            heads=dict(self.heads),
            task_weights=dict(self.task_weights),
            preprocess=self.preprocess.to_dict(),
        )
        return raw

    @classmethod
    def from_dict(cls, raw: object, source: str) -> CrossStitchConfig:
        """Read a stored config (checkpoint, artifact metadata), upgrading older ones.

        Fields missing from files written by older versions take the defaults above (``family``
        comes from the architecture, ``preprocess`` from the weights, as a build records it);
        unknown keys are ignored. Every problem is refused with one
        message that names ``source`` and the field.
        """
        if not isinstance(raw, Mapping):
            raise CrossStitchError(f"{source} has no config")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for required in ("arch", "tasks", "alpha", "beta", "granularity", "stages"):
            if required not in values:
                raise CrossStitchError(f"{source}: config field '{required}' is missing")
        try:
            if not isinstance(values["arch"], str):
                raise CrossStitchError(f"must be an architecture name, got {values['arch']!r}")
            from crossstitch.stages import arch_spec

            if values.get("source") != "timm":
                values.setdefault("family", arch_spec(values["arch"]).family)
            elif "family" not in values:
                raise CrossStitchError("is missing", param="family")
            config = cls(**values)
            if "preprocess" in values:
                return config
            from crossstitch.weights import preprocess_for

            recorded = preprocess_for(
                config.arch, config.weights, config.weights_file, config.input_size
            )
            return dataclasses.replace(config, preprocess=recorded)
        except CrossStitchError as exc:
            field = exc.param or "arch"
            raise CrossStitchError(f"{source}: config field '{field}' {exc.detail}") from exc
