"""A training run: builds its parts from a :class:`TrainConfig` and runs the recipe (``fit()``).

Launch with ``detrkit train ...`` on one process, or ``torchrun --nproc_per_node=N -m detrkit train
...`` for DDP (gloo on CPU, NCCL on GPU). Rank 0 logs and writes checkpoints; every rank evaluates
its shard and the results are gathered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checkpoints.io import load_model, torch_load_safe
from ..data.coco import CocoDetection, DatasetError
from ..data.collate import SkipTracker
from ..distributed import any_process, is_dist, is_main_process, pick_device, rank
from ..errors import ConfigError
from ..evaluation.coco import format_metrics, per_class_ap, queries_warning
from ..evaluation.loop import build_evaluator, evaluate
from ..models.criterion import build_criterion
from ..models.detr import Detr
from . import build
from .config import TrainConfig
from .loggers import Loggers, parse_loggers, validation_pictures
from .loop import TrainState, refuse_non_finite, train_one_epoch
from .monitor import Monitor
from .pretrain import pretraining_stage
from .progress import EpochBar
from .resume import (
    apply_new_rates,
    check_early_stop,
    check_schedule_change,
    restore,
    resumed_config,
    training_checkpoint,
)
from .run_dir import BEST, LAST, RunDir, epoch_record
from .schedule import per_step_factor


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs it (``fit()``).

    Args:
        config: the run's configuration.
        resume: continue ``config.output_dir``'s last checkpoint; ``overrides`` (explicit options)
            are applied on top of the saved config and reported.
        log: where messages go (rank 0 only).
        overwrite: start afresh in an output folder that holds another run (its run files go).
        datasets: (training set, validation set) built by the caller — :class:`CocoDetection` of any
            source, e.g. ``detrkit.data.supervision.from_supervision_dataset`` — instead of
            ``config.data``.

    Example:
        >>> trainer = Trainer(build_config("cpu-tiny", overrides={"epochs": 1}))  # doctest: +SKIP
        >>> metrics = trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overrides: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
        overwrite: bool = False,
        datasets: tuple[CocoDetection, CocoDetection] | None = None,
    ) -> None:
        overrides = overrides or {}
        build.setup_distributed(overrides.get("device", config.device))
        self.log = log if is_main_process() else (lambda msg: None)
        self.run_dir = RunDir(config.output_dir, self.log)
        saved = None
        if resume:
            if not (self.run_dir / LAST).exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.run_dir / LAST}")
            saved = torch_load_safe(self.run_dir / LAST)
            config = resumed_config(saved, overrides, self.run_dir / LAST, self.log)
        else:
            self.run_dir.claim(overwrite, config.init_from)
        self.config = config
        self.device = pick_device(config.device)
        self.state = TrainState()
        self.monitor = Monitor.for_config(config)

        # The weights to start from are read first: a bad --init-from fails before any data is built.
        source = load_model(config.init_from) if saved is None and config.init_from else None
        data = (
            build.Datasets(*datasets, lambda: datasets[0])
            if datasets
            else build.build_datasets(config, self.run_dir.path, self.log)
        )
        self.train_set, self.val_set, self._train_set_with_masks = data.train, data.val, data.train_with_masks
        build.seed_everything(config.seed)  # the initial weights depend on the seed only
        if saved is not None:
            model = build.resumed_model(saved["detrkit_config"], self.train_set, self.run_dir / LAST)
        else:
            model = build.build_model(config, self.train_set, self.log, source)
        self.model: Detr = model.to(self.device)
        self.monitor.check_classes(self.model.config.class_names or (), build.validated_classes(self.val_set))
        self.criterion = build_criterion(self.model.config).to(self.device)
        self.aid = build.build_aid(config, self.model, self.criterion, self.device)
        self.module: nn.Module = self.aid if self.aid is not None else self.model  # what trains
        if is_dist():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        extra = self.aid.aid_parameters() if self.aid is not None else []
        self.optimizer = build.build_optimizer(config, self.model, extra)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_drop)
        self.amp, self.scaler = build.build_precision(config, self.device, self.log)
        self.ema = build.build_ema(config, self.model)
        if saved is not None:
            parts = dict(optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, ema=self.ema)
            self.state = restore(saved, model=self.model, aid=self.aid, **parts)
            apply_new_rates(config, self.state, self.optimizer, self.scheduler, overrides)
            check_schedule_change(
                saved["train_config"], config, self.state, self.optimizer, self.run_dir / LAST
            )
            self.log(
                f"resumed from {self.run_dir / LAST} after epoch {self.state.epoch} (step {self.state.step})"
            )
        else:
            warning = build.random_backbone_warning(config, self.model.config)
            if warning:
                self.log(f"WARNING: {warning}")
            self.run_dir.clear_previous()  # only now: a run refused above destroys nothing

    # --- the recipe ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Pretrain the backbone if the run needs it, then train epoch by epoch, evaluating every
        ``eval_every`` epochs and at the end; returns the last evaluation's metrics."""
        cfg = self.config
        check_early_stop(self.state, cfg)
        self.run_dir.write_config(cfg.to_dict())
        self.log(build.describe(self.model, self.device))
        if self._more_epochs() and self._out_of_budget():  # only a resumed run can have spent it already
            raise ConfigError(
                f"time_budget={cfg.time_budget:g}: this run has already trained "
                f"{self.state.train_seconds / 60:.1f} minutes; give a larger --time-budget to go on"
            )
        if cfg.backbone_pretrain_steps and not self.state.backbone_pretrained:
            self._maybe_pretrain_backbone()
        names = parse_loggers(cfg.log) if is_main_process() else ()
        resumed = bool(self.state.epoch or self.state.step)
        with Loggers(names, self.run_dir.path, cfg.to_dict(), resume=resumed) as loggers:
            metrics = self._epochs(loggers)
        if self.state.stop_reason:
            self.log(self.state.stop_reason)
        if metrics and is_main_process():
            self.log(format_metrics(metrics))
            self.run_dir.write_final(metrics)
        return metrics

    def _epochs(self, loggers: Loggers) -> dict[str, float]:
        """Train epoch by epoch until the run ends; returns the last evaluation's metrics."""
        cfg = self.config
        skips = SkipTracker(warn=self.log)
        metrics: dict[str, float] = {}
        while self._more_epochs():
            start = time.time()
            train_stats = self.train_epoch(skips)
            # Each process has its own clock: the time budget must end the run on all of them at once.
            finished = any_process(not self._more_epochs() or self._out_of_budget(), self.device)
            record = epoch_record(self.state, self.optimizer, start, train_stats)
            line = f"epoch {self.state.epoch}/{cfg.epochs}: loss {train_stats.get('loss', float('nan')):.4f}"
            if finished or (cfg.eval_every and self.state.epoch % cfg.eval_every == 0):
                metrics = record["val"] = self.evaluate()
                line += self._keep_if_best(metrics)
                if self.state.stop_reason:  # the same on every process: the metrics are gathered
                    record["stop"], finished = self.state.stop_reason, True
            self.log(f"{line} ({time.time() - start:.0f}s)")
            self.run_dir.log_metrics(record)
            loggers.log_epoch(
                record, lambda: validation_pictures(self.evaluated_model(), self.val_set, self.device)
            )
            self.save(LAST)
            if finished:
                break
        return metrics

    def train_epoch(self, skips: SkipTracker) -> dict[str, float]:
        """One epoch (or what is left of ``max_steps``); returns its mean losses."""
        cfg, epoch = self.config, self.state.epoch
        # Seeding from (seed, epoch) makes an epoch replay identically after a resume.
        build.seed_everything(cfg.seed + epoch * 1000 + rank())
        loader = build.train_loader(cfg, self.train_set, epoch)
        start = time.time()
        with EpochBar(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", enabled=is_main_process()) as bar:
            stats = train_one_epoch(
                self.module, self.criterion, loader, self.optimizer, self.device, self.state,
                clip_max_norm=cfg.clip_max_norm, grad_accum=cfg.grad_accum, amp=self.amp, scaler=self.scaler,
                ema=self.ema, max_steps=cfg.max_steps, max_bad_steps=cfg.max_bad_steps, skips=skips,
                progress=bar.update, lr_factor=self.lr_factor(start, len(loader)),
            )  # fmt: skip
        share = len(loader.batch_sampler.sampler)  # this process's samples this epoch
        if not stats and any_process(share > 0 and skips.epoch_count >= share, self.device):
            # Nothing trained because nothing loaded (e.g. a wrong image folder): stop now rather
            # than run every epoch without a step and save an untrained "best" model.
            raise DatasetError(
                f"no training image could be loaded in epoch {epoch + 1}, on at least one process (e.g. "
                f"{min(skips.seen, default='on another process')}): check the image folder of {cfg.data}"
            )
        if cfg.lr_schedule == "step":
            self.scheduler.step()
        self.state.epoch += 1
        self.state.train_seconds += time.time() - start
        summary = skips.end_epoch()
        if summary:
            self.log(summary)
        return stats

    def evaluate(self) -> dict[str, float]:
        """COCO AP (or PQ) of :meth:`evaluated_model` on the validation set, with its loss."""
        # Categories the validation file does not list can still be predicted: know them all.
        evaluator = build_evaluator(
            self.val_set,
            self.model.config.masks,
            known_isthing=self.train_set.isthing if self.config.panoptic else None,
        )
        model = self.evaluated_model()
        refuse_non_finite(model, "evaluated", self.run_dir.path)
        # In the precision of `detrkit eval`, predict and serve (fp32), whatever training uses: the
        # logged metrics, and the checkpoint chosen by them, are what those commands reproduce.
        metrics = evaluate(
            model, build.val_loader(self.config, self.val_set), evaluator, self.device,
            amp="none", criterion=self.criterion, skips=SkipTracker(warn=self.log),
        )  # fmt: skip
        metrics.update(per_class_ap(evaluator))
        for warning in filter(None, [queries_warning(evaluator, self.model.config.num_queries)]):
            self.log(warning)
        if metrics["images_unreadable"]:
            self.log(
                f"WARNING: {metrics['images_unreadable']:.0f} of {metrics['images']:.0f} validation images "
                "could not be read; they count as images without detections"
            )
        return metrics

    def evaluated_model(self) -> Detr:
        """The weights that are evaluated and saved as the model: the EMA average when there is one
        (once it has averaged anything: before the first step it is a copy of the initial weights)."""
        if self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self.model

    def save(self, name: str) -> None:
        """Write the training checkpoint ``name`` (``checkpoint_last.pth`` / ``checkpoint_best.pth``)."""
        refuse_non_finite(self.evaluated_model(), "saved", self.run_dir.path)
        self.run_dir.save(
            name,
            lambda: training_checkpoint(
                model=self.model,
                evaluated=self.evaluated_model(),
                config=self.config,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                ema=self.ema,
                aid=self.aid,
                state=self.state,
            ),  # fmt: skip
        )

    def lr_factor(self, epoch_start: float, batches: int) -> Callable[[], float] | None:
        """The per-step learning-rate factor of a ``linear``/``cosine`` schedule in this epoch (which
        started at ``epoch_start`` and has ``batches`` batches); None for the paper's ``step``.
        Its clock is DETR's: the time budget less the backbone pretraining, which it excludes."""
        cfg, state = self.config, self.state
        budget = None if cfg.time_budget is None else 60 * cfg.time_budget - state.pretrain_seconds
        return per_step_factor(
            cfg.lr_schedule, cfg.lr_decay_fraction, epochs=cfg.epochs,
            steps_per_epoch=-(-batches // cfg.grad_accum), max_steps=cfg.max_steps, budget_seconds=budget,
            step=lambda: state.step, device=self.device,
            trained_seconds=lambda: state.train_seconds - state.pretrain_seconds + time.time() - epoch_start,
        )  # fmt: skip

    # --- the recipe's decisions -------------------------------------------------------------------
    def _more_epochs(self) -> bool:
        cfg = self.config
        return self.state.epoch < cfg.epochs and (cfg.max_steps is None or self.state.step < cfg.max_steps)

    def _out_of_budget(self) -> bool:
        # Training time of the whole run (pretraining included; evaluation and checkpointing
        # excluded, so the budget means the same with any eval_every, and a resumed run goes on
        # counting): the minutes bench/convergence.py plots.
        budget = self.config.time_budget
        return budget is not None and self.state.train_seconds >= 60 * budget

    def _keep_if_best(self, metrics: dict[str, float]) -> str:
        """Save ``checkpoint_best.pth`` when the monitored metric beats the best so far, and note
        an early stop in the state; the log text."""
        best, self.state.stop_reason = self.monitor.update(metrics, self.state)
        if best:
            self.save(BEST)
        return (
            f", val loss {metrics.get('val/loss', float('nan')):.4f}, {self.monitor.describe(metrics, best)}"
        )

    def _maybe_pretrain_backbone(self) -> None:
        """The dense backbone pretraining stage, when this run's backbone needs it."""
        cfg = self.config
        resumed = bool(self.state.epoch or self.state.step)
        stats = pretraining_stage(
            cfg, self.model, self.train_set, self._train_set_with_masks, resumed=resumed,
            device=self.device, amp=self.amp, log=self.log,
        )  # fmt: skip
        if stats is None:
            return
        self.state.backbone_pretrained = True
        self.state.train_seconds += stats["seconds"]
        self.state.pretrain_seconds = stats["seconds"]
        self.run_dir.log_metrics(
            {"epoch": 0, "step": 0, "train_seconds": round(self.state.train_seconds, 2), "pretrain": stats}
        )
        self.save(LAST)
        if self._more_epochs() and self._out_of_budget():
            # DETR would train at a learning rate decayed to 0, or not at all: nothing to save as a
            # model. The pretrained backbone is saved: a resume with a larger budget goes on from it.
            raise ConfigError(
                f"time_budget={cfg.time_budget:g}: the backbone pretraining took {stats['seconds'] / 60:.1f} "
                "minutes of it, leaving none for DETR. Give a budget of more than that, e.g. "
                f"--resume --output-dir {self.run_dir.path} --time-budget "
                f"{2 * stats['seconds'] / 60 + cfg.time_budget:.0f} (the pretraining is kept, not repeated)"
            )
