"""Fine-tuning side by side: detrkit's recipe against the transformers object-detection guide's.

From the same start weights, a small dataset of new classes is learned for the same training
minutes by (a) ``detrkit train --preset finetune --init-from START`` and (b) the recipe of the
transformers guide (``DetrForObjectDetection.from_pretrained(START, id2label=...,
ignore_mismatched_sizes=True)``, its ``DetrImageProcessor``, ``Trainer`` with the guide's
``TrainingArguments``: learning rate 5e-5, cosine schedule with 300 warm-up steps, weight decay
1e-4, gradient clipping 0.01, batch 8, 30 epochs). Both are evaluated on the same held-out images by
the same COCO evaluator (detrkit's, faster-coco-eval), with the same resize, at points of training
time that exclude evaluation; both run in this process on the same threads, with the CPU's mixed
precision where it has native bf16 (the guide's ``fp16=True`` is a GPU setting).

The start weights (``--start``, a folder ``DetrForObjectDetection.from_pretrained`` loads) are by
default made here: a ``cpu-tiny``-sized model with a full ResNet-18 (transformers' DETR always uses
all four stages) trained for ``--start-minutes`` on the synthetic basic shapes, saved in the Hugging
Face layout. The small dataset is the synthetic *other* shapes (crosses, rings, hexagons,
half-discs): ``--images`` training and ``--val-images`` held-out images.

    python bench/finetune_vs_transformers.py --minutes 10 --images 100 --out bench/results/finetune-vs-hf-100

Writes ``OUT/comparison.json`` (``{"detrkit": [...], "transformers": [...]}``, each point
``{"minutes", "epoch", "AP50", "AP"}`` with AP as fractions, plus the machine and both recipes),
``OUT/comparison.png``, and prints the table. The guide's augmentations that need albumentations
(perspective, hue/saturation, each with p=0.1) are left out; its flips and brightness/contrast
changes are applied with torchvision.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _machine import describe

import detrkit
from detrkit.amp import cpu_has_native_bf16
from detrkit.data import (
    CocoDetection,
    SynthConfig,
    TransformConfig,
    collate,
    eval_transforms,
    write_synthetic,
)
from detrkit.evaluation.coco import CocoEvaluator
from detrkit.fileio import atomic_write, write_json_atomic
from detrkit.training.config import build_config
from detrkit.training.run_dir import METRICS
from detrkit.training.trainer import Trainer

START_SCALE = 0.2  # the synthetic images are 128-192 px: about their own size
# The guide's TrainingArguments (https://huggingface.co/docs/transformers/tasks/object_detection).
GUIDE = {
    "learning_rate": 5e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 300,
    "weight_decay": 1e-4,
    "max_grad_norm": 0.01,
    "per_device_train_batch_size": 8,
    "num_train_epochs": 30,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes per side")
    parser.add_argument("--images", type=int, default=100, help="training images of the small set")
    parser.add_argument("--val-images", type=int, default=200, help="held-out images both are evaluated on")
    parser.add_argument("--out", default="bench/results/finetune-vs-transformers")
    parser.add_argument(
        "--start", default=None, help="start weights (a Hugging Face DETR folder); default: made here"
    )
    parser.add_argument(
        "--start-minutes", type=float, default=10.0, help="training minutes of the start weights"
    )
    parser.add_argument(
        "--start-pretrain-steps",
        type=int,
        default=800,
        help="backbone pretraining steps of the start weights",
    )
    parser.add_argument(
        "--keep-transformers",
        action="store_true",
        help="reuse the transformers side of an earlier OUT/comparison.json (same data and start): "
        "to measure a change of detrkit's recipe alone",
    )
    parser.add_argument("--evals", type=int, default=8, help="evaluations per side (about)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = (
        Path(args.start)
        if args.start
        else make_start(out / "start", args.start_minutes, args.start_pretrain_steps)
    )
    data = out / "data"
    if not (data / "annotations" / "instances_val2017.json").exists():
        write_synthetic(
            data,
            SynthConfig(shapes="other", seed=1000 + args.seed),
            {"train": args.images, "val": args.val_images},
        )
    results = {
        "machine": describe(args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": args.minutes,
        "images": args.images,
        "val_images": args.val_images,
        "start": str(start),
        "transformers": earlier_transformers(out)
        if args.keep_transformers
        else run_transformers(start, data, out / "transformers", args),
        "transformers_recipe": GUIDE,
    }
    # detrkit evaluates every N epochs: N from the guide's epochs in the budget, for about --evals points.
    epochs = max((p["epoch"] for p in results["transformers"]), default=args.evals)
    results["detrkit"] = run_detrkit(start, data, out / "detrkit", args, max(1, round(epochs / args.evals)))
    write_json_atomic(out / "comparison.json", results)
    print(table(results))
    plot(results, out / "comparison.png")


def earlier_transformers(out: Path) -> list[dict]:
    """The transformers side of the comparison already in ``out``."""
    previous = out / "comparison.json"
    if not previous.exists():
        raise SystemExit(f"--keep-transformers: no {previous} to take the transformers side from")
    return json.loads(previous.read_text())["transformers"]


def make_start(folder: Path, minutes: float, pretrain_steps: int) -> Path:
    """The start weights: cpu-tiny with a full ResNet-18, trained on the basic shapes, in the
    Hugging Face layout."""
    if (folder / "config.json").exists():
        return folder
    run = folder.parent / "start-run"
    config = build_config(
        "cpu-tiny",
        overrides={
            "model.last_stage": 4, "image_scale": START_SCALE, "time_budget": minutes, "epochs": 10_000,
            "eval_every": 0, "output_dir": str(run), "synth_images": 4096, "backbone_pretrain_steps": pretrain_steps,
        },
    )  # fmt: skip
    Trainer(config, overwrite=True).fit()
    model = detrkit.load_model(run / "checkpoint_last.pth")
    detrkit.save_model(model, folder, fmt="hf")
    return folder


def run_detrkit(start: Path, data: Path, run: Path, args, epochs_per_eval: int) -> list[dict]:
    """detrkit's fine-tuning recipe for --minutes (with the guide's batch size); the points are its
    evaluations, every ``epochs_per_eval`` epochs and at the end."""
    overrides = {
        "init_from": str(start), "data": str(data), "output_dir": str(run), "time_budget": args.minutes,
        "num_workers": 0, "amp": "auto", "seed": args.seed, "batch_size": GUIDE["per_device_train_batch_size"],
        "eval_every": epochs_per_eval,
    }  # fmt: skip
    Trainer(build_config("finetune", overrides=overrides), overwrite=True).fit()
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("epoch", 0) > 0]
    points = [(r, r["val"]) for r in records if "bbox/AP50" in r.get("val", {})]
    if records and records[-1].get("val") is None:  # the run's last epoch, evaluated at its end
        points.append((records[-1], json.loads((run / "final_metrics.json").read_text())))
    return [
        {
            "minutes": round(r["train_seconds"] / 60, 3),
            "epoch": r["epoch"],
            "AP50": m["bbox/AP50"],
            "AP": m["bbox/AP"],
        }
        for r, m in points
    ]


def run_transformers(start: Path, data: Path, folder: Path, args) -> list[dict]:
    """The guide's recipe on the same data for --minutes of training (evaluation excluded)."""
    import transformers
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from detrkit.models.postprocess import PostProcess

    transformers.set_seed(args.seed)
    sizes = TransformConfig.scaled(START_SCALE)
    # The new data's own label space (its categories, in id order), as the guide's id2label.
    train = CocoDetection(data / "train2017", data / "annotations" / "instances_train2017.json")
    val = CocoDetection(
        data / "val2017", data / "annotations" / "instances_val2017.json", eval_transforms(sizes)
    )
    ids = list(val.category_map.category_ids)
    label_of = {c: i for i, c in enumerate(ids)}
    id2label = dict(enumerate(val.category_map.names))
    model = transformers.DetrForObjectDetection.from_pretrained(
        start, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True
    )
    processor = transformers.DetrImageProcessor(
        size={"shortest_edge": sizes.eval_size, "longest_edge": sizes.max_size}
    )
    augment = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomApply([v2.ColorJitter(0.2, 0.2)], p=0.5)])

    class GuideDataset(torch.utils.data.Dataset):
        """The guide's dataset: augmented images, COCO annotations through the image processor."""

        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, index: int) -> dict:
            image_id = train.ids[index]
            image = train._load(train.images[image_id], train.source).convert("RGB")
            anns = [
                a for a in train.data["annotations"] if a["image_id"] == image_id and not a.get("iscrowd")
            ]
            boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            xyxy = tv_tensors.BoundingBoxes(
                torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
                format="XYXY",
                canvas_size=image.size[::-1],
            )
            image, xyxy = augment(image, xyxy)
            coco = [
                {"image_id": image_id, "category_id": label_of[a["category_id"]], "iscrowd": 0,
                 "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                 "area": float((b[2] - b[0]) * (b[3] - b[1]))}
                for a, b in zip(anns, xyxy.tolist(), strict=True)
            ]  # fmt: skip
            encoded = processor(
                images=image, annotations={"image_id": image_id, "annotations": coco}, return_tensors="pt"
            )
            return {"pixel_values": encoded["pixel_values"][0], "labels": encoded["labels"][0]}

    def collate_fn(batch):
        # The processor's padding: zeros at the bottom and right, pixel_mask 1 on the image.
        height = max(b["pixel_values"].shape[1] for b in batch)
        width = max(b["pixel_values"].shape[2] for b in batch)
        pixels = torch.zeros(len(batch), 3, height, width)
        mask = torch.zeros(len(batch), height, width, dtype=torch.long)
        for i, b in enumerate(batch):
            _, h, w = b["pixel_values"].shape
            pixels[i, :, :h, :w] = b["pixel_values"]
            mask[i, :h, :w] = 1
        return {"pixel_values": pixels, "pixel_mask": mask, "labels": [b["labels"] for b in batch]}

    postprocess = PostProcess()
    points: list[dict] = []
    budget = 60 * args.minutes
    epochs_per_eval = max(1, GUIDE["num_train_epochs"] // args.evals)

    def evaluate(epoch: float, seconds: float) -> None:
        evaluator = CocoEvaluator(val.data, val.category_map)
        model.eval()
        loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate)
        with torch.inference_mode():
            for batch in loader:
                with torch.autocast("cpu", torch.bfloat16, enabled=cpu_has_native_bf16()):
                    hf = model(pixel_values=batch.images, pixel_mask=(~batch.padding_mask).long())
                sizes_ = torch.stack([t["orig_size"] for t in batch.targets])
                outputs = {"pred_logits": hf.logits.float(), "pred_boxes": hf.pred_boxes.float()}
                evaluator.update([int(t["image_id"]) for t in batch.targets], postprocess(outputs, sizes_))
        metrics = evaluator.summarize()
        model.train()
        points.append({"minutes": round(seconds / 60, 3), "epoch": round(epoch), "AP50": metrics["bbox/AP50"],
                       "AP": metrics["bbox/AP"]})  # fmt: skip
        print(f"transformers: epoch {epoch:.0f}, {seconds / 60:.2f} min: AP50 {metrics['bbox/AP50']:.3f}")

    class Clock(transformers.TrainerCallback):
        """Training seconds without evaluation; stops the run at the budget."""

        def __init__(self) -> None:
            self.seconds, self.since = 0.0, None

        def on_train_begin(self, *a, **k):
            self.since = time.perf_counter()

        def _tick(self) -> float:
            now = time.perf_counter()
            self.seconds += now - self.since
            self.since = now
            return self.seconds

        def on_step_end(self, args_, state, control, **k):
            if self._tick() >= budget:
                control.should_training_stop = True

        def on_epoch_end(self, args_, state, control, **k):
            seconds = self._tick()
            done = control.should_training_stop or round(state.epoch) >= GUIDE["num_train_epochs"]
            if done or round(state.epoch) % epochs_per_eval == 0:
                evaluate(state.epoch, seconds)
            self.since = time.perf_counter()  # the evaluation is not training time

    training_args = transformers.TrainingArguments(
        output_dir=str(folder), **GUIDE, bf16=cpu_has_native_bf16(), use_cpu=True, dataloader_num_workers=0,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], remove_unused_columns=False,
        seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=GuideDataset(),
        data_collator=collate_fn,
        callbacks=[Clock()],
    )
    trainer.train()
    return points


def table(results: dict) -> str:
    lines = [
        f"{results['images']} training images, {results['val_images']} held-out; {results['minutes']} min per side; "
        f"{results['machine']}",
        f"{'side':<13} {'minutes':>8} {'epoch':>6} {'AP50':>6} {'AP':>6}",
    ]
    for side in ("detrkit", "transformers"):
        for p in results[side]:
            lines.append(
                f"{side:<13} {p['minutes']:>8.2f} {p['epoch']:>6} {100 * p['AP50']:>6.1f} {100 * p['AP']:>6.1f}"
            )
    for side in ("detrkit", "transformers"):
        best = max(results[side], key=lambda p: p["AP50"], default=None)
        if best:
            lines.append(f"best {side}: AP50 {100 * best['AP50']:.1f} at {best['minutes']:.2f} min")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, style in (("detrkit", "o-"), ("transformers", "s--")):
        points = results[side]
        ax.plot([p["minutes"] for p in points], [100 * p["AP50"] for p in points], style, label=side)
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel("AP50 on the held-out images")
    ax.set_title(f"fine-tuning on {results['images']} images ({results['date']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), suffix=".png")
    plt.close(fig)


if __name__ == "__main__":
    main()
