"""torchrun with 2 CPU processes (gloo) against one process with the same global batch.

Each check here fails if DDP or the gathering of evaluation results is taken out: the weights of
two processes only equal one process's when the gradients are averaged, and the metrics only cover
every validation image when both shards are gathered.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from detrkit.checkpoints.io import torch_load_safe
from detrkit.data import SynthConfig, write_synthetic

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

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


def _torchrun() -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "detrkit",
    ]


def _train(launcher, out, data, batch_size, *extra):
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
        *extra,
    ]
    # A hang (ranks whose collectives no longer pair up) fails here instead of blocking the suite;
    # the whole process group goes, torchrun's workers included.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd[:8])} ... did not finish in 150 s (ranks out of step?)")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return record, torch_load_safe(out / "checkpoint_last.pth")["model"], stdout


@pytest.fixture(scope="module")
def square_data(tmp_path_factory):
    # Square images of one size: no padding differences between batch layouts, no augmentation.
    # 8 training images: 2 optimizer steps of 4; 5 validation images: shards of 3 and 2 on 2 ranks.
    root = tmp_path_factory.mktemp("square")
    return write_synthetic(
        root, SynthConfig(images=8, seed=5, min_size=80, max_size=80), {"train": 8, "val": 5}
    )


@pytest.fixture(scope="module")
def single(square_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return _train([sys.executable, "-m", "detrkit"], out, square_data, 4)


def _assert_same_weights(a: dict, b: dict, lr: float = 1e-4, steps: int = 2) -> None:
    """Equal to 1e-5 but for a few elements. AdamW's first steps move each weight by about
    ``lr * sign(gradient)``, so a gradient element close to zero that rounds differently in the two
    batch layouts (float32 convolutions over 2 vs 4 images) moves the other way: measured, ~0.01%
    of the weights, never more than 2 * lr * steps. Without DDP each process follows its own half
    of the data and ~18% of the weights differ by more than 1e-5."""
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in floats])
    assert (diffs > 1e-5).float().mean().item() < 1e-3
    assert diffs.max().item() <= 2 * lr * steps * 1.01


def test_two_processes_train_and_evaluate_like_one(square_data, single, tmp_path):
    one, one_weights, _ = single
    two, two_weights, stdout = _train(_torchrun(), tmp_path / "two", square_data, 2)
    assert "2 process(es)" in stdout
    assert one["step"] == two["step"] == 2
    # Same images per step, gradients averaged by DDP: the same weights after both steps.
    _assert_same_weights(one_weights, two_weights)
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert two["train"][key] == pytest.approx(one["train"][key], rel=1e-4), key
    # Evaluation: 5 images on 2 ranks (uneven shards) finish, every image is evaluated once, and
    # the gathered metrics equal one process's.
    assert one["val"]["images"] == two["val"]["images"] == 5
    for key, value in one["val"].items():
        if key.startswith("bbox/"):
            assert two["val"][key] == pytest.approx(value, abs=1e-6), key


def test_gradient_accumulation_across_processes_equals_the_global_batch(square_data, single, tmp_path):
    """2 processes x 2 accumulated micro-batches of 1 image == 1 process with batches of 4."""
    one, one_weights, _ = single
    two, two_weights, _ = _train(_torchrun(), tmp_path / "accum", square_data, 1, "--grad-accum", "2")
    assert two["step"] == 2
    _assert_same_weights(one_weights, two_weights)
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-4)


def test_a_rank_without_images_neither_hangs_nor_loses_an_image(tmp_path):
    """1 validation image on 2 ranks (one gets none), and training batches that are unreadable on
    one rank only: the run finishes, skips those steps on both ranks, evaluates the one image."""
    data = write_synthetic(
        tmp_path / "data", SynthConfig(images=8, seed=5, min_size=80, max_size=80), {"train": 8, "val": 1}
    )
    for name in ("000002.jpg", "000005.jpg", "000007.jpg"):
        (data / "train2017" / name).write_bytes(b"not a jpeg")
    record, _, _ = _train(_torchrun(), tmp_path / "run", data, 1)
    # Batch size 1 per rank: 4 steps; a step where either rank drew a broken file is skipped.
    assert 0 < record["step"] < 4
    assert record["val"]["images"] == 1


def test_query_groups_and_ema_under_ddp_equal_one_process(square_data, tmp_path):
    """The aid wrapper under DDP (its extra queries' gradients averaged too), and the EMA of the
    model inside it: two processes end where one process with the global batch ends."""
    aids = ("--query-groups", "2", "--ema-decay", "0.5")
    one, one_weights, _ = _train([sys.executable, "-m", "detrkit"], tmp_path / "one", square_data, 4, *aids)
    two, two_weights, _ = _train(_torchrun(), tmp_path / "two", square_data, 2, *aids)
    assert one["step"] == two["step"] == 2
    # "model" holds the EMA average: equal averages of equal weights.
    _assert_same_weights(one_weights, two_weights)
    assert two["train"]["loss_bbox"] == pytest.approx(one["train"]["loss_bbox"], rel=1e-4)


def test_denoising_under_ddp_gets_its_targets(square_data, tmp_path):
    # DDP wraps the aid: the loop must still pass the targets through to it (else it refuses).
    record, _, _ = _train(_torchrun(), tmp_path / "dn", square_data, 2, "--denoising-groups", "2")
    assert record["step"] == 2 and record["train"]["loss_bbox_dn"] > 0


def _clock_worker(rank: int, port: int, out: str) -> None:
    from detrkit.training.schedule import per_step_factor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        factor = per_step_factor(
            "linear", 1.0, epochs=100, steps_per_epoch=10, max_steps=None, budget_seconds=100.0,
            step=lambda: 0, trained_seconds=lambda: 20.0 + 40.0 * rank, device=torch.device("cpu"),
        )  # fmt: skip
        value = factor()
    finally:
        dist.destroy_process_group()
    with open(f"{out}/{rank}", "w") as f:
        f.write(repr(value))


def test_under_a_time_budget_all_processes_take_the_same_learning_rate(tmp_path):
    # Their clocks differ (20 s and 60 s trained): all follow the furthest, or their weights drift.
    torch.multiprocessing.spawn(_clock_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    factors = [float((tmp_path / str(rank)).read_text()) for rank in (0, 1)]
    assert factors == [pytest.approx(0.4), pytest.approx(0.4)]
