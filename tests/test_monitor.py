"""The monitored metric: checkpoint_best by --monitor, early stopping by --patience / --min-delta,
the count carried through --resume, and per-class AP in metrics.jsonl."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny
from detrkit.checkpoints.io import torch_load_safe
from detrkit.errors import ConfigError
from detrkit.training.config import TrainConfig
from detrkit.training.loop import TrainState
from detrkit.training.monitor import Monitor, monitored_key
from detrkit.training.run_dir import BEST, LAST, METRICS
from detrkit.training.trainer import Trainer


def records(tmp_path):
    lines = (tmp_path / "run" / METRICS).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_monitor_counts_evaluations_without_improvement_like_keras_early_stopping():
    monitor, state = Monitor("bbox/AP", patience=2, min_delta=0.01), TrainState()
    outcomes = [monitor.update({"bbox/AP": v}, state) for v in (0.10, 0.105, 0.30, 0.305, 0.306)]
    assert [best for best, _ in outcomes] == [True, True, True, True, True]  # every rise is the best so far
    # ...but only rises of more than min_delta reset the count: 0.105 and 0.305, 0.306 do not.
    assert [stop is not None for _, stop in outcomes] == [False, False, False, False, True]
    assert state.evals_without_improvement == 2 and state.patience_best == pytest.approx(0.30)
    assert "bbox/AP has not improved by more than 0.01 in 2 evaluations" in outcomes[-1][1]


def test_a_loss_is_minimised():
    monitor, state = Monitor("val/loss", patience=1), TrainState()
    assert monitor.update({"val/loss": 2.0}, state) == (True, None)
    assert monitor.update({"val/loss": 1.5}, state) == (True, None)
    best, stop = monitor.update({"val/loss": 1.7}, state)
    assert not best and stop is not None and "best 1.5000" in stop
    assert state.best_metric == -1.5


@pytest.mark.parametrize(
    "monitor,panoptic,masks,key",
    [
        ("auto", False, False, "bbox/AP"),
        ("auto", True, True, "panoptic/PQ"),
        ("AP50", False, False, "bbox/AP50"),
        ("PQ", True, True, "panoptic/PQ"),
        ("segm/AP", False, True, "segm/AP"),
        ("loss", False, False, "val/loss"),
        ("bbox/AP_per_class/circle", False, False, "bbox/AP_per_class/circle"),
    ],
)
def test_monitor_names(monitor, panoptic, masks, key):
    assert monitored_key(monitor, panoptic=panoptic, masks=masks) == key


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"monitor": "segm/AP"}, "monitor='segm/AP': this run's evaluation gives bbox/AP"),
        ({"monitor": "PQ"}, "monitor='PQ'"),
        ({"monitor": "bbox/APx"}, "monitor='bbox/APx'"),
        ({"patience": 0}, "patience=0: must be at least 1"),
        ({"min_delta": -0.1}, "min_delta=-0.1"),
        ({"min_delta": math.inf}, "min_delta=inf"),
    ],
)
def test_bad_monitor_options_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TrainConfig(**fields)


def test_patience_ends_the_run_says_why_and_resume_goes_on_counting(tmp_path, data_root):
    # AP cannot rise by 0.5 on this data in a few tiny epochs: after the first evaluation, none improves.
    messages = []
    trainer = Trainer(tiny(tmp_path, data_root, epochs=8, patience=2, min_delta=0.5), log=messages.append)
    trainer.fit()
    assert trainer.state.epoch == 3  # evaluation 1 sets the best; 2 and 3 do not improve on it
    last = records(tmp_path)[-1]
    assert last["epoch"] == 3 and "has not improved by more than 0.5 in 2 evaluations" in last["stop"]
    assert any("early stop" in m for m in messages)
    saved = torch_load_safe(tmp_path / "run" / LAST)["state"]
    assert saved["evals_without_improvement"] == 2 and saved["stop_reason"]

    # The same patience again: nothing to train, and nothing written.
    before = (tmp_path / "run" / LAST).read_bytes()
    with pytest.raises(ConfigError, match="ended early at epoch 3"):
        Trainer(TrainConfig(output_dir=str(tmp_path / "run")), resume=True).fit()
    assert (tmp_path / "run" / LAST).read_bytes() == before
    # One more evaluation of patience: the count goes on from 2, so one more epoch ends it.
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path / "run")), resume=True, overrides={"patience": 3})
    trainer.fit()
    assert trainer.state.epoch == 4 and "in 3 evaluations" in records(tmp_path)[-1]["stop"]


def test_monitor_picks_the_best_checkpoint_and_per_class_ap_is_logged(tmp_path, data_root):
    Trainer(tiny(tmp_path, data_root, epochs=3, monitor="val/loss")).fit()
    evaluations = [r for r in records(tmp_path) if "val" in r]
    losses = [r["val"]["val/loss"] for r in evaluations]
    best_epoch = evaluations[losses.index(min(losses))]["epoch"]
    assert best_epoch != 1  # else this test could not tell val/loss from the AP ties of epoch 1
    assert torch_load_safe(tmp_path / "run" / BEST)["state"]["epoch"] == best_epoch
    # Per-class AP of each evaluation, under the class names of the data.
    val = evaluations[-1]["val"]
    per_class = {k: v for k, v in val.items() if k.startswith("bbox/AP_per_class/")}
    assert per_class and all(0 <= v <= 1 for v in per_class.values())
    names = torch_load_safe(tmp_path / "run" / LAST)["detrkit_config"]["class_names"]
    assert {k.removeprefix("bbox/AP_per_class/") for k in per_class} <= set(names)


def test_a_changed_monitor_is_refused_on_resume(tmp_path, data_root):
    Trainer(tiny(tmp_path, data_root, epochs=1)).fit()
    with pytest.raises(ConfigError, match="monitor='val/loss' would compare with the best value of another"):
        Trainer(TrainConfig(output_dir=str(tmp_path / "run")), resume=True, overrides={"monitor": "val/loss"})


def test_a_per_class_monitor_of_an_unknown_class_is_refused_before_training(tmp_path, data_root):
    with pytest.raises(ConfigError, match="no class 'hexagon' in the data"):
        Trainer(tiny(tmp_path, data_root, monitor="bbox/AP_per_class/hexagon"))
    assert not (tmp_path / "run" / LAST).exists()


def test_a_per_class_monitor_of_a_class_absent_from_validation_is_refused(tmp_path, data_root):
    import json
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    path = root / "annotations/instances_val2017.json"
    data = json.loads(path.read_text())
    gone = data["categories"][0]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != gone["id"]]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"the validation set has no '{gone['name']}' object"):
        Trainer(tiny(tmp_path, root, monitor=f"bbox/AP_per_class/{gone['name']}"))
