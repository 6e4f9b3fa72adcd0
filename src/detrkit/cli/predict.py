"""``detrkit predict``: detections for images, folders and videos (COCO JSON, pictures, videos)."""

from __future__ import annotations

import argparse
import sys
import time

from .args import add_precision, positive_int, probability


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="detect objects in images, folders or videos")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or video files")
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an official name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=probability, default=0.7, help="minimum score (default 0.7)")
    p.add_argument(
        "--segmentation",
        choices=("auto", "instance", "panoptic", "semantic", "none"),
        default="auto",
        help="for mask models (default: panoptic if the model has stuff classes, else instance)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the best available)")
    p.add_argument("--no-draw", action="store_true", help="do not write annotated pictures")
    add_precision(p)
    p.set_defaults(run=run)


def show_progress(done: int, total: int, start: float, failed: int) -> None:
    """One status line on a terminal (nothing when stderr is not one)."""
    if not sys.stderr.isatty():
        return
    rate = done / max(time.perf_counter() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    sys.stderr.write(f"\r{done}/{total} images  {rate:.1f} img/s  ETA {eta:.0f}s  failed {failed}   ")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..fileio import check_output
    from ..inference.detector import Detector
    from ..inference.results import collect_inputs, predict_inputs

    # A folder of results: refreshed by a new run, but never a file, the weights, or unwritable.
    out = check_output(
        args.out, option="--out", kind="dir", inputs=[args.weights], replaceable=lambda _: True
    )
    files, missing = collect_inputs(args.inputs, exclude=out)
    for source, reason in missing:
        print(f"detrkit predict: skipping {source}: {reason}", file=sys.stderr)
    if not files:
        print("detrkit predict: error: no images or videos found", file=sys.stderr)
        return 2
    detector = Detector.from_pretrained(
        args.weights, device=args.device, batch_size=args.batch_size, precision=args.precision
    )
    segmentation = {"auto": "auto", "none": None}.get(args.segmentation, args.segmentation)
    try:  # refused once here rather than for every image
        detector.segmentation_mode(segmentation)
    except ValueError as e:
        raise ConfigError(f"--segmentation {args.segmentation}: {e}") from None
    summary = predict_inputs(
        detector, files, out, threshold=args.threshold, segmentation=segmentation,
        batch_size=args.batch_size, draw=not args.no_draw, failures=list(missing), progress=show_progress,
    )  # fmt: skip
    print(
        f"{summary.images} images, {summary.detections} detections (threshold {args.threshold})"
        + (f", {summary.videos} videos ({summary.frames} frames)" if summary.videos else "")
        + f" in {summary.seconds:.1f}s; {len(summary.failures)} failed; "
        + (f"wrote {out}" if summary.images or summary.videos else "nothing written")
    )
    if summary.failures:
        print("failed: " + ", ".join(name for name, _ in summary.failures), file=sys.stderr)
    return 1 if summary.failures else 0
