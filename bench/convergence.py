"""Convergence benchmark: COCO AP50 on a held-out synthetic split against training wall-clock time.

Trains a preset (``cpu-tiny`` by default) on the built-in synthetic dataset, evaluating on the
validation split (images the training never sees) after every epoch, for a time budget; then
draws AP50 against cumulative training minutes (evaluation time excluded) and prints the table.

    python bench/convergence.py --minutes 30 --out bench/results/convergence
    python bench/convergence.py --minutes 10 --set synth_images=2048 --set batch_size=16
    python bench/convergence.py --epochs 8 --set device=cuda   # per-epoch comparisons elsewhere

Every run leaves its run folder (checkpoints, metrics.jsonl) under --out, next to curve.png and
curve.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _machine import describe

from detrkit.fileio import atomic_write, write_json_atomic
from detrkit.training.config import build_config, parse_assignment
from detrkit.training.run_dir import METRICS
from detrkit.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="also stop after this many epochs (a linear/cosine schedule then decays over them, unless "
        "the time budget ends the run first): per-epoch comparisons on other hardware",
    )
    parser.add_argument("--out", default="bench/results/convergence")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training option overrides"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    args = parser.parse_args()

    out = Path(args.out)
    overrides = dict(parse_assignment(a) for a in args.set)
    overrides.update(output_dir=str(out / "run"), time_budget=args.minutes, eval_every=1)
    overrides["epochs"] = args.epochs if args.epochs is not None else 10_000
    config = build_config(args.preset, overrides=overrides)
    trainer = Trainer(config, overwrite=args.overwrite)
    trainer.fit()

    records = [json.loads(line) for line in (out / "run" / METRICS).read_text().splitlines() if line.strip()]
    curve = [
        {
            "minutes": round(r["train_seconds"] / 60, 2),
            "epoch": r["epoch"],
            "AP50": r["val"]["bbox/AP50"],
            "AP": r["val"]["bbox/AP"],
        }
        for r in records
        if "val" in r
    ]
    pretrain = [r["pretrain"]["seconds"] for r in records if "pretrain" in r]
    machine = f"{describe()}, amp {trainer.amp}"
    write_json_atomic(
        out / "curve.json",
        {
            "preset": args.preset,
            "overrides": overrides,
            "machine": machine,
            "pretrain_seconds": round(pretrain[0], 1) if pretrain else 0.0,
            "curve": curve,
        },
    )
    print(f"machine: {machine}")
    print(f"{'minutes':>8} {'epoch':>6} {'AP50':>7} {'AP':>7}")
    for point in curve:
        print(
            f"{point['minutes']:8.2f} {point['epoch']:6d} {100 * point['AP50']:7.1f} {100 * point['AP']:7.1f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["minutes"] for p in curve], [100 * p["AP50"] for p in curve], "o-", label="AP50")
    ax.plot([p["minutes"] for p in curve], [100 * p["AP"] for p in curve], "o-", label="AP")
    ax.axhline(50, color="grey", linestyle=":", label="goal: AP50 50")
    ax.set(
        xlabel="training minutes (evaluation excluded)",
        ylabel="%",
        title=f"{args.preset} on synthetic shapes",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "curve.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    print(f"wrote {out / 'curve.png'} and {out / 'curve.json'}")


if __name__ == "__main__":
    main()
