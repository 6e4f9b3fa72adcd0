"""Where a training step's time goes: data, forward, matcher, loss, backward, optimizer.

Builds a preset's trainer on the synthetic data and times each phase of ``--steps`` optimizer
steps (after ``--warmup``), on the CPU or the configured device (CUDA is synchronised around each
phase). Prints the median milliseconds per step of each phase and its share.

With several ``--amp`` values (e.g. ``--amp none bf16``) every batch is trained once in each
precision in turn, so the columns are measured side by side under the same machine load (the
model keeps training through all of them; only the timings matter here).

    python bench/profile_step.py --preset cpu-tiny
    python bench/profile_step.py --preset cpu-tiny --amp none bf16
    python bench/profile_step.py --preset detr-r50 --set batch_size=2 --set image_scale=1.0 --steps 5

The matcher runs inside the criterion; it is timed by wrapping ``criterion.matcher``, and "loss"
is the criterion's time without it. "data" is loading and batching one batch in the main process
(the preset's ``num_workers``), counted once for every precision.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from _machine import describe
from torch import nn

from detrkit.amp import amp_autocast, resolve_amp
from detrkit.training.build import train_loader
from detrkit.training.config import build_config, parse_assignment
from detrkit.training.trainer import Trainer

PHASES = ("data", "forward", "matcher", "loss", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--amp", nargs="+", default=None, help="precisions to compare (default: the config's amp, resolved)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"synth_images": 256, "backbone_pretrain_steps": 0, "output_dir": f"{tmp}/run"}
        overrides.update(dict(parse_assignment(a) for a in args.set))
        config = build_config(args.preset, overrides=overrides)
        trainer = Trainer(config, log=lambda msg: None)
        amps = [resolve_amp(a, trainer.device) for a in args.amp] if args.amp else [trainer.amp]
        times = profile(trainer, amps, args.steps, args.warmup)
    report(trainer, amps, times, args.steps)


def profile(trainer: Trainer, amps: list[str], steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each phase of each step, per precision: ``{amp: {phase: [seconds, ...]}}``."""
    model, criterion, optimizer, device = trainer.module, trainer.criterion, trainer.optimizer, trainer.device
    config = trainer.config

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, dict[str, list[float]]] = {amp: defaultdict(list) for amp in amps}
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
        loader = iter(train_loader(trainer.config, trainer.train_set, epoch))
        epoch += 1
        while done < steps + warmup:
            t = time.perf_counter()
            try:
                batch = next(loader)
            except StopIteration:
                break
            batch = batch.to(device)
            sync()
            data = time.perf_counter() - t
            for amp in amps:
                phase = {"data": data}
                t = time.perf_counter()
                with amp_autocast(device, amp):
                    outputs = model(batch.images, batch.padding_mask)
                sync()
                phase["forward"] = time.perf_counter() - t
                matcher_time[0] = 0.0
                t = time.perf_counter()
                norm = criterion.loss_norm([batch.targets], device=device)
                loss_dict = criterion(outputs, batch.targets, norm)  # outside autocast, as in training
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
                if done >= warmup:
                    for key, value in phase.items():
                        times[amp][key].append(value)
            done += 1
    return times


def report(trainer: Trainer, amps: list[str], times: dict[str, dict[str, list[float]]], steps: int) -> None:
    config = trainer.config
    print(f"machine: {describe()}, device {trainer.device}")
    print(
        f"{config.model.get('backbone', 'resnet50')}, batch {config.batch_size}, "
        f"image_scale {config.image_scale}, {steps} steps"
    )
    medians = {amp: {k: 1000 * statistics.median(times[amp][k]) for k in PHASES} for amp in amps}
    totals = {amp: sum(medians[amp].values()) for amp in amps}
    print(f"{'phase':>10}" + "".join(f" {'ms (' + amp + ')':>12} {'share':>6}" for amp in amps))
    for key in PHASES:
        cells = "".join(
            f" {medians[amp][key]:12.1f} {100 * medians[amp][key] / totals[amp]:5.1f}%" for amp in amps
        )
        print(f"{key:>10}{cells}")
    print(f"{'total':>10}" + "".join(f" {totals[amp]:12.1f} {'':>6}" for amp in amps))
    print(
        f"{'images/s':>10}"
        + "".join(f" {1000 * config.batch_size / totals[amp]:12.1f} {'':>6}" for amp in amps)
    )
    for amp in amps[1:]:
        print(f"step time {amp}/{amps[0]}: {totals[amp] / totals[amps[0]]:.2f}")


if __name__ == "__main__":
    main()
