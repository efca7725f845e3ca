"""Data-parallel training (torchrun, DistributedDataParallel, gloo on the CPU): 2 processes give the
result of 1 process on the same global batch; a run resumed with another number of processes
continues as it would have; only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glas_seg.backend import distributed
from glas_seg.backend.data import PatchDataset
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.registry import build_model

import _ddp_train
from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(folder) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(folder / "last.safetensors")).items()}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def iteration(folder) -> int:
    return json.loads((folder / "state.json").read_text())["state"]["iteration"]


def context(rank: int, world: int) -> distributed.Context:
    return distributed.Context(rank, world, rank, torch.device("cpu"))


def test_ranks_draw_disjoint_shares_of_the_same_global_batch():
    template = PatchDataset(_ddp_train.samples(), 32, (0.5,) * 3, (0.25,) * 3, augment=False)
    whole = next(distributed.slot_batches(template, distributed.rank_slots(4, context(0, 1)), seed=7))
    shares = [next(distributed.slot_batches(template, distributed.rank_slots(4, context(r, 2)), seed=7))
              for r in range(2)]
    assert [distributed.rank_slots(4, context(r, 2)) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert torch.equal(torch.cat([s[0] for s in shares]), whole[0])
    assert torch.equal(torch.cat([s[1] for s in shares]), whole[1])
    assert not torch.equal(shares[0][0], shares[1][0])  # the processes see different crops
    other = next(distributed.slot_batches(template, distributed.rank_slots(4, context(0, 1)), seed=8))
    assert not torch.equal(other[0], whole[0])  # a resumed run (seed + iteration) draws new crops
    with pytest.raises(GlasSegError, match="multiple of the number of processes"):
        distributed.rank_slots(6, context(0, 4))


def test_plain_process_is_not_distributed():
    assert distributed.setup(torch.device("cpu"), environ={}) is None
    with pytest.raises(GlasSegError, match="inconsistent"):
        distributed.setup(torch.device("cpu"), environ={"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def one_process(monkeypatch, *runs) -> None:
    """``_ddp_train`` runs in this process as a torchrun run of 1 process (gloo, world size 1)."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    _ddp_train.main([str(a) for a in runs])


def test_two_processes_match_one_process_and_resume_with_another_count(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    half_one = tmp_path / "half_then_one"
    one_process(monkeypatch, half_one, 4, 2)  # cancelled after 2 of 4 iterations (checkpoint at 2)
    assert iteration(half_one) == 2
    half_two = tmp_path / "half_then_two"
    shutil.copytree(half_one, half_two)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(REPO / "tests" / "_ddp_train.py"),
               str(two), "4", "0", str(half_two), "4", "0"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    one_process(monkeypatch, one, 4, 0, half_one, 4, 0)
    for folder in (one, two, half_one, half_two):
        assert iteration(folder) == 4
    # Same global batch, gradients averaged over 2 processes = 1 process on the whole batch.
    assert largest_difference(weights(one), weights(two)) < 1e-5
    # Resumed with 2 processes instead of 1: the same continuation.
    assert largest_difference(weights(half_one), weights(half_two)) < 1e-5
    # Training moved the weights: the comparisons above are not between untouched networks.
    torch.manual_seed(_ddp_train.settings(4).seed)
    initial = {k: v.detach().numpy() for k, v in build_model(_ddp_train.CONFIG).state_dict().items()}
    assert largest_difference(weights(one), initial) > 1e-3
