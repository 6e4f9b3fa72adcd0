"""``detrkit data check``: validate COCO annotation files and their images."""

from __future__ import annotations

import argparse
import sys


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
    p.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    from ..data.check import check_annotations, find_annotation_files

    pairs = find_annotation_files(args.path)
    if args.images is not None:
        pairs = [(ann, args.images) for ann, _ in pairs]
    if not pairs:
        print(
            f"detrkit data check: error: no instances_*.json under {args.path}/annotations", file=sys.stderr
        )
        return 2
    config = None
    if args.model is not None:
        from ..checkpoints.io import load_model

        config = load_model(args.model).config
    ok = True
    for ann, image_dir in pairs:
        report = check_annotations(ann, image_dir)
        if image_dir is None:
            report.warn("images not checked", "no image folder found (pass --images DIR)")
        if config is not None and report.ok:
            from ..evaluation.doctor import check_for_model
            from ..fileio import read_json_file

            check_for_model(read_json_file(ann, what="annotation file"), config, report)
        print(report.summary())
        ok = ok and report.ok
    return 0 if ok else 1
