"""What survives a restart: the training checkpoint's contents, their restore, and the resumed
run's configuration (its saved options, with the explicit new ones applied and reported)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from ..errors import ConfigError
from ..models.detr import Detr
from .aids import TrainingAids
from .config import TrainConfig, merge, nest
from .loop import TrainState

# Options built into the saved model (its input size, trainable parts, heads, architecture): the
# resumed model is the saved one, so reporting such a change without making it would lie.
FIXED_ON_RESUME = ("image_scale", "freeze_backbone", "panoptic", "query_groups", "denoising_groups")


def plain(value: Any) -> Any:
    """Tuples as lists, so a value from a config file compares equal to the same saved value."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def resumed_config(
    saved: dict[str, Any], overrides: dict[str, Any], checkpoint: Path, log: Callable[[str], None]
) -> TrainConfig:
    """The saved run's options with ``overrides`` (explicit command-line options) applied, each
    change logged; a change to the model of the run in progress is refused."""
    base = saved["train_config"]
    model = saved["detrkit_config"]
    if overrides.get("init_from", base.get("init_from")) != base.get("init_from"):
        raise ConfigError(
            f"--resume continues from {checkpoint}: --init-from {overrides['init_from']} would be ignored. "
            f"To start from it, start a new run: --init-from {overrides['init_from']} --output-dir NEW_DIR"
        )
    unknown = sorted(
        k for k in overrides if not k.startswith("model.") and k not in TrainConfig.__dataclass_fields__
    )
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
    defaults = TrainConfig()  # for options an older run's config did not record
    if "monitor" in overrides and overrides["monitor"] != base.get("monitor", defaults.monitor):
        raise ConfigError(
            f"--resume: monitor={overrides['monitor']!r} would compare with the best value of another metric "
            f"(this run watches {base.get('monitor', defaults.monitor)!r}): keep it, or start a new run from "
            f"--init-from {checkpoint}"
        )
    fixed = {key: base.get(key, getattr(defaults, key)) for key in FIXED_ON_RESUME}
    fixed.update({f"model.{field}": value for field, value in model.items()})
    for key, value in overrides.items():
        if (key in fixed or key.startswith("model.")) and plain(fixed.get(key)) != plain(value):
            raise ConfigError(
                f"--resume: {key}={value!r} would change the model of a run in progress (it has "
                f"{key}={fixed.get(key)!r}). Start a new run from it instead: "
                f"--init-from {checkpoint} --set {key}=... --output-dir NEW_DIR"
            )
    for key, value in overrides.items():
        old = base.get(key) if not key.startswith("model.") else base["model"].get(key[6:])
        if old != value:
            log(f"resume: {key} {old!r} -> {value!r} (from the command line)")
    return TrainConfig.from_dict(merge(base, nest(overrides)))


def training_checkpoint(
    *,
    model: Detr,
    evaluated: Detr,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    ema: AveragedModel | None,
    aid: TrainingAids | None,
    state: TrainState,
) -> dict[str, Any]:
    """Everything ``--resume`` needs. "model" holds the ``evaluated`` weights, so every reader of
    the checkpoint (load_model, eval, predict, serve, convert) gets the weights whose metrics were
    logged; with EMA, the raw training weights go to "train_model"."""
    return {
        "model": evaluated.state_dict(),
        "train_model": model.state_dict() if ema is not None else None,
        "detrkit_config": model.config.to_dict(),
        "train_config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": {"n_averaged": ema.n_averaged} if ema is not None else None,
        "aids": aid.aid_state_dict() if aid is not None else None,
        "state": dataclasses.asdict(state),
        "epoch": state.epoch,
    }


