"""Training-step time of detrkit vs Hugging Face transformers on the same DETR weights and batch.

Builds a transformers ``DetrForObjectDetection`` (ResNet-50 by default) with random weights, saves
it, loads the same file with ``detrkit.load_model``, and times one full training step of each —
forward, loss (Hungarian matching included), backward, gradient clipping (0.1) and an AdamW step
(lr 1e-4, backbone 1e-5, weight decay 1e-4) — interleaved, after a warm-up, on the same images and
targets. Prints both losses of the first step (they must agree: same weights, same batch), the
median step times and their ratio.

    python bench/train_step_vs_transformers.py --size 800 1066 --batch 2 --runs 5
    python bench/train_step_vs_transformers.py --size 96 128 --batch 16 --runs 10   # cpu-tiny sizes

``--amp bf16`` runs both forwards under the same autocast (as training with ``amp=bf16`` does;
transformers computes its loss inside the forward, so under it too); fp32 by default.

transformers is timed twice: with its config's defaults (``attention_dropout=0``,
``activation_dropout=0``: what its users run) and with the original DETR's dropout of 0.1 on the
attention weights and inside the FFN too, which is what detrkit trains with — the same computation.

Auxiliary losses are off by default: with them on, transformers departs from the original DETR
(see REFERENCE.md) and the two losses would not be comparable; ``--aux`` turns them on for both.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from _machine import add_malloc_option, apply_malloc, describe
from torch import nn

import detrkit
from detrkit.amp import amp_autocast
from detrkit.models.criterion import build_criterion


def _optimizer(model: nn.Module, backbone_prefix: str) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.startswith(backbone_prefix)], "lr": 1e-4},
        {"params": [p for n, p in named if n.startswith(backbone_prefix)], "lr": 1e-5},
    ]
    return torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--aux", action="store_true", help="auxiliary decoding losses on (both)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast for both")
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc(args.malloc)

    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.DetrConfig(
        use_timm_backbone=True, backbone=args.backbone, auxiliary_loss=args.aux, num_labels=91
    )
    hf = transformers.DetrForObjectDetection(config)
    # The same weights with the original's dropout everywhere (DetrConfig defaults to 0.1 only on
    # the residual branches).
    hf_orig = transformers.DetrForObjectDetection(
        transformers.DetrConfig(**{**config.to_dict(), "attention_dropout": 0.1, "activation_dropout": 0.1})
    )
    hf_orig.load_state_dict(hf.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = detrkit.load_model(tmp, device=args.device, aux_loss=args.aux)
    hf = hf.to(args.device).train()
    hf_orig = hf_orig.to(args.device).train()
    ours.train()
    criterion = build_criterion(ours.config).to(args.device)
    opt_ours = _optimizer(ours, "backbone.")
    opt_hf = _optimizer(hf, "model.backbone.")
    opt_hf_orig = _optimizer(hf_orig, "model.backbone.")

    h, w = args.size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, h, w, generator=g).to(args.device)
    padding_mask = torch.zeros(args.batch, h, w, dtype=torch.bool, device=args.device)
    if args.batch > 1:  # a realistic padded batch: the other images are smaller
        padding_mask[1:, :, w * 3 // 4 :] = True
    targets = []
    for _ in range(args.batch):
        n = int(torch.randint(1, 8, (), generator=g))
        boxes = torch.cat(
            [torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1
        )
        targets.append({"labels": torch.randint(0, 91, (n,), generator=g), "boxes": boxes})
    targets = [{k: v.to(args.device) for k, v in t.items()} for t in targets]
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    device = torch.device(args.device)

    def step_ours() -> float:
        with amp_autocast(device, args.amp):
            outputs = ours(images, padding_mask)
        losses = criterion(outputs, targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        loss.backward()
        nn.utils.clip_grad_norm_(ours.parameters(), 0.1)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.detach()

    def hf_step(model, optimizer):
        def step() -> float:
            with amp_autocast(device, args.amp):
                out = model(
                    pixel_values=images, pixel_mask=(~padding_mask).long(), labels=copy.copy(hf_labels)
                )
            loss = out.loss
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    step_hf, step_hf_orig = hf_step(hf, opt_hf), hf_step(hf_orig, opt_hf_orig)

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = float(step_ours()), float(step_hf()), float(step_hf_orig())  # also the warm-up
    t_ours, t_hf, t_hf_orig = [], [], []
    for _ in range(args.runs):  # interleaved so both see the same machine state
        t_ours.append(timed(step_ours))
        t_hf.append(timed(step_hf))
        t_hf_orig.append(timed(step_hf_orig))

    m_ours, m_hf, m_hf_orig = statistics.median(t_ours), statistics.median(t_hf), statistics.median(t_hf_orig)
    print(f"machine: {describe(args.threads)}, device {args.device}, {malloc}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, detrkit {detrkit.__version__}"
    )
    print(
        f"{args.backbone}, batch {args.batch} x 3 x {h} x {w}, aux losses {'on' if args.aux else 'off'}, amp {args.amp}; "
        f"first-step loss: detrkit {first[0]:.5f}, transformers {first[1]:.5f} / {first[2]:.5f}"
    )
    print(
        f"detrkit      median {m_ours * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in t_ours)})"
    )
    print(f"transformers median {m_hf * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in t_hf)})")
    print(
        f"  + original dropout {m_hf_orig * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in t_hf_orig)})"
    )
    print(
        f"time ratio detrkit/transformers: {m_ours / m_hf:.2f} (its defaults), {m_ours / m_hf_orig:.2f} (same dropout)"
    )


if __name__ == "__main__":
    main()
