"""``detrkit plot RUN_DIR``: training curves from a run's metrics.jsonl (needs matplotlib)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from ..fileio import atomic_write, read_text_file


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log (is {run_dir} a training run folder?)")
    records = []
    for number, line in enumerate(
        read_text_file(path, error=ConfigError, what="metrics log").splitlines(), 1
    ):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}:{number}: not a JSON line") from None
            if not isinstance(record, dict) or not isinstance(record.get("epoch", 0), (int, float)):
                raise ConfigError(f"{path}:{number}: not an epoch record (a JSON object with 'epoch')")
            records.append(record)
    return records


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw training/validation loss and box AP per epoch to a PNG; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("detrkit plot needs matplotlib: pip install 'detrkit[plot]'") from None
    records = [r for r in read_metrics(run_dir) if "train" in r]  # skip the pretraining record
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in records]
    for key, label in (("loss", "total"), ("loss_ce", "class"), ("loss_bbox", "L1"), ("loss_giou", "GIoU")):
        values = [r["train"].get(key) for r in records]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, label=f"train {label}")
    val = [(r["epoch"], r["val"]) for r in records if "val" in r]
    if val:
        ax_loss.plot([e for e, _ in val], [v.get("val/loss") for _, v in val], "o--", label="val total")
        for key, label in (
            ("bbox/AP", "box AP"),
            ("bbox/AP50", "box AP50"),
            ("segm/AP", "mask AP"),
            ("panoptic/PQ", "PQ"),
        ):
            if key in val[0][1]:
                ax_ap.plot([e for e, _ in val], [100 * v[key] for _, v in val], "o-", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="losses")
    ax_ap.set(xlabel="epoch", ylabel="AP (%)", title="validation")
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out
