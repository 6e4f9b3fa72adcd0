"""The box count that normalises the losses is averaged over processes (2 gloo processes on CPU)."""

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_config
from detrkit import build_criterion
from test_criterion import random_outputs, random_targets

COUNTS = {0: (2,), 1: (4,)}


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        criterion = build_criterion(tiny_config(aux_loss=False))
        outputs = random_outputs(batch=1, layers=1, seed=rank)
        targets = random_targets(counts=COUNTS[rank], seed=rank)
        results[rank] = criterion(outputs, targets)["loss_bbox"].item()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_num_boxes_is_averaged_across_processes():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    criterion = build_criterion(tiny_config(aux_loss=False))
    for rank, counts in COUNTS.items():
        single = criterion(
            random_outputs(batch=1, layers=1, seed=rank), random_targets(counts=counts, seed=rank)
        )
        # Single process: divided by its own count; distributed: by the mean count (2 + 4) / 2 = 3.
        assert results[rank] == pytest.approx(single["loss_bbox"].item() * counts[0] / 3, rel=1e-5)
