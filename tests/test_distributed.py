"""Data-parallel training in two real processes (gloo, CPU): one SGD step on half a batch each.

DDP averages the gradients of the two halves (FSDP2 reduce-scatters them), so afterwards both
ranks hold the same parameters, equal to those of one process that trained on the whole batch.
Batch norm is frozen (eval mode, as when fine-tuning with small per-device batches): in training
mode each rank would normalise with its own half's statistics, which no single process on the
whole batch reproduces, and ``SyncBatchNorm`` runs on GPUs only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers import image
from ranks import BATCH, CASES, SIZE, TIMEOUT, WORLD, model_for, sgd_step, worker


def _spawn(target, store: Path, results: Path) -> None:
    """Run ``target`` on two ranks; kill both if they outlive ``TIMEOUT``; re-raise a failure."""
    context = mp.start_processes(
        target, args=(str(store), str(results)), nprocs=WORLD, join=False, start_method="spawn"
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
    _spawn(worker, folder / "store", folder)
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_end_identical_and_equal_to_one_process_on_the_whole_batch(trained, case):
    ranks = [torch.load(trained / f"{case}.{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    single = model_for(CASES[case])
    before = {name: p.detach().clone() for name, p in single.named_parameters()}
    sgd_step(single, single, image(batch=BATCH, size=SIZE))
    moved = [name for name, p in single.named_parameters() if not torch.equal(p, before[name])]
    assert set(moved) == set(ranks[0])  # every parameter trained, none left out
    for name, p in single.named_parameters():
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
