"""Where a training step's time goes: data, forward, matcher, loss, backward, optimizer.

Builds a preset's trainer on the synthetic data and times each phase of ``--steps`` optimizer
steps (after ``--warmup``), on the CPU or the configured device (CUDA is synchronised around each
phase). Prints the median milliseconds per step of each phase and its share.

    python bench/profile_step.py --preset cpu-tiny
    python bench/profile_step.py --preset detr-r50 --set batch_size=2 --set image_scale=1.0 --steps 5

The matcher runs inside the criterion; it is timed by wrapping ``criterion.matcher``, and "loss"
is the criterion's time without it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from torch import nn

from detrkit.engine import amp_autocast
from detrkit.train_config import build_config, parse_assignment
from detrkit.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"synth_images": 256, "backbone_pretrain_steps": 0, "output_dir": f"{tmp}/run"}
        overrides.update(dict(parse_assignment(a) for a in args.set))
        config = build_config(args.preset, overrides=overrides)
        trainer = Trainer(config, log=lambda msg: None)
        profile(trainer, args.steps, args.warmup)


def profile(trainer: Trainer, steps: int, warmup: int) -> None:
    model, criterion, optimizer, device = trainer.module, trainer.criterion, trainer.optimizer, trainer.device
    config = trainer.config

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = defaultdict(list)
    matcher_time = [0.0]
    started = [0.0]

    def before(*_):
        sync()
        started[0] = time.perf_counter()

    def after(*_):
        sync()
        matcher_time[0] += time.perf_counter() - started[0]

    criterion.matcher.register_forward_pre_hook(before)
    criterion.matcher.register_forward_hook(after)
    model.train()
    criterion.train()
    done, epoch = 0, 0
    while done < steps + warmup:
        loader = iter(trainer._train_loader(epoch))
        epoch += 1
        while done < steps + warmup:
            phase: dict[str, float] = {}
            t = time.perf_counter()
            try:
                batch = next(loader)
            except StopIteration:
                break
            batch = batch.to(device)
            sync()
            phase["data"] = time.perf_counter() - t
            t = time.perf_counter()
            with amp_autocast(device, trainer.amp):
                outputs = model(batch.images, batch.padding_mask)
            sync()
            phase["forward"] = time.perf_counter() - t
            matcher_time[0] = 0.0
            t = time.perf_counter()
            norm = criterion.loss_norm([batch.targets], device=device)
            loss_dict = criterion(outputs, batch.targets, norm)
            loss = sum(
                loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict
            )
            sync()
            phase["matcher"] = matcher_time[0]
            phase["loss"] = time.perf_counter() - t - matcher_time[0]
            t = time.perf_counter()
            loss.backward()
            sync()
            phase["backward"] = time.perf_counter() - t
            t = time.perf_counter()
            if config.clip_max_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            phase["optimizer"] = time.perf_counter() - t
            done += 1
            if done > warmup:
                for key, value in phase.items():
                    times[key].append(value)

    medians = {k: 1000 * statistics.median(v) for k, v in times.items()}
    total = sum(medians.values())
    images = config.batch_size
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {device}"
    )
    print(
        f"{config.model.get('backbone', 'resnet50')}, batch {images}, image_scale {config.image_scale}, {steps} steps"
    )
    print(f"{'phase':>10} {'ms/step':>9} {'share':>7}")
    for key, value in medians.items():
        print(f"{key:>10} {value:9.1f} {100 * value / total:6.1f}%")
    print(f"{'total':>10} {total:9.1f}   ({1000 * images / total:.1f} images/s)")


if __name__ == "__main__":
    main()
