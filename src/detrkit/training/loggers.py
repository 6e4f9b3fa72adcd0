"""Experiment trackers a run reports to (``--log tensorboard,wandb,mlflow``), through the libraries
themselves (optional extras): the options as hyper-parameters, every epoch's losses, learning rate
and evaluation (per-class AP included) as scalars, and a few validation images with the model's
detections drawn on them at each evaluation. Only the main process reports (under torchrun).

- **TensorBoard** writes event files to ``RUN/tensorboard`` (``tensorboard --logdir RUN``).
- **W&B** logs to the project ``$WANDB_PROJECT`` (default ``detrkit``), the run named after the run
  folder; ``WANDB_MODE=offline`` keeps it in ``RUN/wandb`` for a later ``wandb sync``. A resumed
  run continues the same W&B run.
- **MLflow** logs to ``$MLFLOW_TRACKING_URI`` when set, else to a file store in ``RUN/mlruns``
  (``mlflow ui --backend-store-uri RUN/mlruns``), experiment ``$MLFLOW_EXPERIMENT_NAME`` (default
  ``detrkit``). A resumed run continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingExtra
from ..fileio import write_json_atomic

LOGGERS = ("tensorboard", "wandb", "mlflow")
IDS = "loggers.json"  # the W&B and MLflow run ids of a run folder, for --resume


def parse_loggers(text: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ``("tensorboard", "wandb")``; an unknown name is refused."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"log={text!r}: unknown logger(s) {', '.join(unknown)}; choose from {', '.join(LOGGERS)}"
        )
    return names


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as ``{"model.d_model": 256, ...}`` with plain values (hyper-parameters)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch's ``metrics.jsonl`` record: ``train/<loss>``, ``lr``,
    ``train_seconds`` and the evaluation's ``val/...``, ``bbox/...``, ``panoptic/...`` keys."""
    out = {f"train/{k}": v for k, v in record.get("train", {}).items()}
    out.update({k: record[k] for k in ("lr", "train_seconds") if k in record})
    out.update({k: v for k, v in record.get("val", {}).items() if k not in ("images", "images_unreadable")})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


class Loggers:
    """The run's trackers, called at the start, after each epoch and at the end."""

    def __init__(
        self, names: tuple[str, ...], run_dir: Path, config: dict[str, Any], *, resume: bool
    ) -> None:
        self.run_dir = run_dir
        ids_path = run_dir / IDS
        ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
        self.trackers: list[Any] = []
        try:
            for name in names:
                self.trackers.append(_BUILDERS[name](run_dir, config, ids.get(name)))
        except BaseException:
            self.close()
            raise
        ids = {t.name: t.run_id for t in self.trackers if getattr(t, "run_id", None)}
        if ids:
            write_json_atomic(ids_path, ids)

    def log_epoch(self, record: dict[str, Any], pictures: Callable[[], dict[str, Any]] | None = None) -> None:
        """One epoch's record; ``pictures()`` (PIL images by name) is called only when the epoch was
        evaluated and a tracker is there to take them."""
        if not self.trackers:
            return
        step = int(record["epoch"])
        values = scalars(record)
        images = pictures() if pictures is not None and "val" in record else {}
        for tracker in self.trackers:
            tracker.log_scalars(values, step)
            if images:
                tracker.log_images(images, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingExtra("--log tensorboard", "tensorboard", e) from e
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        # The options as text (hparams would need a final metric, and a resumed run adds no new table).
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat(config).items()))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_images(self, images: dict[str, Any], step: int) -> None:
        import numpy as np

        for key, image in images.items():
            self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise MissingExtra("--log wandb", "wandb", e) from e
        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "detrkit"), name=run_dir.name, dir=str(run_dir),
                config=flat(config), id=run_id, resume="allow" if run_id else None,
            )  # fmt: skip
        except wandb.errors.UsageError as e:  # e.g. not logged in, online mode without a key
            raise ConfigError(f"--log wandb: {e} (run `wandb login`, or set WANDB_MODE=offline)") from None
        self.run_id = self.run.id

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "epoch": step}, step=step)

    def log_images(self, images: dict[str, Any], step: int) -> None:
        self.run.log({key: self.wandb.Image(image) for key, image in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise MissingExtra("--log mlflow", "mlflow", e) from e
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # No server configured: a file store in the run folder. MLflow keeps file stores in
            # maintenance mode and asks for this opt-in; a database store needs the full mlflow.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "detrkit")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [(k, str(v)[:6000]) for k, v in flat(config).items()]
            from mlflow.entities import Param

            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params])
        self.run_id = run_id

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow keys allow letters, digits and _-./ and spaces: a class name may hold others.
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_images(self, images: dict[str, Any], step: int) -> None:
        for key, image in images.items():
            self.client.log_image(self.run_id, image, key=_mlflow_key(key), step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


_BUILDERS: dict[str, Callable[[Path, dict[str, Any], str | None], Any]] = {
    "tensorboard": _TensorBoard,
    "wandb": _Wandb,
    "mlflow": _Mlflow,
}


def validation_pictures(model, dataset, device, count: int = 4, threshold: float = 0.5) -> dict[str, Any]:
    """The first ``count`` images of ``dataset`` as the network sees them, with the detections
    scored >= ``threshold`` drawn: ``{"val/image_<id>": PIL image}``."""
    import torch
    from PIL import Image

    from ..data.transforms import denormalize
    from ..drawing import draw_boxes
    from ..models.postprocess import PostProcess

    config = model.config
    names = list(config.class_names or [str(i) for i in range(config.num_classes)])
    pictures = {}
    was_training = model.training
    model.eval()
    postprocess = PostProcess()
    with torch.no_grad():
        for index in range(min(count, len(dataset))):
            sample = dataset[index]
            if not isinstance(sample, tuple):  # an unreadable image
                continue
            image, target = sample
            outputs = model(image[None].to(device))
            height, width = image.shape[-2:]
            det = postprocess(outputs, torch.tensor([[height, width]], device=device))[0]
            keep = det["scores"] >= threshold
            pixels = (denormalize(image.cpu()) * 255).round().byte().permute(1, 2, 0).numpy()
            labels = det["labels"][keep].tolist()
            texts = [f"{names[i]} {s:.2f}" for i, s in zip(labels, det["scores"][keep].tolist())]
            picture = draw_boxes(Image.fromarray(pixels), det["boxes"][keep].tolist(), texts, labels)
            pictures[f"val/image_{int(target['image_id'])}"] = picture
    model.train(was_training)
    return pictures
