"""The run folder: its file names, the rule that a new run never silently replaces another one,
atomic checkpoint writes and the metrics log. Only the main process writes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import is_dist, is_main_process
from ..errors import ConfigError
from ..fileio import atomic_write, check_output, write_json_atomic

LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"
METRICS = "metrics.jsonl"
FINAL = "final_metrics.json"
TRAIN_CONFIG = "train_config.json"
RUN_FILES = (LAST, BEST, METRICS, FINAL)  # what makes a folder another run's


class RunDir:
    """``path`` as a training run's folder (``--output-dir``).

    Args:
        path: the folder (created when something is first written).
        log: where messages go.
    """

    def __init__(self, path: str | Path, log: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.log = log
        self._previous: list[str] = []  # run files that claim() allowed to replace

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def claim(self, overwrite: bool, init_from: str | None = None) -> None:
        """A new run must not silently replace another run's checkpoints and extend its metrics:
        refuse a folder that holds one, unless ``overwrite``. ``init_from`` is never deleted: a run
        cannot overwrite the checkpoint it starts from. Nothing is removed here: the previous run's
        files go in :meth:`clear_previous`, once the new run has been built without error."""
        previous = [name for name in RUN_FILES if (self.path / name).exists()]
        if (
            overwrite
            and init_from
            and any(Path(init_from).resolve() == (self.path / n).resolve() for n in previous)
        ):
            raise ConfigError(
                f"--overwrite would delete {init_from}, the checkpoint --init-from starts from: "
                "choose another --output-dir"
            )
        check_output(
            self.path, option="--output-dir", kind="dir", overwrite=overwrite,
            replaceable=lambda _: not previous,
        )  # fmt: skip
        self._previous = previous

    def clear_previous(self) -> None:
        """Remove the run files of the run that :meth:`claim` was allowed to replace."""
        if self._previous and is_main_process():
            for name in self._previous:
                (self.path / name).unlink(missing_ok=True)
            self.log(f"--overwrite: removed the previous run's {', '.join(self._previous)} from {self.path}")
        self._previous = []
        if is_dist():
            dist.barrier()

    def write_config(self, config: dict[str, Any]) -> None:
        """The run's resolved training options, as ``train_config.json``."""
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / TRAIN_CONFIG, config)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (an epoch's or a stage's record) to ``metrics.jsonl``."""
        if not is_main_process():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, name: str, payload: Callable[[], dict[str, Any]]) -> None:
        """Write the checkpoint ``payload()`` as ``name``, atomically (a crash mid-write leaves the
        previous file intact). ``payload`` is only called on the main process."""
        if not is_main_process():
            return
        data = payload()
        atomic_write(self.path / name, lambda tmp: torch.save(data, tmp))

    def write_final(self, metrics: dict[str, float]) -> None:
        """The last evaluation's metrics, as ``final_metrics.json``."""
        if is_main_process():
            write_json_atomic(self.path / FINAL, metrics)


def epoch_record(
    state, optimizer: torch.optim.Optimizer, start: float, train: dict[str, float]
) -> dict[str, Any]:
    """An epoch's line of ``metrics.jsonl`` (its evaluation is added as ``val`` when there is one):
    counters after it (a :class:`~detrkit.training.loop.TrainState`), seconds since ``start``, the
    learning rate, and the mean training losses."""
    return {
        "epoch": state.epoch,
        "step": state.step,
        "time": time.time() - start,
        "train_seconds": round(state.train_seconds, 2),
        "lr": optimizer.param_groups[0]["lr"],
        "train": {k: round(v, 6) for k, v in train.items()},
    }
