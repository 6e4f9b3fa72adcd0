"""The metric a run watches: which evaluation is the best (``checkpoint_best.pth``) and when to stop
early because the metric has stopped improving.

``--monitor`` names a key of the evaluation's metrics (``bbox/AP``, ``bbox/AP50``, ``segm/AP``,
``panoptic/PQ``, ``val/loss``, a per-class ``bbox/AP_per_class/<class name>``, ...) or a short alias (``AP``,
``AP50``, ``PQ``, ``loss``). Losses are minimised, everything else maximised. ``--patience N`` ends
the run after N evaluations in a row without an improvement of more than ``--min-delta`` over the
best value seen (as Keras' and Lightning's ``EarlyStopping`` count); the counter is part of the
training state, so a resumed run goes on counting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

ALIASES = {"AP": "bbox/AP", "AP50": "bbox/AP50", "AP75": "bbox/AP75", "PQ": "panoptic/PQ", "loss": "val/loss"}


def monitored_key(monitor: str, *, panoptic: bool, masks: bool) -> str:
    """The metrics key ``monitor`` names for a run (``auto``: PQ for panoptic runs, else box AP);
    a key the run's evaluation will not produce is refused, naming what it will."""
    from ..evaluation.coco import STAT_NAMES

    if monitor == "auto":
        return "panoptic/PQ" if panoptic else "bbox/AP"
    key = ALIASES.get(monitor, monitor)
    if panoptic:
        known = [f"panoptic/{m}{s}" for m in ("PQ", "SQ", "RQ") for s in ("", "_th", "_st")]
    else:
        known = [f"{t}/{n}" for t in (("bbox", "segm") if masks else ("bbox",)) for n in STAT_NAMES]
    parts = key.split("/", 2)
    per_class = (  # bbox/AP_per_class/<class name>, segm/AP_per_class/<class name>
        not panoptic
        and len(parts) == 3
        and parts[1] == "AP_per_class"
        and parts[0] in (("bbox", "segm") if masks else ("bbox",))
    )
    if key not in known and key != "val/loss" and not per_class:
        raise ConfigError(
            f"monitor={monitor!r}: this run's evaluation gives {', '.join(known[:6])}, ..., val/loss"
            + (", or a class's bbox/AP_per_class/<name>" if not panoptic else "")
        )
    return key


@dataclass(frozen=True)
class Monitor:
    """Compares each evaluation with the best so far (kept in the run's
    :class:`~detrkit.training.loop.TrainState`)."""

    key: str
    patience: int | None = None
    min_delta: float = 0.0

    @classmethod
    def for_config(cls, config: Any) -> Monitor:
        """The monitor a :class:`~detrkit.training.config.TrainConfig` asks for."""
        masks = bool(config.model.get("masks"))
        return cls(
            monitored_key(config.monitor, panoptic=config.panoptic, masks=masks),
            config.patience,
            config.min_delta,
        )

    def describe(self, metrics: dict[str, float], best: bool) -> str:
        """``"bbox/AP 41.2 *"``: the value (AP-like metrics in percent), ``*`` for a new best."""
        value = self.value(metrics)
        shown = f"{100 * value:.1f}" if self.maximize else f"{value:.4f}"
        return f"{self.key} {shown}" + (" *" if best else "")

    @property
    def maximize(self) -> bool:
        return not self.key.endswith("loss")

    def check_classes(
        self, class_names: tuple[str, ...] | list[str], validated: set[str] | None = None
    ) -> None:
        """Refuse, before any training, a per-class key whose class the model does not have, or
        that has no object (crowd regions aside) in the validation set: it would have no AP."""
        parts = self.key.split("/", 2)
        if len(parts) == 3 and parts[2] not in class_names:
            raise ConfigError(
                f"monitor={self.key!r}: no class {parts[2]!r} in the data (classes: {', '.join(class_names)})"
            )
        if len(parts) == 3 and validated is not None and parts[2] not in validated:
            raise ConfigError(f"monitor={self.key!r}: the validation set has no {parts[2]!r} object to score")

    def value(self, metrics: dict[str, float]) -> float:
        if self.key not in metrics:  # e.g. a class name that the validation set does not have
            raise ConfigError(f"monitor={self.key!r} is not among the evaluation's metrics")
        return metrics[self.key]

    def update(self, metrics: dict[str, float], state: Any) -> tuple[bool, str | None]:
        """Record one evaluation in ``state``; returns (the best so far, why to stop or None)."""
        value = self.value(metrics)
        score = value if self.maximize else -value  # higher is better from here on
        if not math.isfinite(score):
            score = -math.inf
        best = score > state.best_metric
        if best:
            state.best_metric = score
        if score > state.patience_best + self.min_delta:
            state.patience_best = score
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        if self.patience is not None and state.evals_without_improvement >= self.patience:
            best_value = state.patience_best if self.maximize else -state.patience_best
            return best, (
                f"early stop: {self.key} has not improved by more than {self.min_delta:g} in "
                f"{state.evals_without_improvement} evaluations (best {best_value:.4f}; patience {self.patience})"
            )
        return best, None
