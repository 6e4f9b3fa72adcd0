"""``detrkit data check``: validate COCO annotation files and their images."""

from __future__ import annotations

import argparse
import sys

from .args import add_data_format, non_negative_int, positive_float, positive_int, probability


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate COCO annotation files (and their images)")
    p.add_argument("path", help="an instances JSON, or a dataset root with annotations/instances_*.json")
    p.add_argument("--images", default=None, help="image folder (default: inferred from the COCO layout)")
    p.add_argument(
        "--model", default=None, metavar="WEIGHTS",
        help="also check the data against this model: classes it does not know, xyxy-looking boxes, objects "
        "too small for its input size, too few examples, more objects than queries",
    )  # fmt: skip
    add_data_format(p)
    p.set_defaults(run=run_check)
    c = data.add_parser("convert", help="convert a dataset to COCO, YOLO or Pascal VOC")
    c.add_argument("source", metavar="SRC", help="a dataset in any format detrkit reads")
    c.add_argument("target", metavar="DST", help="the folder to write (new, or empty)")
    c.add_argument("--to", required=True, choices=("coco", "yolo", "voc"), help="the format to write")
    add_data_format(c, "SRC")
    c.add_argument("--segments", action="store_true", help="YOLO: write polygons where objects have them")
    c.add_argument("--overwrite", action="store_true", help="write into a DST that is not empty")
    c.set_defaults(run=run_convert)
    add_preview_parser(data)


def add_preview_parser(data) -> None:
    p = data.add_parser("preview", help="a grid of augmented training samples with their boxes")
    p.add_argument("data", help='a dataset in any format detrkit reads, or "synthetic"')
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--split", default="train2017")
    add_data_format(p)
    p.add_argument("--count", type=positive_int, default=16, help="samples in the grid (16)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--image-scale", type=positive_float, default=1.0, help="as in train (1.0)")
    p.add_argument("--augment", default="paper", choices=("none", "light", "paper", "strong"))
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--crop", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--scale-min", type=positive_int, default=None)
    p.add_argument("--scale-max", type=positive_int, default=None)
    p.add_argument("--color-jitter", type=probability, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(run=run_preview)


def run_preview(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.coco import CocoDetection
    from ..data.formats import open_split
    from ..data.preview import write_preview
    from ..data.synthetic import SynthConfig, ensure_synthetic, synthetic_root
    from ..data.transforms import augmentation
    from ..fileio import check_output

    check_output(args.out, option="--out", overwrite=args.overwrite)
    transforms = augmentation(
        args.augment, args.image_scale, hflip=args.hflip, crop=args.crop, scale_min=args.scale_min,
        scale_max=args.scale_max, color_jitter=args.color_jitter,
    )  # fmt: skip
    root, data_format = Path(args.data), args.data_format
    if args.data == "synthetic":
        root, data_format = synthetic_root(Path(args.out).parent, "basic"), "coco"
        ensure_synthetic(root, SynthConfig(images=args.count), {"train": args.count})
    opened = open_split(root, args.split, data_format)
    dataset = CocoDetection(opened.images, opened.annotations, transforms)
    path = write_preview(dataset, args.out, count=args.count, seed=args.seed)
    print(f"wrote {path}: {args.count} samples of {opened.source} ({args.augment} augmentation)")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..data.convert import convert

    dropped = convert(
        args.source, args.target, args.to, data_format=args.data_format, segments=args.segments,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {args.target} ({args.to})")
    for line in dropped:
        print(f"not carried: {line}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.check import check_annotations, check_dataset, find_annotation_files
    from ..data.formats import detect_format

    more = None
    if args.model is not None:
        from ..checkpoints.io import load_model
        from ..evaluation.doctor import check_for_model

        config = load_model(args.model).config

        def more(data, report):
            check_for_model(data, config, report)

    kind = args.data_format
    if kind == "auto" and Path(args.path).exists():
        kind = detect_format(Path(args.path))
    if kind not in ("auto", "coco"):
        reports = check_dataset(args.path, kind, more)
        print(f"{args.path}: a {kind} dataset, {len(reports)} split(s)")
        for report in reports:
            print(report.summary())
        return 0 if all(r.ok for r in reports) else 1

    pairs = find_annotation_files(args.path)
    if args.images is not None:
        pairs = [(ann, args.images) for ann, _ in pairs]
    if not pairs:
        print(
            f"detrkit data check: error: no instances_*.json under {args.path}/annotations", file=sys.stderr
        )
        return 2
    ok = True
    for ann, image_dir in pairs:
        report = check_annotations(ann, image_dir)
        if image_dir is None:
            report.warn("images not checked", "no image folder found (pass --images DIR)")
        if more is not None and report.ok:
            more(report.data, report)
        print(report.summary())
        ok = ok and report.ok
    return 0 if ok else 1
