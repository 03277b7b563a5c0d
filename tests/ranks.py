"""The training step each rank of tests/test_distributed.py runs, in a module of its own.

Spawned processes unpickle the worker by its module's name, so it lives in a plain module on the
test path rather than in the test file (which pytest imports under a package name the children
cannot import).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import crossstitch
from helpers import build, image, randomize_units

DDP_CASES = {
    "all-features": {"features": "all"},
    "heads-on-some-tasks": {"heads": {"seg": 3}},
    "layer-units": {"granularity": "layer"},
    "checkpointed-stages": {"checkpoint_stages": True, "heads": {"depth": 1}},
}
FSDP_CASES = {"fsdp2": {"features": "all", "heads": {"seg": 3}}}
CASES = {**DDP_CASES, **FSDP_CASES}
WORLD = 2
BATCH, SIZE = 4, 32
TIMEOUT = 240  # seconds for both processes, start-up included


def model_for(options: dict) -> crossstitch.CrossStitchBackbone:
    """The same start on every rank: seeded build, non-trivial units, frozen batch norm."""
    model = build("resnet18", **options).train()
    randomize_units(model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def sgd_step(model: nn.Module, params: nn.Module, x: torch.Tensor) -> None:
    """One SGD step (the paper's fast units) on the mean over the batch of every output."""
    optimizer = torch.optim.SGD(crossstitch.param_groups(params, lr=0.05, unit_lr_mult=10.0))
    sum(o.square().mean() for o in model(x).values()).backward()
    optimizer.step()


def worker(rank: int, store: str, results: str) -> None:
    """Each case on this rank's half of the batch; writes the parameters after the step."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    try:
        half = image(batch=BATCH, size=SIZE).chunk(WORLD)[rank]
        for case, options in DDP_CASES.items():
            model = model_for(options)
            ddp = DistributedDataParallel(model, find_unused_parameters=False)
            sgd_step(ddp, ddp, half)
            state = {name: p.detach() for name, p in model.named_parameters()}
            torch.save(state, Path(results) / f"{case}.{rank}.pt")
        for case, options in FSDP_CASES.items():
            model = model_for(options)
            for module in crossstitch.fsdp_modules(model):
                fully_shard(module)
            fully_shard(model)
            sgd_step(model, model, half)
            state = {name: whole(p) for name, p in model.named_parameters()}
            torch.save(state, Path(results) / f"{case}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: FSDP2 holds each rank's shard as a ``DTensor``."""
    value = param.full_tensor() if isinstance(param, DTensor) else param
    return value.detach()
