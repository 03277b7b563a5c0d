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

from crossstitch.errors import CrossStitchError

GRANULARITIES = ("channel", "layer")
FEATURES = ("last", "all")
OUTPUT_STRIDES = (8, 16, 32)
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_]+")
# The input of every exported graph: a task of that name would collide with it.
RESERVED_TASKS = ("image",)
FLOAT32_MAX = 3.4028234663852886e38
MAX_CHANNELS = 2**31 - 1
MAX_INPUT_SIZE = 65536
MAX_SEED = 2**63 - 1


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
class CrossStitchConfig:
    """Everything that defines a cross-stitch model, enough to rebuild it offline.

    ``arch`` is the torchvision architecture (None for a model built from your own modules);
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
            "arch": check_name(self.arch, "arch", STAGE_NAME, optional=True),
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
        for name, value in fields.items():
            object.__setattr__(self, name, value)

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
        )
        return raw

    @classmethod
    def from_dict(cls, raw: object, source: str) -> CrossStitchConfig:
        """Read a stored config (checkpoint, artifact metadata), upgrading older ones.

        Fields missing from files written by older versions take the defaults above (``family``
        comes from the architecture); unknown keys are ignored. Every problem is refused with one
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

            values.setdefault("family", arch_spec(values["arch"]).family)
            return cls(**values)
        except CrossStitchError as exc:
            field = exc.param or "arch"
            raise CrossStitchError(f"{source}: config field '{field}' {exc.detail}") from exc
