"""Data-parallel training in two real processes (gloo, CPU): one SGD step on half a batch each.

DDP averages the gradients of the two halves (FSDP2 reduce-scatters them), so afterwards both
ranks hold the same parameters, equal to those of one process that trained on the whole batch.
Batch norm is
frozen (eval mode, as when fine-tuning with small per-device batches): in training mode each
rank would normalise with its own half's statistics, which no single process on the whole batch
reproduces, and ``SyncBatchNorm`` runs on GPUs only.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def _model(options: dict) -> crossstitch.CrossStitchBackbone:
    """The same start on every rank: seeded build, non-trivial units, frozen batch norm."""
    model = build("resnet18", **options).train()
    randomize_units(model)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def _sgd_step(model: nn.Module, params: nn.Module, x: torch.Tensor) -> None:
    """One SGD step (the paper's fast units) on the mean over the batch of every output."""
    optimizer = torch.optim.SGD(crossstitch.param_groups(params, lr=0.05, unit_lr_mult=10.0))
    sum(o.square().mean() for o in model(x).values()).backward()
    optimizer.step()


def _worker(rank: int, store: str, results: str) -> None:
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
            model = _model(options)
            ddp = DistributedDataParallel(model, find_unused_parameters=False)
            _sgd_step(ddp, ddp, half)
            state = {name: p.detach() for name, p in model.named_parameters()}
            torch.save(state, Path(results) / f"{case}.{rank}.pt")
        for case, options in FSDP_CASES.items():
            model = _model(options)
            for module in crossstitch.fsdp_modules(model):
                fully_shard(module)
            fully_shard(model)
            _sgd_step(model, model, half)
            state = {name: _whole(p) for name, p in model.named_parameters()}
            torch.save(state, Path(results) / f"{case}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: FSDP2 holds each rank's shard as a ``DTensor``."""
    value = param.full_tensor() if isinstance(param, DTensor) else param
    return value.detach()


def _spawn(worker, store: Path, results: Path) -> None:
    """Run ``worker`` on two ranks; kill both if they outlive ``TIMEOUT``; re-raise a failure."""
    context = mp.start_processes(
        worker, args=(str(store), str(results)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} training processes did not finish in {TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The folder of ``CASE.RANK.pt`` parameter files, after one step on two processes."""
    folder = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, folder / "store", folder)
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_end_identical_and_equal_to_one_process_on_the_whole_batch(trained, case):
    ranks = [torch.load(trained / f"{case}.{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    single = _model(CASES[case])
    before = {name: p.detach().clone() for name, p in single.named_parameters()}
    _sgd_step(single, single, image(batch=BATCH, size=SIZE))
    moved = [name for name, p in single.named_parameters() if not torch.equal(p, before[name])]
    assert set(moved) == set(ranks[0])  # every parameter trained, none left out
    for name, p in single.named_parameters():
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
