"""Inference latency of detrkit vs Hugging Face transformers on the same DETR weights.

Builds a transformers ``DetrForObjectDetection`` (ResNet-50, paper sizes) with random weights,
saves it, loads the same file with ``detrkit.load_model``, checks the outputs agree, then times
the forwards side by side (interleaved, after warm-up) and prints medians and ratios: detrkit as
loaded, detrkit with its BatchNorm folded into the convolutions (what ``Detector`` runs), the same
under bf16 autocast (``Detector(precision="bf16")``; with ``--bf16``), the ONNX export run by
onnxruntime in fp32 and quantised to int8 (``detrkit export`` / ``export --int8``; with ``--onnx``;
the int8 file is calibrated here on random images, which sets its speed, not its accuracy: the
AP cost of int8 is what ``detrkit export --int8 --calibrate DATA`` prints), and transformers in fp32.

    python bench/forward_vs_transformers.py --size 800 1066 --batch 1 --runs 5 --bf16 --onnx
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _machine import add_malloc_option, apply_malloc, describe

import detrkit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="also time the folded model under bf16 autocast")
    parser.add_argument("--onnx", action="store_true", help="also time the ONNX export, fp32 and int8 (CPU)")
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc(args.malloc)

    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet50", auxiliary_loss=False)
    hf = transformers.DetrForObjectDetection(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = detrkit.load_model(tmp, device=args.device)
    hf = hf.to(args.device)
    import copy

    from detrkit.models.fold import fold_batchnorm

    folded = copy.deepcopy(ours).eval()
    fold_batchnorm(folded)

    h, w = args.size
    images = torch.randn(args.batch, 3, h, w, device=args.device)
    padding_mask = torch.zeros(args.batch, h, w, dtype=torch.bool, device=args.device)
    if args.batch > 1:  # a realistic padded batch: the second image is smaller
        padding_mask[1:, :, w * 3 // 4 :] = True

    def run_ours():
        return ours(images, padding_mask)

    def run_folded():
        return folded(images, padding_mask)

    def run_bf16():
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16):
            return folded(images, padding_mask)

    runtimes = onnx_runtimes(ours, images, args.threads) if args.onnx else {}
    feed = {
        "images": images.cpu().numpy(),
        "padding_mask": padding_mask.cpu().numpy(),
        "orig_sizes": torch.tensor([[h, w]] * args.batch).numpy(),
    }

    def run_hf():
        return hf(pixel_values=images, pixel_mask=(~padding_mask).long())

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        timed.last = out
        return time.perf_counter() - start

    with torch.inference_mode():
        a, b, c = run_ours(), run_hf(), run_folded()
        diff = max(
            (a["pred_logits"] - b.logits).abs().max().item(),
            (a["pred_boxes"] - b.pred_boxes).abs().max().item(),
        )
        fold_diff = max((a[k] - c[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))
        for _ in range(2):  # warm-up
            run_ours(), run_folded(), run_hf()
            if args.bf16:
                run_bf16()
            for runtime in runtimes.values():
                runtime.run(None, feed)
        t_ours, t_folded, t_bf16, t_hf = [], [], [], []
        t_onnx = {name: [] for name in runtimes}
        for _ in range(args.runs):  # interleaved so all see the same machine state
            t_ours.append(timed(run_ours))
            t_folded.append(timed(run_folded))
            if args.bf16:
                t_bf16.append(timed(run_bf16))
            for name, runtime in runtimes.items():
                t_onnx[name].append(timed(lambda runtime=runtime: runtime.run(None, feed)))
            t_hf.append(timed(run_hf))

    m_ours, m_folded, m_hf = statistics.median(t_ours), statistics.median(t_folded), statistics.median(t_hf)
    print(f"machine: {describe(args.threads)}, device {args.device}, {malloc}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, detrkit {detrkit.__version__}"
    )
    print(f"input: batch {args.batch} x 3 x {h} x {w}; max |diff| of logits and boxes = {diff:.1e}")
    print(
        f"detrkit      median {m_ours * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in t_ours)})"
    )
    print(
        f"detrkit, BN folded median {m_folded * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in t_folded)}); "
        f"max |diff| to unfolded = {fold_diff:.1e}"
    )
    if args.bf16:
        m_bf16 = statistics.median(t_bf16)
        print(
            f"detrkit, BN folded, bf16 median {m_bf16 * 1000:8.1f} ms  "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in t_bf16)}); {m_bf16 / m_hf:.2f}x transformers' fp32 time"
        )
    for name, times in t_onnx.items():
        m = statistics.median(times)
        print(
            f"onnxruntime {name} median {m * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in times)}); "
            f"{m / m_hf:.2f}x transformers' fp32 time"
        )
    print(f"transformers median {m_hf * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in t_hf)})")
    print(f"time / transformers': detrkit {m_ours / m_hf:.2f}x, detrkit BN folded {m_folded / m_hf:.2f}x")


def onnx_runtimes(model, images, threads: int) -> dict:
    """onnxruntime sessions of the post-processed ONNX export of ``model``, fp32 and int8 (the
    int8 file calibrated on noise, as ``detrkit benchmark`` does without --data)."""
    import os

    import onnxruntime

    from detrkit.inference.export import export_onnx
    from detrkit.inference.quantize import noise_feeds, quantize_export

    work = tempfile.mkdtemp(prefix="bench-onnx-")
    fp32 = export_onnx(model, os.path.join(work, "fp32.onnx"))
    int8 = quantize_export(fp32, os.path.join(work, "int8.onnx"), noise_feeds(*images.shape[2:]))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return {
        name: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("fp32", fp32), ("int8", int8))
    }


if __name__ == "__main__":
    main()
