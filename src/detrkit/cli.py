"""The ``detrkit`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .predict_cli import bounded, non_negative_int, positive_float, positive_int, probability
from .train_config import PRESETS


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import convert_checkpoint
    from .fileio import check_output

    kind = "dir" if args.to == "hf" else "file"
    check_output(args.dst, option="dst", kind=kind, inputs=[args.src], overwrite=args.overwrite)
    overrides = {"dilation": True} if args.dilation else {}
    path = convert_checkpoint(args.src, args.dst, args.to, **overrides)
    print(f"wrote {path} ({args.to})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import config_of

    config = config_of(args.weights)
    print(config.to_json())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SynthConfig, write_synthetic
    from .fileio import check_output

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


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_annotations, find_annotation_files

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
        print(report.summary())
        ok = ok and report.ok
    return 0 if ok else 1


_TRAIN_OPTIONS = {
    # option: (type, help); None type = a flag
    "data": (str, 'dataset root (COCO layout or Roboflow-style export), an instances JSON, or "synthetic"'),
    "output_dir": (str, "run folder: checkpoints, metrics.jsonl, results"),
    "epochs": (int, "number of epochs"),
    "max_steps": (int, "stop after this many optimizer steps"),
    "time_budget": (
        float,
        "minutes of training (backbone pretraining included, evaluation not); the epoch that crosses it is the last",
    ),
    "batch_size": (int, "images per process and step"),
    "grad_accum": (int, "accumulate gradients over this many batches"),
    "lr": (float, "learning rate of the transformer and heads (1e-4)"),
    "lr_backbone": (float, "learning rate of the backbone (1e-5)"),
    "weight_decay": (float, "AdamW weight decay (1e-4)"),
    "lr_drop": (int, "epochs before the learning rate drops 10x"),
    "lr_schedule": (
        str,
        "step (the paper's drop after --lr-drop epochs), linear or cosine (decay to 0 over the run or its --time-budget)",
    ),
    "lr_decay_fraction": (
        float,
        "linear/cosine: decay over this last share of the run, constant before (1.0)",
    ),
    "clip_max_norm": (float, "gradient clipping (0.1); 0 disables"),
    "amp": (str, "mixed precision: none, bf16, fp16 (CUDA) or auto (bf16 on CPUs with native bf16)"),
    "ema_decay": (float, "keep an exponential moving average of the weights (e.g. 0.9997)"),
    "eval_every": (int, "evaluate every N epochs (0: at the end only)"),
    "num_workers": (int, "DataLoader worker processes"),
    "seed": (int, "random seed"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "init_from": (str, "fine-tune from a checkpoint (any format load_model reads, or an official name)"),
    "image_scale": (float, "scale all augmentation sizes (1.0 = the paper's 800/1333)"),
    "synth_images": (int, "training images of the synthetic dataset"),
    "synth_shapes": (str, "class set of the synthetic dataset: basic or other"),
    "query_groups": (int, "Group DETR: train this many query groups (training only; 1 = off)"),
    "denoising_groups": (
        int,
        "DN-DETR: train with this many noised copies of the ground truth as queries (training only; 0 = off)",
    ),
    "freeze_backbone": (None, "do not train the backbone"),
}


def _cmd_train(args: argparse.Namespace) -> int:
    from .train_config import build_config, parse_assignment
    from .trainer import Trainer

    overrides = {}
    for name in _TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None and value is not False:
            overrides[name] = value
    if args.masks:
        overrides["model.masks"] = True
    if args.panoptic:
        overrides["panoptic"] = True
    for assignment in args.set or []:
        key, value = parse_assignment(assignment)
        overrides[key] = value
    if args.resume:
        from .train_config import TrainConfig

        output_dir = overrides.get("output_dir") or build_config(args.preset, args.config).output_dir
        trainer = Trainer(TrainConfig(output_dir=output_dir), resume=True, overrides=overrides)
    else:
        trainer = Trainer(build_config(args.preset, args.config, overrides), overwrite=args.overwrite)
    trainer.fit()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate_cli import run_eval

    return run_eval(args)


def _cmd_plot(args: argparse.Namespace) -> int:
    from .fileio import check_output
    from .plot import plot_run

    if args.out is not None:
        # Redrawing a picture is fine; replacing anything else (a checkpoint, the metrics) is not.
        check_output(
            args.out, option="--out", overwrite=args.overwrite, replaceable=lambda p: p.suffix == ".png"
        )
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoints import load_model
    from .export import export_onnx, export_torchscript, onnx_max_diff
    from .fileio import check_output

    check_output(args.out, option="--out", inputs=[args.weights], overwrite=args.overwrite)
    model = load_model(args.weights)
    if args.format == "onnx":
        path = export_onnx(model, args.out, opset=args.opset)
        print(f"wrote {path} (ONNX opset {args.opset}; dynamic batch, height and width)")
        try:
            diffs = onnx_max_diff(model, path)
        except ImportError:
            print("onnxruntime is not installed: output not checked")
        else:
            print(
                "onnxruntime max abs diff vs PyTorch: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            )
    else:
        path = export_torchscript(model, args.out)
        print(f"wrote {path} (TorchScript, traced)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .detector import Detector
    from .serve import ServeConfig, serve

    # Options are checked before the (slow) model load.
    config = ServeConfig(
        threshold=args.threshold,
        max_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        body_timeout=args.body_timeout,
    )
    detector = Detector.from_pretrained(args.weights, device=args.device, batch_size=args.max_batch)
    serve(detector, args.host, args.port, config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detrkit", description="DETR: detection transformers in PyTorch")
    parser.add_argument("--version", action="version", version=f"detrkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert", help="convert a checkpoint between detrkit, original DETR and Hugging Face formats"
    )
    p.add_argument(
        "src", help="checkpoint to read: .pth, .safetensors, a Hugging Face folder or an official name"
    )
    p.add_argument("dst", help="where to write (a .safetensors / .pth file, or a folder for --to hf)")
    p.add_argument("--to", required=True, choices=("detrkit", "original", "hf"), help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--dilation", action="store_true", help="the source is a DC5 model whose file does not say so"
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", help="train or fine-tune a DETR (torchrun for several processes)")
    p.add_argument("--config", help="YAML/TOML/JSON file of training options")
    p.add_argument("--preset", help=", ".join(PRESETS))
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir; given options override"
    )
    p.add_argument("--masks", action="store_true", help="train the mask head too (instance segmentation)")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh in an --output-dir that holds another run"
    )
    p.add_argument(
        "--panoptic", action="store_true", help="COCO panoptic data: things + stuff with masks, PQ evaluation"
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any option, e.g. model.num_queries=50"
    )
    for name, (kind, text) in _TRAIN_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is None:
            p.add_argument(flag, action="store_true", default=None, help=text)
        else:
            p.add_argument(flag, type=kind, default=None, help=text)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="COCO AP of a checkpoint on a COCO-format dataset")
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an official name")
    p.add_argument("--data", required=True, help='dataset root, an instances JSON, or "synthetic"')
    p.add_argument("--split", default="val2017")
    p.add_argument(
        "--panoptic", action="store_true", help="PQ on COCO panoptic annotations (panoptic models)"
    )
    p.add_argument("--out", default=None, help="folder for results.json and metrics.json")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument(
        "--image-scale", type=positive_float, default=None, help="default: what the model was trained with"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=non_negative_int, default=2)
    p.set_defaults(func=_cmd_eval)

    from .explain import add_parser as add_explain
    from .predict_cli import add_parser as add_predict

    add_predict(sub)
    add_explain(sub)

    p = sub.add_parser("export", help="export a model to ONNX (dynamic shapes) or TorchScript")
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an official name")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="file to write (.onnx / .pt)")
    p.add_argument(
        "--opset", type=bounded(int, 18, None, "the ONNX opset"), default=18, help="ONNX opset (default 18)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_export)

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
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("plot", help="draw a run's loss and AP curves to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_plot)

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
    p.set_defaults(func=_cmd_synth)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate COCO annotation files (and their images)")
    p.add_argument("path", help="an instances JSON, or a dataset root with annotations/instances_*.json")
    p.add_argument("--images", default=None, help="image folder (default: inferred from the COCO layout)")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("info", help="print the configuration a checkpoint loads with")
    p.add_argument("weights")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data.coco import DatasetError
    from .data.images import ImageLoadError
    from .engine import TrainingError
    from .errors import CheckpointError, ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        CheckpointError,
        ConfigError,
        DatasetError,
        ImageLoadError,
        FileNotFoundError,
        TrainingError,
    ) as e:
        print(f"detrkit {args.command}: error: {e}", file=sys.stderr)
        return 2
