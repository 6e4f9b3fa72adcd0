"""torchrun with 2 CPU processes (gloo) against one process with the same global batch."""

import json
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from detrkit.data import SynthConfig, write_synthetic

MODEL = [
    "--set",
    'model.backbone="resnet18"',
    "--set",
    "model.d_model=32",
    "--set",
    "model.nheads=4",
    "--set",
    "model.enc_layers=1",
    "--set",
    "model.dec_layers=2",
    "--set",
    "model.dim_feedforward=64",
    "--set",
    "model.num_queries=6",
    "--set",
    "model.dropout=0.0",
    "--set",
    "augment=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(launcher, out, data, batch_size):
    cmd = [
        *launcher,
        "train",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        str(batch_size),
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        "--seed",
        "3",
        "--image-scale",
        "0.1",
        "--device",
        "cpu",
        *MODEL,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]), result.stdout


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    # Square images of one size: no padding, one batch of 4 either way, no augmentation.
    data = write_synthetic(
        tmp_path / "data", SynthConfig(images=4, seed=5, min_size=80, max_size=80), {"train": 4, "val": 3}
    )
    single, _ = _train([sys.executable, "-m", "detrkit"], tmp_path / "one", data, batch_size=4)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "detrkit",
    ]
    double, stdout = _train(torchrun, tmp_path / "two", data, batch_size=2)
    assert "2 process(es)" in stdout
    assert single["step"] == double["step"] == 1
    # L1/GIoU are normalised by the box count averaged over processes: identical sums.
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert double["train"][key] == pytest.approx(single["train"][key], rel=1e-4), key
    # The weighted cross-entropy is a per-process mean (as in the original), so only close.
    assert double["train"]["loss"] == pytest.approx(single["train"]["loss"], rel=0.05)
    # Evaluation gathered all 3 validation images from both processes.
    assert "bbox/AP" in double["val"]
