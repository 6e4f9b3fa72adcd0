"""Training stays trustworthy under every option: a time budget spent by the backbone pretraining,
a schedule asked to restart, a skipped non-finite step, evaluation under mixed precision, the
training aids on a non-fp32 model."""

import re
import time

import pytest
import torch

import detrkit
from conftest import TINY_MODEL, tiny
from detrkit.checkpoints.io import torch_load_safe
from detrkit.data.collate import collate
from detrkit.errors import ConfigError
from detrkit.evaluation.loop import build_evaluator, evaluate
from detrkit.training import build
from detrkit.training.aids import TrainingAids
from detrkit.training.config import TrainConfig
from detrkit.training.loop import TrainingError, TrainState, train_one_epoch
from detrkit.training.run_dir import BEST, LAST
from detrkit.training.trainer import Trainer


def quiet(messages=None):
    return messages.append if messages is not None else (lambda m: None)


def test_a_budget_spent_by_the_pretraining_is_refused_and_the_pretraining_kept(tmp_path, data_root):
    cfg = tiny(
        tmp_path, data_root, epochs=2, backbone_pretrain_steps=2, time_budget=1e-5, lr_schedule="linear"
    )
    with pytest.raises(
        ConfigError, match=r"time_budget=1e-05: the backbone pretraining took .* leaving none"
    ):
        Trainer(cfg, log=quiet()).fit()
    saved = torch_load_safe(tmp_path / "run" / LAST)["state"]
    assert saved["backbone_pretrained"] and saved["epoch"] == 0 and saved["pretrain_seconds"] > 0
    assert not (tmp_path / "run" / BEST).exists()  # no untrained model saved as the best
    # With a budget that leaves DETR time, the run goes on from the pretrained backbone, and DETR's
    # schedule starts at its peak: the pretraining's minutes are not counted as DETR's.
    messages = []
    resumed = Trainer(
        TrainConfig(output_dir=cfg.output_dir),
        resume=True,
        overrides={"time_budget": 10.0},
        log=messages.append,
    )
    assert resumed.lr_factor(time.time(), batches=2)() == pytest.approx(1.0, abs=1e-3)
    resumed.fit()
    assert resumed.state.epoch == 2 and not any("backbone pretraining:" in m for m in messages)


def test_the_per_step_schedule_runs_over_detrs_share_of_the_budget(tmp_path, data_root):
    trainer = Trainer(
        tiny(tmp_path, data_root, epochs=1000, time_budget=1.0, lr_schedule="linear"), log=quiet()
    )
    now = time.time()
    trainer.state.train_seconds = trainer.state.pretrain_seconds = 30.0  # pretraining took half the budget
    assert trainer.lr_factor(now, batches=2)() == pytest.approx(1.0, abs=0.01)
    trainer.state.train_seconds = 45.0  # DETR has trained 15 of its 30 seconds
    assert trainer.lr_factor(now, batches=2)() == pytest.approx(0.5, abs=0.01)


def test_resume_refuses_to_restart_a_decayed_schedule_or_to_lengthen_an_ended_run(tmp_path, data_root):
    cfg = tiny(tmp_path, data_root, epochs=2, lr_schedule="linear", eval_every=0)
    Trainer(cfg, log=quiet()).fit()
    for change in ({"epochs": 4}, {"lr_schedule": "step"}, {"time_budget": 5.0}):
        with pytest.raises(ConfigError, match=r"would restart a learning rate that has decayed to 25\.0%"):
            Trainer(TrainConfig(output_dir=cfg.output_dir), resume=True, overrides=change, log=quiet())
    # A run that its max_steps ended: more epochs alone would train nothing; with more steps, it trains.
    other = tiny(
        tmp_path / "b", data_root, output_dir=str(tmp_path / "b"), epochs=3, max_steps=2, eval_every=0
    )
    Trainer(other, log=quiet()).fit()
    with pytest.raises(ConfigError, match="epochs=5 leaves nothing to train: the run is at epoch 1, step 2"):
        Trainer(TrainConfig(output_dir=other.output_dir), resume=True, overrides={"epochs": 5}, log=quiet())
    resumed = Trainer(
        TrainConfig(output_dir=other.output_dir),
        resume=True,
        overrides={"epochs": 5, "max_steps": 4},
        log=quiet(),
    )
    resumed.fit()
    assert resumed.state.step == 4


def _step_on(model, image):
    config = model.config
    target = {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]]), "labels": torch.tensor([1]), "image_id": 0}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = detrkit.build_criterion(config)
    batch = [collate([(image, target)])]
    return train_one_epoch(model, criterion, batch, optimizer, torch.device("cpu"), TrainState())


def test_a_skipped_step_leaves_the_batchnorm_statistics_as_they_were():
    torch.manual_seed(0)
    model = detrkit.build_model(detrkit.DetrConfig(**{**TINY_MODEL, "num_classes": 4, "frozen_bn": False}))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    image = torch.rand(3, 64, 80)
    image[0, 5, 5] = float("nan")  # one bad pixel: NaN activations, a NaN loss, a skipped step
    with pytest.warns(UserWarning, match="non-finite loss"):
        _step_on(model, image)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    image[0, 5, 5] = 0.5  # a finite step does update them
    _step_on(model, image)
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_a_model_with_non_finite_buffers_is_neither_saved_nor_evaluated(tmp_path, data_root):
    trainer = Trainer(
        tiny(tmp_path, data_root, epochs=1, model={**TINY_MODEL, "frozen_bn": False}), log=quiet()
    )
    trainer.fit()
    before = (tmp_path / "run" / LAST).read_bytes()
    name, buffer = next((n, b) for n, b in trainer.model.named_buffers() if n.endswith("running_mean"))
    with torch.no_grad():
        buffer[0] = float("nan")
    with pytest.raises(TrainingError, match=re.escape(name) + ".* it is not saved"):
        trainer.save(LAST)
    with pytest.raises(TrainingError, match="it is not evaluated"):
        trainer.evaluate()
    assert (tmp_path / "run" / LAST).read_bytes() == before


def test_evaluation_during_bf16_training_is_in_fp32(tmp_path, data_root):
    # What `detrkit eval`, predict and serve compute: the logged metrics must be reproducible there.
    trainer = Trainer(tiny(tmp_path, data_root, epochs=1, amp="bf16"), log=quiet())
    logged = trainer.evaluate()
    fp32 = evaluate(
        trainer.evaluated_model(), build.val_loader(trainer.config, trainer.val_set),
        build_evaluator(trainer.val_set, masks=False), trainer.device, criterion=trainer.criterion,
    )  # fmt: skip
    assert logged["val/loss"] == pytest.approx(fp32["val/loss"], rel=1e-6)


def test_denoising_queries_on_a_float64_model():
    torch.manual_seed(0)
    model = detrkit.build_model(detrkit.DetrConfig(**{**TINY_MODEL, "num_classes": 4})).double()
    aid = TrainingAids(model, denoising_groups=2).double().train()
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]], dtype=torch.float64), "labels": torch.tensor([1])}
    ]
    out = aid(torch.rand(1, 3, 64, 64, dtype=torch.float64), None, targets)
    assert out["denoising"]["pred_boxes"].dtype == torch.float64
    assert out["denoising"]["pred_boxes"].shape == (1, 2, 4)
