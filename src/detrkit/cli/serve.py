"""``detrkit serve``: an HTTP detection service with an upload page (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse

from .args import add_precision, bounded, positive_float, positive_int, probability


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP detection service with an upload page (FastAPI + uvicorn)")
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an official name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=bounded(int, 0, 65535, "a TCP port"), default=8000)
    p.add_argument("--threshold", type=probability, default=0.7, help="default score threshold")
    p.add_argument(
        "--max-upload-mb", type=positive_float, default=10.0, help="largest upload accepted (413 above)"
    )
    p.add_argument(
        "--max-pixels", type=positive_int, default=40_000_000, help="largest image accepted (400 above)"
    )
    p.add_argument("--max-batch", type=positive_int, default=8, help="images run through the model together")
    p.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting for the model (503 above)"
    )
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        help="seconds an upload may take to arrive (408 after; default 30)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the best available)")
    add_precision(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.detector import Detector
    from ..inference.serve import ServeConfig, serve

    # Options are checked before the (slow) model load.
    config = ServeConfig(
        threshold=args.threshold,
        max_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        body_timeout=args.body_timeout,
    )
    detector = Detector.from_pretrained(
        args.weights, device=args.device, batch_size=args.max_batch, precision=args.precision
    )
    serve(detector, args.host, args.port, config)
    return 0
