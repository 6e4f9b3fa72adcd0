"""``detrkit predict``: detections for images, folders and videos, written as COCO JSON + pictures.

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

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .data.images import ImageLoadError, load_image
from .fileio import atomic_write, write_json_atomic

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
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if exclude is not None and file.resolve().is_relative_to(exclude):
                    continue
                if file.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
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


def _progress(done: int, total: int, start: float, failed: int) -> None:
    if not sys.stderr.isatty():
        return
    rate = done / max(time.perf_counter() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    sys.stderr.write(f"\r{done}/{total} images  {rate:.1f} img/s  ETA {eta:.0f}s  failed {failed}   ")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class Writer:
    """Collects the COCO outputs and writes pictures as it goes."""

    def __init__(self, out: Path, detector, draw: bool) -> None:
        self.out, self.detector, self.draw = out, detector, draw
        self.results: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.panoptic: list[dict[str, Any]] = []
        self.detections = 0

    def add(self, path: Path, name: Path, image, det) -> None:
        from .evaluation import _encode_masks
        from .panoptic import png_bytes

        image_id = len(self.images) + 1
        self.images.append(
            {"id": image_id, "file_name": str(path), "width": image.width, "height": image.height}
        )
        self.detections += len(det)
        rles = _encode_masks(det.masks) if det.masks is not None and len(det) else [None] * len(det)
        for box, score, label, rle in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), rles):
            x1, y1, x2, y2 = box
            entry = {
                "image_id": image_id,
                "category_id": label,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
            }
            if rle is not None:
                entry["segmentation"] = rle
            self.results.append(entry)
        if det.segments is not None:
            png_name = name.as_posix().replace("/", "__") + ".png"
            data = png_bytes(det.segments)
            atomic_write(self.out / "panoptic" / png_name, lambda tmp: Path(tmp).write_bytes(data))
            self.panoptic.append(
                {"image_id": image_id, "file_name": png_name, "segments_info": det.segments_info}
            )
        if self.draw:
            from .draw import draw_detections

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


def _image_batches(files: list[tuple[Path, Path]], batch_size: int, failures: list) -> Iterator[list]:
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


class VideoError(Exception):
    """A video file that can be opened but not processed (e.g. no video stream)."""


def predict_video(
    detector, path: Path, out: Path, name: Path, *, threshold: float, segmentation, batch_size: int
) -> int:
    """Annotated copy of a video (same frame rate, MPEG-4) as ``out/NAME.annotated.mp4`` and its
    detections per frame as ``out/NAME.frames.json``; returns the number of frames."""
    import av

    from .draw import draw_detections

    frames_json: list[dict[str, Any]] = []

    def encode(tmp: str) -> None:
        with av.open(str(path)) as source, av.open(tmp, mode="w", format="mp4") as sink:
            if not source.streams.video:
                raise VideoError("no video stream")
            stream_in = source.streams.video[0]
            stream_out = sink.add_stream("mpeg4", rate=stream_in.average_rate or 25)
            stream_out.width = stream_in.codec_context.width // 2 * 2  # yuv420p needs even sizes
            stream_out.height = stream_in.codec_context.height // 2 * 2
            stream_out.pix_fmt = "yuv420p"
            stream_out.bit_rate = 4_000_000

            def flush(batch: list) -> None:
                images = [frame.to_image() for frame in batch]
                found = detector.predict(images, threshold, segmentation=segmentation)
                for frame, image, det in zip(batch, images, found, strict=True):
                    time_s = float(frame.time) if frame.time is not None else None
                    frames_json.append({"frame": len(frames_json), "time": time_s, **det.to_dict()})
                    picture = draw_detections(image, det).crop((0, 0, stream_out.width, stream_out.height))
                    for packet in stream_out.encode(av.VideoFrame.from_image(picture)):
                        sink.mux(packet)

            batch = []
            for frame in source.decode(stream_in):
                batch.append(frame)
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
            for packet in stream_out.encode():
                sink.mux(packet)

    atomic_write(out / f"{name.as_posix()}.annotated.mp4", encode, suffix=".mp4")
    write_json_atomic(out / f"{name.as_posix()}.frames.json", frames_json)
    return len(frames_json)


def run_predict(args: argparse.Namespace) -> int:
    from .detector import Detector
    from .fileio import check_output

    # A folder of results: refreshed by a new run, but never a file, the weights, or unwritable.
    out = check_output(
        args.out, option="--out", kind="dir", inputs=[args.weights], replaceable=lambda _: True
    )
    files, missing = collect_inputs(args.inputs, exclude=out)
    failures: list[tuple[str, str]] = list(missing)
    for source, reason in missing:
        print(f"detrkit predict: skipping {source}: {reason}", file=sys.stderr)
    videos = [(p, n) for p, n in files if p.suffix.lower() in VIDEO_SUFFIXES]
    images = [(p, n) for p, n in files if p.suffix.lower() not in VIDEO_SUFFIXES]
    if not files:
        print("detrkit predict: error: no images or videos found", file=sys.stderr)
        return 2
    detector = Detector.from_pretrained(args.weights, device=args.device, batch_size=args.batch_size)
    segmentation = (
        "auto"
        if args.segmentation == "auto"
        else (None if args.segmentation == "none" else args.segmentation)
    )
    writer = Writer(out, detector, draw=not args.no_draw)
    start = time.perf_counter()

    def predict(batch: list) -> None:
        try:
            found = detector.predict(
                [image for _, _, image in batch], args.threshold, segmentation=segmentation
            )
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

    for batch in _image_batches(images, args.batch_size, failures):
        predict(batch)
        _progress(len(writer.images) + len(failures) - len(missing), len(images), start, len(failures))
    writer.finish()
    frames = 0
    for path, name in videos:
        try:
            frames += predict_video(
                detector,
                path,
                out,
                name,
                threshold=args.threshold,
                segmentation=segmentation,
                batch_size=args.batch_size,
            )
        except Exception as e:  # noqa: BLE001 - any decoding failure: report the file, keep going
            if not isinstance(e, VideoError) and type(e).__module__.split(".")[0] != "av":
                raise
            failures.append((str(path), str(e)))
            print(f"detrkit predict: skipping {path}: {e}", file=sys.stderr)
    seconds = time.perf_counter() - start
    summary = (
        f"{len(writer.images)} images, {writer.detections} detections (threshold {args.threshold})"
        + (f", {len(videos)} videos ({frames} frames)" if videos else "")
        + f" in {seconds:.1f}s; {len(failures)} failed; wrote {out}"
    )
    print(summary)
    if failures:
        print("failed: " + ", ".join(name for name, _ in failures), file=sys.stderr)
    return 1 if failures else 0


def bounded(kind, low=None, high=None, what: str = "value"):
    """argparse type: ``kind(text)`` within ``[low, high]`` (either bound optional), refused with
    a message naming the range instead of failing later deep inside a command."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what_kind = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what_kind}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            span = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else (f"at least {low}" if low is not None else f"at most {high}")
            )
            raise argparse.ArgumentTypeError(f"{value}: {what} must be {span}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


probability = bounded(float, 0.0, 1.0, "a score threshold")
non_negative_int = bounded(int, 0, None, "a count")
positive_float = bounded(float, 1e-9, None, "a size")
positive_int = bounded(int, 1, None, "a count")


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="detect objects in images, folders or videos")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or video files")
    p.add_argument("--weights", required=True, help="any checkpoint load_model reads, or an official name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=probability, default=0.7, help="minimum score (default 0.7)")
    p.add_argument(
        "--segmentation",
        choices=("auto", "instance", "panoptic", "semantic", "none"),
        default="auto",
        help="for mask models (default: panoptic if the model has stuff classes, else instance)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the best available)")
    p.add_argument("--no-draw", action="store_true", help="do not write annotated pictures")
    p.set_defaults(func=run_predict)
