"""Draw the AP50 curves of several ``bench/convergence.py`` runs on one plot, and print them side by side.

    python bench/compare_curves.py runs/base/curve.json runs/groups/curve.json \\
        --labels "cpu-tiny" "cpu-tiny + query groups" --out bench/results/compare.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("curves", nargs="+", help="curve.json files written by bench/convergence.py")
    parser.add_argument("--labels", nargs="+", help="one label per curve (default: the file's folder)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--at", type=float, nargs="*", default=[6, 10, 20, 30], help="minutes to tabulate")
    args = parser.parse_args()
    labels = args.labels or [Path(c).parent.name for c in args.curves]
    if len(labels) != len(args.curves):
        parser.error(f"{len(args.curves)} curves but {len(labels)} labels")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    print(f"{'run':<40}" + "".join(f"{f'AP50@{m:g}min':>13}" for m in args.at))
    for path, label in zip(args.curves, labels, strict=True):
        curve = json.loads(Path(path).read_text())["curve"]
        minutes = [p["minutes"] for p in curve]
        ap50 = [100 * p["AP50"] for p in curve]
        ax.plot(minutes, ap50, "o-", label=label)
        # The best AP50 evaluated by each time (what checkpoint_best.pth would hold then).
        row = []
        for m in args.at:
            seen = [a for t, a in zip(minutes, ap50, strict=True) if t <= m]
            row.append(f"{max(seen):13.1f}" if seen and minutes[-1] >= m * 0.97 else f"{'-':>13}")
        print(f"{label:<40}" + "".join(row))
    ax.axhline(50, color="grey", linestyle=":", label="AP50 50")
    ax.set(xlabel="training minutes (evaluation excluded)", ylabel="AP50 (held-out split)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