def restore(
    saved: dict[str, Any],
    *,
    model: Detr,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.StepLR,
    scaler: torch.amp.GradScaler | None,
    ema: AveragedModel | None,
    aid: TrainingAids | None,
) -> TrainState:
    """Load a :func:`training_checkpoint` into the freshly built parts; returns its counters."""
    raw = saved.get("train_model")
    model.load_state_dict(raw if raw is not None else saved["model"])
    if aid is not None:
        aid.load_aid_state_dict(saved["aids"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["lr_scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    averaged = saved.get("ema")
    if ema is not None and averaged:
        if raw is not None:  # "model" holds the average
            ema.module.load_state_dict(saved["model"])
            ema.n_averaged.copy_(averaged["n_averaged"])
        else:  # a checkpoint of detrkit 0.1, which saved the whole AveragedModel
            ema.load_state_dict(averaged)
    return TrainState(**saved["state"])


def apply_new_rates(
    cfg: TrainConfig,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.StepLR,
    overrides: dict[str, Any],
) -> None:
    """The optimizer's saved state carries the old learning rates and weight decay: apply the
    explicit new ones (at the point of the step schedule the run has reached)."""
    decay = 0.1 ** (state.epoch // cfg.lr_drop)
    base = [cfg.lr, cfg.lr_backbone][: len(optimizer.param_groups)]
    if "lr" in overrides or "lr_backbone" in overrides or "lr_drop" in overrides:
        scheduler.base_lrs = base
        scheduler.step_size = cfg.lr_drop
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * decay
            group["initial_lr"] = lr
    if "weight_decay" in overrides:
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay


# Options that set where a run ends, hence where a per-step schedule stands.
LENGTH_OPTIONS = ("epochs", "max_steps", "time_budget", "lr_schedule", "lr_decay_fraction")


def check_schedule_change(
    saved_config: dict[str, Any],
    cfg: TrainConfig,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    checkpoint: Path,
) -> None:
    """Refuse what a resumed run could not do as asked.

    - Lengthening (or re-scheduling) a run whose ``linear``/``cosine`` decay has begun would jump
      its learning rate from where the decay brought it back up to the peak, without warm-up: a
      run that continues from trained weights at a new schedule is a new run (``--init-from``).
      Before the decay begins, a change only moves where it will begin, and is applied.
    - Lengthening a run that another of its limits has already ended (more epochs for a run that
      reached its ``max_steps``) would be logged as applied and train nothing."""
    changed = [
        k for k in LENGTH_OPTIONS if k in saved_config and plain(saved_config[k]) != plain(getattr(cfg, k))
    ]
    if not changed:
        return
    group = optimizer.param_groups[0]
    factor = group["lr"] / group.get("initial_lr", group["lr"])
    if saved_config.get("lr_schedule", "step") != "step" and factor < 1 - 1e-6:
        raise ConfigError(
            f"--resume: {', '.join(f'{k}={getattr(cfg, k)!r}' for k in changed)} would restart a learning "
            f"rate that has decayed to {factor:.1%} of its peak (lr_schedule={saved_config['lr_schedule']}). "
            f"To train on, start a new run from it: --init-from {checkpoint} --output-dir NEW_DIR"
        )

    def longer(key: str) -> bool:
        old, new = saved_config.get(key), getattr(cfg, key)
        return key in ("epochs", "max_steps", "time_budget") and (
            new is None or (old is not None and new > old)
        )

    ended = state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.step >= cfg.max_steps)
    if ended and any(longer(k) for k in changed):
        raise ConfigError(
            f"--resume: {', '.join(f'{k}={getattr(cfg, k)!r}' for k in changed)} leaves nothing to train: the "
            f"run is at epoch {state.epoch}, step {state.step} (epochs={cfg.epochs}, max_steps={cfg.max_steps})"
        )


def check_early_stop(state: TrainState, cfg: TrainConfig) -> None:
    """A resumed run that stopped early goes on only with a patience it has not yet exhausted (a
    larger ``--patience``, or none); its count of evaluations without improvement goes on."""
    if not state.stop_reason:
        return
    if cfg.patience is not None and state.evals_without_improvement >= cfg.patience:
        raise ConfigError(
            f"--resume: the run ended early at epoch {state.epoch} ({state.stop_reason}); give a larger "
            "--patience (or none) to train on"
        )
    state.stop_reason = None
