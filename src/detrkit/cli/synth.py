"""``detrkit synth``: write the built-in synthetic dataset (COCO instances + panoptic)."""

from __future__ import annotations

import argparse

from .args import non_negative_int, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="write the built-in synthetic dataset (COCO instances + panoptic)")
    p.add_argument("--out", required=True, help="dataset root to create")
    p.add_argument("--images", type=positive_int, default=64, help="training images (default 64)")
    p.add_argument(
        "--val-images", type=positive_int, default=None, help="validation images (default: a quarter)"
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--min-size", type=positive_int, default=128, help="smallest image side in pixels")
    p.add_argument("--max-size", type=positive_int, default=192, help="largest image side in pixels")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument(
        "--shapes", choices=("basic", "other"), default="basic",
        help="class set: basic (rectangle, ellipse, triangle, diamond) or other (cross, ring, hexagon, half-disc)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import SynthConfig, write_synthetic
    from ..fileio import check_output

    check_output(args.out, option="--out", kind="dir", overwrite=args.overwrite)
    config = SynthConfig(
        images=args.images,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        image_format=args.format,
        shapes=args.shapes,
    )
    val = args.val_images if args.val_images is not None else max(1, args.images // 4)
    out = write_synthetic(args.out, config, {"train": args.images, "val": val})
    print(
        f"wrote {args.images} train + {val} val images with COCO instances and panoptic annotations to {out}"
    )
    return 0
