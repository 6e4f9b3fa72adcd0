"""Training runs end to end on tiny synthetic data: checkpoints, exact resume, overrides,
non-finite losses, fine-tuning, evaluation, plotting."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import detrkit
import detrkit.cli
from conftest import TINY_MODEL, require, tiny
from detrkit.checkpoints.io import torch_load_safe
from detrkit.errors import ConfigError
from detrkit.training.config import TrainConfig, build_config
from detrkit.training.loop import TrainingError
from detrkit.training.run_dir import BEST, LAST, METRICS
from detrkit.training.trainer import Trainer


def test_a_run_writes_everything(tmp_path, data_root):
    messages = []
    metrics = Trainer(tiny(tmp_path, data_root), log=messages.append).fit()
    run = tmp_path / "run"
    for name in (LAST, BEST, METRICS, "final_metrics.json", "train_config.json"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all("val" in r for r in records)
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(records[0]["train"])
    # Seconds of the epoch's training, within its share of the whole run's training time.
    assert all(0.0 < r["time"] <= r["train_seconds"] + 1.0 for r in records)
    assert records[0]["train_seconds"] < records[1]["train_seconds"]
    assert 0.0 <= metrics["bbox/AP"] <= 1.0 and "val/loss" in metrics
    model = detrkit.load_model(run / BEST)
    assert model.config.class_names == ("rectangle", "ellipse", "triangle", "diamond")
    assert model.config.category_ids == (1, 2, 4, 7)
    assert model.config.extra["image_scale"] == 0.12
    assert any("AP" in m for m in messages)


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, data_root):
    # The learning rate drops after epoch 2 and the run is killed after epoch 1: a scheduler that is
    # not restored drops it at the wrong time. With EMA, both the average and the raw weights must
    # come back.
    epochs = 4
    extra = dict(lr_drop=2, ema_decay=0.5)
    Trainer(tiny(tmp_path / "a", data_root, epochs=epochs, output_dir=str(tmp_path / "a"), **extra)).fit()

    out = tmp_path / "b"
    cmd = [
        sys.executable,
        "-m",
        "detrkit",
        "train",
        "--data",
        str(data_root),
        "--output-dir",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--eval-every",
        "1",
        "--seed",
        "0",
        "--image-scale",
        "0.12",
        "--set",
        "lr_drop=2",
        "--set",
        "ema_decay=0.5",
        *sum((["--set", f"model.{k}={json.dumps(v)}"] for k, v in TINY_MODEL.items()), []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / LAST).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = torch_load_safe(out / LAST)["epoch"]
    assert interrupted_at < epochs, "the run finished before it could be interrupted"

    assert detrkit.cli.main(["train", "--resume", "--output-dir", str(out)]) == 0
    assert torch_load_safe(out / LAST)["epoch"] == epochs
    for key in ("model", "train_model"):  # the EMA average and the raw training weights
        a, b = torch_load_safe(tmp_path / "a" / LAST)[key], torch_load_safe(out / LAST)[key]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), (
            f"resumed run differs from the uninterrupted one ({key})"
        )


def test_resume_applies_and_reports_explicit_overrides(tmp_path, data_root, capsys):
    Trainer(tiny(tmp_path, data_root, epochs=1)).fit()
    messages = []
    trainer = Trainer(
        TrainConfig(output_dir=str(tmp_path / "run")),
        resume=True,
        overrides={"lr": 5e-5, "epochs": 2},
        log=messages.append,
    )
    assert trainer.config.lr == 5e-5 and trainer.config.epochs == 2 and trainer.config.batch_size == 4
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(1e-5)  # backbone lr unchanged
    assert any("lr 0.0001 -> 5e-05" in m for m in messages)
    trainer.fit()
    assert trainer.state.epoch == 2


def test_non_finite_losses_are_skipped_then_stop_training(tmp_path, data_root, monkeypatch):
    Trainer(tiny(tmp_path, data_root, epochs=1)).fit()
    before = (tmp_path / "run" / LAST).read_bytes()

    import detrkit.training.trainer as trainer_module

    real = trainer_module.build_criterion

    def poisoned(config):
        criterion = real(config)
        forward = criterion.forward

        def nan_forward(outputs, targets, *args):
            losses = forward(outputs, targets, *args)
            losses["loss_ce"] = losses["loss_ce"] * float("nan")
            return losses

        criterion.forward = nan_forward
        return criterion

    monkeypatch.setattr(trainer_module, "build_criterion", poisoned)
    trainer = Trainer(
        TrainConfig(output_dir=str(tmp_path / "run")),
        resume=True,
        overrides={"epochs": 3, "max_bad_steps": 2},
        log=lambda m: None,
    )
    with (
        pytest.warns(UserWarning, match=r"non-finite loss .* image ids \[\d+"),
        pytest.raises(TrainingError, match="2 consecutive non-finite losses"),
    ):
        trainer.fit()
    assert (tmp_path / "run" / LAST).read_bytes() == before, "the last good checkpoint was touched"


def test_fine_tune_with_other_classes_and_queries(tmp_path, data_root):
    source = detrkit.build_model(detrkit.DetrConfig(**{**TINY_MODEL, "num_classes": 91, "num_queries": 9}))
    detrkit.save_model(source, tmp_path / "coco.safetensors")
    messages = []
    trainer = Trainer(
        tiny(
            tmp_path,
            data_root,
            init_from=str(tmp_path / "coco.safetensors"),
            epochs=1,
            model={"num_queries": 5},
        ),
        log=messages.append,
    )
    assert trainer.model.config.num_classes == 4 and trainer.model.config.num_queries == 5
    assert any("class head re-initialised" in m and "91" in m for m in messages)
    assert any("object queries re-initialised: 9 -> 5" in m for m in messages)
    assert torch.equal(trainer.model.backbone.body.conv1.weight, source.backbone.body.conv1.weight)


def test_freeze_backbone_and_mask_training(tmp_path, data_root):
    cfg = tiny(
        tmp_path, data_root, epochs=1, freeze_backbone=True, model={**TINY_MODEL, "nheads": 8, "masks": True}
    )
    trainer = Trainer(cfg, log=lambda m: None)
    assert len(trainer.optimizer.param_groups) == 1
    metrics = trainer.fit()
    assert "segm/AP" in metrics and "bbox/AP" in metrics


def test_eval_cli_writes_results_with_dataset_ids(tmp_path, data_root, capsys):
    Trainer(tiny(tmp_path, data_root, epochs=1), log=lambda m: None).fit()
    out = tmp_path / "eval"
    code = detrkit.cli.main(
        [
            "eval",
            "--weights",
            str(tmp_path / "run" / LAST),
            "--data",
            str(data_root),
            "--out",
            str(out),
            "--num-workers",
            "0",
        ]
    )
    assert code == 0
    assert "bbox" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 4, 7}
    assert {r["image_id"] for r in results} == {1, 2, 3, 4}
    assert json.loads((out / "metrics.json").read_text())["bbox/AP"] >= 0


def test_eval_on_synthetic_data_uses_the_class_set_the_model_names(tmp_path):
    # A model fine-tuned on the "other" shapes is evaluated on those (on the basic shapes, whose
    # ids it does not know, evaluation would refuse or score nothing). `--split val` means val2017.
    config = detrkit.DetrConfig(
        **{**TINY_MODEL, "num_classes": 4},
        class_names=("cross", "ring", "hexagon", "half-disc"),
        category_ids=(3, 5, 6, 8),
    )
    detrkit.save_model(detrkit.build_model(config), tmp_path / "other.safetensors")
    out = tmp_path / "eval"
    args = ["eval", "--weights", str(tmp_path / "other.safetensors"), "--data", "synthetic", "--split", "val"]
    assert detrkit.cli.main([*args, "--out", str(out), "--num-workers", "0"]) == 0
    (data,) = out.glob("synthetic-*/annotations/instances_val2017.json")
    assert [c["name"] for c in json.loads(data.read_text())["categories"]][:4] == list(config.class_names)
    assert json.loads((out / "metrics.json").read_text())["images"] == 16


def test_plot(tmp_path, data_root):
    Trainer(tiny(tmp_path, data_root, epochs=2), log=lambda m: None).fit()
    assert detrkit.cli.main(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_files_presets_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nmodel:\n  num_queries: 30\n")
    (tmp_path / "c.toml").write_text("epochs = 7\n[model]\nnum_queries = 30\n")
    for name in ("c.yaml", "c.toml"):
        cfg = build_config("cpu-tiny", tmp_path / name, {"lr": 3e-4, "model.dec_layers": 3})
        assert (cfg.epochs, cfg.lr, cfg.model["num_queries"], cfg.model["dec_layers"]) == (7, 3e-4, 30, 3)
        assert cfg.model["backbone"] == "resnet18"  # from the preset
    with pytest.raises(ValueError, match="unknown training option"):
        build_config(overrides={"epoch": 3})
    with pytest.raises(ValueError, match="unknown DetrConfig field"):
        build_config(overrides={"model.num_query": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("detr-r18")


def test_bf16_autocast_ema_and_gradient_accumulation(tmp_path, data_root):
    cfg = tiny(tmp_path, data_root, epochs=1, amp="bf16", ema_decay=0.9, grad_accum=2, batch_size=2)
    trainer = Trainer(cfg, log=lambda m: None)
    metrics = trainer.fit()
    assert trainer.state.step == 2  # 8 images / batch 2 = 4 batches, 2 per optimizer step
    assert trainer.ema is not None and int(trainer.ema.n_averaged) == 2
    assert "bbox/AP" in metrics
    saved = torch_load_safe(tmp_path / "run" / LAST)
    assert saved["ema"] is not None


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, data_root, monkeypatch):
    trainer = Trainer(tiny(tmp_path, data_root, epochs=1), log=lambda m: None)
    trainer.fit()
    path = tmp_path / "run" / LAST
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(LAST)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"
    monkeypatch.undo()
    assert detrkit.load_model(path).config.num_classes == 4


def test_unreadable_training_images_are_skipped_warned_once_and_counted(tmp_path, data_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "train2017" / "000003.jpg").write_bytes(b"")  # zero bytes
    jpeg = (root / "train2017" / "000005.jpg").read_bytes()
    (root / "train2017" / "000005.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # truncated
    messages = []
    Trainer(tiny(tmp_path, root, epochs=2, eval_every=0), log=messages.append).fit()
    warned = [m for m in messages if m.startswith("skipping ")]
    assert len(warned) == 2 and any("000003.jpg: empty file" in m for m in warned)
    counts = [m for m in messages if m.startswith("skipped ")]
    assert len(counts) == 2 and all("skipped 2 sample(s) this epoch" in m for m in counts)


def test_panoptic_training_reports_pq(tmp_path, data_root):
    model = {**TINY_MODEL, "d_model": 32, "nheads": 8}  # the mask head needs d_model + nheads % 8 == 0
    messages = []
    metrics = Trainer(
        tiny(tmp_path, data_root, panoptic=True, epochs=1, model=model), log=messages.append
    ).fit()
    for key in ("panoptic/PQ", "panoptic/SQ", "panoptic/RQ", "panoptic/PQ_th", "panoptic/PQ_st"):
        assert key in metrics and -1.0 <= metrics[key] <= 1.0
    assert any("PQ" in m and "things" in m for m in messages)  # the final table
    loaded = detrkit.load_model(tmp_path / "run" / LAST)
    assert loaded.config.masks and loaded.config.stuff_ids == (100, 101)
    assert loaded.config.category_ids == (1, 2, 4, 7, 100, 101)
    assert "stuff" in " ".join(messages)
    # ... and `detrkit eval --panoptic` scores the checkpoint the same way.
    code = detrkit.cli.main(
        [
            "eval",
            "--weights",
            str(tmp_path / "run" / LAST),
            "--data",
            str(data_root),
            "--panoptic",
            "--num-workers",
            "0",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert code == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["panoptic/PQ"] == pytest.approx(metrics["panoptic/PQ"], abs=1e-6)


def test_backbone_pretraining_stage(tmp_path, data_root):
    messages = []
    cfg = tiny(tmp_path, data_root, epochs=1, backbone_pretrain_steps=3, eval_every=0)
    torch.manual_seed(0)
    trainer = Trainer(cfg, log=messages.append)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.fit()
    after = trainer.model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "layer4" in k)
    assert any("backbone pretraining: step 3/3" in m for m in messages)
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert "pretrain" in records[0] and records[0]["pretrain"]["seconds"] > 0
    assert records[-1]["train_seconds"] >= records[0]["train_seconds"]
    state = torch_load_safe(tmp_path / "run" / LAST)["state"]
    assert state["backbone_pretrained"] is True
    # A resumed run does not pretrain again.
    messages.clear()
    Trainer(
        TrainConfig(output_dir=cfg.output_dir), resume=True, overrides={"epochs": 2}, log=messages.append
    ).fit()
    assert not any("backbone pretraining" in m for m in messages)


def test_time_budget_counts_training_minutes_not_evaluation(tmp_path, data_root, monkeypatch):
    # Evaluation is made slow (1.2 s a time) and the budget is 1 s of training: counting wall time,
    # the run would stop after its second epoch with about half of that trained.
    evaluate = Trainer.evaluate

    def slow_evaluate(self):
        time.sleep(1.2)
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    budget = 1.0 / 60
    Trainer(tiny(tmp_path, data_root, epochs=20, time_budget=budget), log=lambda m: None).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    trained = [r["train_seconds"] for r in records]
    # The epoch that crosses the budget is the last. (An epoch here trains in well under 1 s.) The
    # log rounds seconds to 0.01, so 0.996 s trained reads as 1.0: hence the half-hundredth margin.
    rounding = 0.005
    assert len(trained) >= 2 and all(t < 60 * budget + rounding for t in trained[:-1]), trained
    assert trained[-1] >= 60 * budget - rounding, trained
    # Resuming a run whose budget is spent says so instead of training on; one that ended by its
    # epochs has nothing to do and is not refused.
    with pytest.raises(ConfigError, match="time_budget=0.0166667: this run has already trained"):
        Trainer(TrainConfig(output_dir=str(tmp_path / "run")), resume=True, log=lambda m: None).fit()
    done = len(trained)
    resumed = Trainer(
        TrainConfig(output_dir=str(tmp_path / "run")),
        resume=True,
        overrides={"epochs": done},
        log=lambda m: None,
    )
    resumed.fit()
    assert resumed.state.epoch == done


@pytest.mark.parametrize("schedule,fraction", [("linear", 1.0), ("cosine", 1.0), ("linear", 0.5)])
def test_per_step_schedules_decay_to_zero_as_torchs_schedulers_do(tmp_path, data_root, schedule, fraction):
    config = tiny(
        tmp_path, data_root, epochs=4, eval_every=0, lr=2e-3, lr_backbone=5e-4, lr_schedule=schedule,
        lr_decay_fraction=fraction,
    )  # fmt: skip
    trainer = Trainer(config, log=lambda m: None)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    trainer.fit()
    steps = 4 * 2  # 8 training images in batches of 4
    decay_steps = round(steps * fraction)  # constant before them
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if schedule == "linear":
        scheduler = torch.optim.lr_scheduler.LinearLR(reference, 1.0, 0.0, total_iters=decay_steps)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=decay_steps)
    expected = [1.0] * (steps - decay_steps)
    for _ in range(decay_steps):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    assert len(seen) == steps
    for (lr, lr_backbone), factor in zip(seen, expected, strict=True):
        assert lr == pytest.approx(2e-3 * factor, abs=1e-9) and lr_backbone == pytest.approx(
            5e-4 * factor, abs=1e-9
        )


def test_under_a_time_budget_the_schedule_follows_the_clock(tmp_path, data_root):
    config = tiny(tmp_path, data_root, epochs=1000, time_budget=1.0, lr_schedule="linear")
    trainer = Trainer(config, log=lambda m: None)
    trainer.state.train_seconds = 15.0
    factor = trainer.lr_factor(time.time() - 15.0, batches=2)
    assert factor() == pytest.approx(0.5, abs=0.01)  # 30 of 60 seconds trained
    trainer.state.step = 1800  # of 2000 by the epochs: now the steps are further along than the clock
    assert factor() == pytest.approx(0.1, abs=1e-6)
    assert Trainer(tiny(tmp_path / "b", data_root), log=lambda m: None).lr_factor(0.0, 2) is None  # "step"
    with pytest.raises(ConfigError, match="lr_schedule='warm': expected one of step, linear, cosine"):
        tiny(tmp_path, data_root, lr_schedule="warm")


def test_backbone_pretraining_never_overwrites_trained_weights(tmp_path, data_root):
    # A run that trained without the stage, resumed with it switched on, keeps its weights.
    cfg = tiny(tmp_path, data_root, epochs=1, eval_every=0)
    Trainer(cfg, log=lambda m: None).fit()
    messages = []
    Trainer(
        TrainConfig(output_dir=cfg.output_dir),
        resume=True,
        overrides={"epochs": 2, "backbone_pretrain_steps": 3},
        log=messages.append,
    ).fit()
    assert any("backbone pretraining skipped: DETR training has already started" in m for m in messages)
    assert not any("backbone pretraining: step" in m for m in messages)
    with pytest.raises(ConfigError, match="backbone_pretrain_steps=-1"):
        tiny(tmp_path, data_root, backbone_pretrain_steps=-1)


def test_backbone_pretraining_needs_masks(tmp_path, data_root):
    root = tmp_path / "boxes-only"
    shutil.copytree(data_root, root)
    path = root / "annotations" / "instances_train2017.json"
    coco = json.loads(path.read_text())
    for annotation in coco["annotations"]:
        annotation["segmentation"] = []  # as in many box-only exports
    path.write_text(json.dumps(coco))
    cfg = tiny(tmp_path, root, epochs=1, backbone_pretrain_steps=3, eval_every=0)
    with pytest.raises(ConfigError, match="needs instance masks.*have no segmentation"):
        Trainer(cfg, log=lambda m: None).fit()


def test_dense_pretraining_targets_follow_the_feature_grid():
    from detrkit.data.collate import Batch
    from detrkit.training.pretrain import dense_targets

    masks = torch.zeros(2, 20, 20, dtype=torch.bool)
    masks[0, 16:20, 0:8] = True  # class 1: the top half of cell (2, 0), whose bottom half is outside
    masks[1, 16:20, 0:8] = True  # class 0 on the very same pixels: overlap is scaled down
    masks[1, 0:8, 8:12] = True  # ... and half of cell (0, 1)
    batch = Batch(
        torch.zeros(1, 3, 20, 20),
        torch.zeros(1, 20, 20, dtype=torch.bool),
        [{"masks": masks, "labels": torch.tensor([1, 0])}],
    )
    t = dense_targets(batch, num_classes=2, size=(3, 3), stride=8)[0]  # cells of 8 px: 24 > 20
    assert t.shape == (3, 3, 3)
    assert torch.allclose(t[:, 2, 0], torch.tensor([0.25, 0.25, 0.0]))  # 0.5 of the cell is image
    assert torch.allclose(t[:, 2, 1], torch.tensor([0.0, 0.0, 0.5]))
    assert torch.allclose(t[:, 0, 1], torch.tensor([0.5, 0.0, 0.5]))
    assert torch.allclose(t[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(t[:, 2, 2], torch.tensor([0.0, 0.0, 0.25]))  # a quarter inside the image


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_ema_checkpoints_hold_the_evaluated_weights(tmp_path, data_root, amp):
    """With EMA, evaluation uses the average, so the checkpoints' model must be the average: what
    load_model/eval/predict read is what scored. `detrkit eval` on the best checkpoint gives the
    metrics logged for it, also when training runs in bf16."""
    trainer = Trainer(tiny(tmp_path, data_root, epochs=1, ema_decay=0.9, amp=amp), log=lambda m: None)
    trainer.fit()
    run = tmp_path / "run"
    average, raw = trainer.ema.module.state_dict(), trainer.model.state_dict()
    assert any(not torch.equal(average[k], raw[k]) for k in raw)
    for name in (BEST, LAST):
        loaded = detrkit.load_model(run / name).state_dict()
        assert all(torch.equal(loaded[k], average[k]) for k in average), name
    logged = json.loads((run / METRICS).read_text().splitlines()[-1])["val"]
    out = tmp_path / "eval"
    args = ["eval", "--weights", str(run / BEST), "--data", str(data_root), "--out", str(out)]
    assert detrkit.cli.main([*args, "--num-workers", "0", "--batch-size", "4"]) == 0
    evaluated = json.loads((out / "metrics.json").read_text())
    # The detections themselves: the same as the averaged model's, not the raw model's.
    results = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in evaluated.items() if k.startswith("bbox/")} == pytest.approx(
        {k: v for k, v in logged.items() if k.startswith("bbox/")}, abs=1e-6
    )
    assert results


def _union_vs_accumulated(tmp_path, micro_sizes):
    """Parameter change of one SGD step (lr 1: the gradient) on 4 images as one batch, and as
    micro-batches of ``micro_sizes`` accumulated into one step."""
    from detrkit.data.collate import collate
    from detrkit.training.loop import TrainState, train_one_epoch

    torch.manual_seed(0)
    config = detrkit.DetrConfig(**{**TINY_MODEL, "num_classes": 4})
    counts = (1, 4, 0, 2)  # boxes per image: micro-batches hold different numbers of boxes
    samples = []
    for i, n in enumerate(counts):
        xy = torch.rand(n, 2) * 0.5 + 0.25
        wh = torch.rand(n, 2) * 0.3 + 0.1
        target = {"boxes": torch.cat([xy, wh], 1), "labels": torch.randint(0, 4, (n,)), "image_id": i}
        samples.append((torch.randn(3, 64, 80, dtype=torch.float64), target))
    changes = []
    for sizes in ((4,), micro_sizes):
        torch.manual_seed(1)
        # float64: in float32, batched and single-image convolutions round differently, and a
        # ReLU input that rounds across zero changes its gradient by far more than 1e-5.
        model = detrkit.build_model(config).double()
        with torch.no_grad():
            # Spread the random boxes and scores: near-equal matching costs could otherwise be
            # assigned differently by rounding in differently shaped batches.
            model.bbox_embed.layers[-1].weight.mul_(30)
            model.class_embed.weight.mul_(30)
        criterion = detrkit.build_criterion(config)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
        loader = [collate(samples[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        state = TrainState()
        stats = train_one_epoch(
            model, criterion, loader, optimizer, torch.device("cpu"), state,
            clip_max_norm=0.0, grad_accum=len(sizes),
        )  # fmt: skip
        assert state.step == 1
        changes.append(({n: before[n] - p.detach() for n, p in model.named_parameters()}, stats))
    return changes


def test_gradient_accumulation_equals_one_step_on_the_union(tmp_path):
    (union, union_stats), (accumulated, accumulated_stats) = _union_vs_accumulated(tmp_path, (1, 2, 1))
    scale = max(g.abs().max() for g in union.values())
    assert scale > 0
    for name, grad in union.items():
        assert torch.allclose(accumulated[name], grad, atol=1e-5 * scale, rtol=1e-4), name
    # The logged losses of the step are the union's too.
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"):
        assert accumulated_stats[key] == pytest.approx(union_stats[key], rel=1e-5), key


def test_detr_recipe_from_a_random_backbone_is_flagged_before_training(tmp_path, data_root):
    messages = []
    overrides = {"data": str(data_root), "output_dir": str(tmp_path / "run"), "num_workers": 0}
    config = build_config(preset="detr-r50", overrides={**overrides, "model": TINY_MODEL})
    Trainer(config, log=messages.append)
    warning = [m for m in messages if m.startswith("WARNING")]
    assert warning and "random weights" in warning[0] and "frozen BatchNorm" in warning[0]
    for remedy in ("--init-from", "pretrained_backbone", "backbone_pretrain_steps"):
        assert remedy in warning[0]
    # What works is not flagged: a backbone trained from scratch with the pretraining stage.
    messages.clear()
    overrides["output_dir"] = str(tmp_path / "tiny")
    Trainer(
        build_config(preset="cpu-tiny", overrides={**overrides, "model": TINY_MODEL}), log=messages.append
    )
    assert not [m for m in messages if m.startswith("WARNING")]


def test_the_timm_cpu_preset_builds_its_mobilenet_from_scratch_without_a_warning(tmp_path, data_root):
    require("timm")
    messages = []
    overrides = {"data": str(data_root), "output_dir": str(tmp_path / "run"), "num_workers": 0}
    trainer = Trainer(build_config(preset="cpu-mobilenet", overrides=overrides), log=messages.append)
    assert not [m for m in messages if m.startswith("WARNING")]
    assert trainer.model.config.backbone == "timm:mobilenetv3_large_100"
    assert type(trainer.model.backbone).__name__ == "TimmBackbone"


def test_eval_counts_unreadable_images_instead_of_dropping_their_ground_truth(tmp_path, data_root, capsys):
    """Unreadable validation images keep their ground truth (scored as images without detections)
    and are reported; with none readable, evaluation refuses."""
    Trainer(tiny(tmp_path, data_root, epochs=1), log=lambda m: None).fit()
    weights = str(tmp_path / "run" / LAST)
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    args = ["eval", "--weights", weights, "--data", str(data), "--num-workers", "0", "--batch-size", "4"]
    assert detrkit.cli.main([*args, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    capsys.readouterr()

    val = sorted((data / "val2017").iterdir())
    val[0].unlink()
    val[1].write_bytes(b"not an image")
    assert detrkit.cli.main([*args, "--out", str(tmp_path / "part")]) == 0
    captured = capsys.readouterr()
    part = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert part["images"] == full["images"] == 4 and part["images_unreadable"] == 2
    assert "(4 images, fp32)" in captured.out and "2 of 4 images could not be read" in captured.err
    assert val[0].name in captured.err and val[1].name in captured.err
    # Their objects count as missed: recall cannot go up by losing images.
    assert part["bbox/AR100"] <= full["bbox/AR100"]

    for path in val[2:]:
        path.unlink()
    assert detrkit.cli.main([*args, "--out", str(tmp_path / "none")]) == 2
    assert "none of the 4 images" in capsys.readouterr().err
    assert not (tmp_path / "none" / "metrics.json").exists()


def test_resume_refuses_what_it_cannot_apply(tmp_path, data_root):
    """Resuming on a dataset of other classes, or with a model change, would report one thing
    and train another: refused, naming the option and the way to do it (a new run)."""
    Trainer(tiny(tmp_path, data_root, epochs=1), log=lambda m: None).fit()
    run = TrainConfig(output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"model.num_queries=9 would change the model.*--init-from"):
        Trainer(run, resume=True, overrides={"model.num_queries": 9, "epochs": 2}, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"image_scale=0.5 would change the model"):
        Trainer(run, resume=True, overrides={"image_scale": 0.5}, log=lambda m: None)
    # The same value as the run's is no change: accepted.
    Trainer(run, resume=True, overrides={"model.num_queries": 6, "epochs": 2}, log=lambda m: None)

    other = tmp_path / "other"
    shutil.copytree(data_root, other)
    for split in ("train2017", "val2017"):
        path = other / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        data["categories"][0]["name"] = "cat"
        path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"classes .*'cat'.* are not the run's .*'rectangle'"):
        Trainer(run, resume=True, overrides={"data": str(other), "epochs": 2}, log=lambda m: None)


def test_a_new_run_does_not_replace_another_run(tmp_path, data_root):
    Trainer(tiny(tmp_path, data_root, epochs=1), log=lambda m: None).fit()
    run = tmp_path / "run"
    before = (run / LAST).read_bytes()
    with pytest.raises(ConfigError, match="--output-dir .* pass --overwrite"):
        Trainer(tiny(tmp_path, data_root, epochs=1, seed=1), log=lambda m: None)
    assert (run / LAST).read_bytes() == before
    messages = []
    Trainer(tiny(tmp_path, data_root, epochs=1, seed=1), log=messages.append, overwrite=True).fit()
    assert any("removed the previous run's" in m for m in messages)
    # A fresh log: the old run's epochs are not continued by the new one's.
    assert [json.loads(line)["epoch"] for line in (run / METRICS).read_text().splitlines()] == [1]


def test_instances_json_as_data_finds_its_images_and_a_run_without_images_stops(tmp_path, data_root, capsys):
    ann = data_root / "annotations" / "instances_train2017.json"
    messages = []
    trainer = Trainer(tiny(tmp_path, data_root, epochs=1, data=str(ann)), log=messages.append)
    assert trainer.train_set.image_dir == data_root / "train2017"  # not the annotations folder
    assert any("used for training and validation alike" in m for m in messages)
    assert trainer.fit()["images"] == 8

    # The same file away from its images: no image loads, so the run is refused before it trains
    # (no validation image can be read), without epochs of nothing and without a "best" checkpoint.
    lonely = tmp_path / "lonely" / "instances_train2017.json"
    lonely.parent.mkdir()
    lonely.write_bytes(ann.read_bytes())
    out = tmp_path / "nothing"
    args = ["train", "--data", str(lonely), "--output-dir", str(out), "--epochs", "3", "--num-workers", "0"]
    args += ["--image-scale", "0.12", "--batch-size", "4"]
    args += sum((["--set", f"model.{k}={json.dumps(v)}"] for k, v in TINY_MODEL.items()), [])
    assert detrkit.cli.main(args) == 2
    err = capsys.readouterr().err
    assert "none of the 8 validation images" in err and "Traceback" not in err
    assert not (out / BEST).exists()
    # Training images that all fail to load, with readable validation images: the first epoch stops it.
    broken = tmp_path / "broken"
    shutil.copytree(data_root, broken)
    for image in (broken / "train2017").iterdir():
        image.write_bytes(b"not an image")
    args[args.index("--data") + 1], args[args.index("--output-dir") + 1] = str(broken), str(tmp_path / "b")
    assert detrkit.cli.main(args) == 2
    err = capsys.readouterr().err
    assert "no training image could be loaded in epoch 1" in err and "Traceback" not in err
    assert not (tmp_path / "b" / BEST).exists()


def test_overwrite_never_deletes_the_checkpoint_it_starts_from(tmp_path, data_root):
    trainer = Trainer(tiny(tmp_path, data_root, epochs=1, ema_decay=0.9), log=lambda m: None)
    assert trainer.evaluated_model() is trainer.model  # the average holds nothing before a step
    trainer.fit()
    source = tmp_path / "run" / BEST
    with pytest.raises(ConfigError, match="would delete .*the checkpoint --init-from starts from"):
        Trainer(tiny(tmp_path, data_root, init_from=str(source)), overwrite=True, log=lambda m: None)
    assert source.exists()
