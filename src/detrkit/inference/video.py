"""Detection over a video: an annotated copy and the detections of every frame (needs PyAV,
``pip install 'detrkit[video]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MissingExtra
from ..fileio import atomic_write, write_json_atomic
from .draw import draw_detections


class VideoError(Exception):
    """A video file that can be opened but not processed (e.g. no video stream)."""


def predict_video(
    detector, path: Path, out: Path, name: Path, *, threshold: float, segmentation, batch_size: int
) -> int:
    """Annotated copy of a video (same frame rate, MPEG-4) as ``out/NAME.annotated.mp4`` and its
    detections per frame as ``out/NAME.frames.json``; returns the number of frames."""
    try:
        import av
    except ImportError as e:
        raise MissingExtra("video input", "video", e) from e

    frames_json: list[dict[str, Any]] = []

    def encode(tmp: str) -> None:
        with av.open(str(path)) as source, av.open(tmp, mode="w", format="mp4") as sink:
            if not source.streams.video:
                raise VideoError("no video stream")
            stream_in = source.streams.video[0]
            if stream_in.codec_context.width < 2 or stream_in.codec_context.height < 2:
                size = f"{stream_in.codec_context.width}x{stream_in.codec_context.height}"
                raise VideoError(f"a video of {size} pixels is too small to encode (2x2 at least)")
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
