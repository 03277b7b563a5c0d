"""crossstitch: cross-stitch multi-task networks from torchvision architectures.

The public names are imported on first use, so ``import crossstitch`` stays cheap for the CLI.
"""

from importlib import import_module
from importlib.metadata import version
from typing import Any

__version__ = version("crossstitch")

_EXPORTS = {
    "CrossStitchBackbone": "crossstitch.backbone",
    "TaskBackbone": "crossstitch.backbone",
    "CrossStitchUnit": "crossstitch.units",
    "DenseHead": "crossstitch.heads",
    "CrossStitchError": "crossstitch.errors",
    "CrossStitchConfig": "crossstitch.config",
    "StageInfo": "crossstitch.stages",
    "save": "crossstitch.checkpoint",
    "load": "crossstitch.checkpoint",
    "check_parity": "crossstitch.reference",
    "reference_forward": "crossstitch.reference",
    "summarize": "crossstitch.summary",
    "param_groups": "crossstitch.training",
    "fsdp_modules": "crossstitch.training",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'crossstitch' has no attribute '{name}'")
