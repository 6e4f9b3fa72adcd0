"""``--log tensorboard,wandb,mlflow``: a real training run, read back from what each library wrote
(TensorBoard event files, the W&B offline run file, the MLflow file store), with no network."""

from __future__ import annotations

import json
import struct

import pytest

from conftest import TINY_MODEL, require, tiny
from detrkit.errors import ConfigError
from detrkit.training.config import TrainConfig
from detrkit.training.loggers import parse_loggers
from detrkit.training.run_dir import METRICS
from detrkit.training.trainer import Trainer


def read_wandb_records(path):
    """The records of a ``.wandb`` file: W&B's LevelDB-style log of protobuf ``Record`` messages
    (a 7-byte file header; 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.fixture
def logged_run(tmp_path, data_root, monkeypatch):
    for module in ("tensorboard", "wandb", "mlflow"):
        require(module)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Trainer(tiny(tmp_path, data_root, epochs=2, log="tensorboard,wandb,mlflow")).fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return run, records


def test_every_logger_holds_what_metrics_jsonl_holds(logged_run, monkeypatch):
    run, records = logged_run
    expected_ap = [r["val"]["bbox/AP"] for r in records]
    expected_loss = [r["train"]["loss"] for r in records]
    per_class = sorted(k for k in records[-1]["val"] if k.startswith("bbox/AP_per_class/"))
    assert per_class

    # TensorBoard: the event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("bbox/AP")] == pytest.approx(expected_ap)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(expected_loss)
    assert set(per_class) <= set(events.Tags()["scalars"])
    images = [t for t in events.Tags()["images"] if t.startswith("val/image_")]
    assert images and len(events.Images(images[0])) == 2  # one per evaluation

    # W&B (offline): the run file.
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records_wandb = read_wandb_records(wandb_file)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records_wandb
        if r.WhichOneof("record_type") == "history"
    ]
    with_ap = [h for h in history if "bbox/AP" in h]
    assert [h["bbox/AP"] for h in with_ap] == pytest.approx(expected_ap)
    assert [h["_step"] for h in with_ap] == [1, 2]
    assert any(k.startswith("val/image_") and k.endswith("/_type") for h in history for k in h)
    (config,) = [r.run.config for r in records_wandb if r.WhichOneof("record_type") == "run"][:1]
    values = {item.key: json.loads(item.value_json) for item in config.update}
    values = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in values.items()}
    assert values["lr"] == 1e-4 and values["model.d_model"] == TINY_MODEL["d_model"]

    # MLflow: the file store in the run folder.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").resolve().as_uri())
    run_id = json.loads((run / "loggers.json").read_text())["mlflow"]
    history = client.get_metric_history(run_id, "bbox/AP")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(expected_ap)
    assert client.get_run(run_id).data.params["lr"] == "0.0001"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_resumed_run_continues_the_same_tracker_runs(logged_run, monkeypatch):
    run, _ = logged_run
    ids = json.loads((run / "loggers.json").read_text())
    trainer = Trainer(TrainConfig(output_dir=str(run)), resume=True, overrides={"epochs": 3})
    trainer.fit()
    assert json.loads((run / "loggers.json").read_text()) == ids
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    history = MlflowClient((run / "mlruns").resolve().as_uri()).get_metric_history(
        ids["mlflow"], "train/loss"
    )
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert {p.name.rsplit("-", 1)[1] for p in run.glob("wandb/offline-run-*")} == {ids["wandb"]}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", ()),
        ("tensorboard", ("tensorboard",)),
        (" TensorBoard, mlflow,tensorboard", ("tensorboard", "mlflow")),
    ],
)
def test_logger_names(text, expected):
    assert parse_loggers(text) == expected


def test_an_unknown_logger_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="log='neptune': unknown logger"):
        TrainConfig(log="neptune")
