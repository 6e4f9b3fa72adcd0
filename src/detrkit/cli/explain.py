"""``detrkit explain``: the decoder's and the encoder's attention maps for an image (the paper's figures)."""

from __future__ import annotations

import argparse

from .args import positive_int, probability


def add_parser(sub) -> None:
    p = sub.add_parser(
        "explain", help="draw decoder and encoder attention maps for an image (the paper's figures)"
    )
    p.add_argument("image", help="an image file")
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an official name")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument(
        "--threshold", type=probability, default=0.7, help="detections shown (default: score > 0.7)"
    )
    p.add_argument("--max-detections", type=positive_int, default=6)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data.images import load_image
    from ..errors import ConfigError
    from ..fileio import check_output
    from ..inference.detector import Detector
    from ..inference.explain import attention_maps, draw_attention

    check_output(
        args.out, option="--out", inputs=[args.image, args.weights], overwrite=args.overwrite,
        replaceable=lambda p: p.suffix == ".png",
    )  # fmt: skip
    if args.out is not None and not str(args.out).lower().endswith(".png"):
        raise ConfigError(f"--out {args.out}: the picture is a PNG; name it *.png")
    if str(args.weights).lower().endswith(".onnx"):
        raise ConfigError(f"{args.weights}: attention maps need the PyTorch model, not an ONNX export")
    detector = Detector.from_pretrained(args.weights, device=args.device)
    maps = attention_maps(detector, load_image(args.image), threshold=args.threshold)
    path = draw_attention(maps, args.out, max_detections=args.max_detections)
    print(f"{len(maps.scores)} detections above {args.threshold}; wrote {path}")
    return 0
