"""Detections for images, folders and videos, written as COCO JSON + pictures (``detrkit predict``).

Outputs under ``--out``:

* ``results.json``: COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``; RLE
  ``segmentation`` for instance masks), readable by any COCO tool;
* ``images.json``: the ``image_id`` -> file, width, height table of those results;
* ``panoptic.json`` + ``panoptic/*.png`` for panoptic models (COCO panoptic format);
* ``annotated/``: one picture per image, mirroring the input folders;
* per video ``VIDEO.annotated.mp4`` and ``VIDEO.frames.json`` (detections per frame).

A file that cannot be read is reported by name and skipped; the exit status is 1 if any was.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.images import ImageLoadError, load_image
from ..evaluation.coco import image_results
from ..fileio import atomic_write, write_json_atomic
from ..models.panoptic import png_bytes
from .draw import draw_detections
from .video import VideoError, predict_video

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def collect_inputs(
    sources: list[str], exclude: Path | None = None
) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Files to process as ``(path, output name)``, plus ``(source, reason)`` for inputs that do
    not exist. Folders are searched recursively for image and video files (skipping ``exclude``,
    the output folder, so a second run does not read its own pictures); files named explicitly are
    always tried. Output names mirror the inputs (``folder/sub/a.jpg``) without their suffix, and
    are made unique (``a-2``) where two inputs would otherwise write the same outputs."""
    found, missing = [], []
    exclude = exclude.resolve() if exclude is not None else None
    for source in sources:
        path = Path(source)
        if path.is_dir():
            top = Path(path.resolve().name or "root")  # "." and ".." name their real folder
            for file in sorted(path.rglob("*")):
                if file.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    continue
                if file.is_symlink() and not file.is_file():  # dangling, or a loop
                    missing.append((str(file), "a symbolic link to nothing readable"))
                    continue
                if not file.is_file():
                    continue
                if exclude is not None and file.resolve().is_relative_to(exclude):
                    continue
                found.append((file, top / file.relative_to(path).with_suffix("")))
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            missing.append((source, "no such file or directory"))
    used: set[str] = set()
    unique = []
    for file, name in found:
        candidate, k = name, 1
        while candidate.as_posix().lower() in used:
            k += 1
            candidate = name.with_name(f"{name.name}-{k}")
        used.add(candidate.as_posix().lower())
        unique.append((file, candidate))
    return unique, missing


class ResultsWriter:
    """Collects the COCO outputs of a prediction run under ``out`` and writes pictures as it goes
    (the files are listed in this module's docstring)."""

    def __init__(self, out: Path, detector, draw: bool) -> None:
        self.out, self.detector, self.draw = out, detector, draw
        self.results: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.panoptic: list[dict[str, Any]] = []
        self.detections = 0

    def add(self, path: Path, name: Path, image, det) -> None:
        image_id = len(self.images) + 1
        self.images.append(
            {"id": image_id, "file_name": str(path), "width": image.width, "height": image.height}
        )
        self.detections += len(det)
        self.results += image_results(
            image_id, det.boxes, det.labels.tolist(), det.scores.tolist(), det.masks
        )
        if det.segments is not None:
            png_name = name.as_posix().replace("/", "__") + ".png"
            data = png_bytes(det.segments)
            atomic_write(self.out / "panoptic" / png_name, lambda tmp: Path(tmp).write_bytes(data))
            self.panoptic.append(
                {"image_id": image_id, "file_name": png_name, "segments_info": det.segments_info}
            )
        if self.draw:
            picture = draw_detections(image, det)
            target = self.out / "annotated" / f"{name.as_posix()}.jpg"
            atomic_write(target, lambda tmp: picture.save(tmp, format="JPEG", quality=90))

    def finish(self) -> None:
        write_json_atomic(self.out / "results.json", self.results)
        write_json_atomic(self.out / "images.json", self.images)
        if self.panoptic:
            config = self.detector.model.config
            categories = [
                {"id": int(i), "name": n, "isthing": int(t)}
                for i, n, t in zip(self.detector.category_ids, self.detector.class_names, config.is_thing)
            ]
            write_json_atomic(
                self.out / "panoptic.json", {"annotations": self.panoptic, "categories": categories}
            )


def image_batches(files: list[tuple[Path, Path]], batch_size: int, failures: list) -> Iterator[list]:
    """``files`` read as ``(path, name, image)`` in batches of ``batch_size``; a file that cannot be
    read is appended to ``failures`` as ``(path, reason)``, reported, and skipped."""
    batch = []
    for path, name in files:
        try:
            batch.append((path, name, load_image(path)))
        except ImageLoadError as e:
            failures.append((str(path), e.reason))
            print(f"detrkit predict: skipping {path}: {e.reason}", file=sys.stderr)
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class PredictSummary:
    """What a prediction run did: counts, and ``failures`` as ``(input, reason)``."""

    images: int = 0
    detections: int = 0
    videos: int = 0
    frames: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)


def predict_inputs(
    detector,
    files: list[tuple[Path, Path]],
    out: Path,
    *,
    threshold: float,
    segmentation,
    batch_size: int,
    draw: bool = True,
    failures: list[tuple[str, str]] | None = None,
    progress: Callable[[int, int, float, int], None] | None = None,
) -> PredictSummary:
    """Run ``detector`` over ``files`` (``(path, output name)``, from :func:`collect_inputs`) and
    write the outputs under ``out``. An image or video that fails is reported and skipped: one bad
    input never costs the others their results. ``failures`` holds earlier failures (e.g. missing
    inputs) and is extended; ``progress(done, total, start, failed)`` is called after each batch."""
    failures = failures if failures is not None else []
    earlier = len(failures)
    videos = [(p, n) for p, n in files if p.suffix.lower() in VIDEO_SUFFIXES]
    images = [(p, n) for p, n in files if p.suffix.lower() not in VIDEO_SUFFIXES]
    writer = ResultsWriter(out, detector, draw=draw)
    start = time.perf_counter()

    def predict(batch: list) -> None:
        try:
            found = detector.predict([image for _, _, image in batch], threshold, segmentation=segmentation)
        except Exception as e:  # noqa: BLE001 - one image must not cost the others their results
            if len(batch) > 1:
                for item in batch:
                    predict([item])
                return
            path = batch[0][0]
            failures.append((str(path), f"{type(e).__name__}: {e}"))
            print(f"detrkit predict: skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
            return
        for (path, name, image), det in zip(batch, found, strict=True):
            writer.add(path, name, image, det)

    for batch in image_batches(images, batch_size, failures):
        predict(batch)
        if progress is not None:
            progress(len(writer.images) + len(failures) - earlier, len(images), start, len(failures))
    if writer.images or not images:  # every image failed: earlier results in `out` stay as they are
        writer.finish()
    frames = 0
    for path, name in videos:
        try:
            frames += predict_video(
                detector,
                path,
                out,
                name,
                threshold=threshold,
                segmentation=segmentation,
                batch_size=batch_size,
            )
        except Exception as e:  # noqa: BLE001 - any decoding failure: report the file, keep going
            if not isinstance(e, VideoError) and type(e).__module__.split(".")[0] != "av":
                raise
            failures.append((str(path), str(e)))
            print(f"detrkit predict: skipping {path}: {e}", file=sys.stderr)
    return PredictSummary(
        images=len(writer.images), detections=writer.detections, videos=len(videos), frames=frames,
        seconds=time.perf_counter() - start, failures=failures,
    )  # fmt: skip
