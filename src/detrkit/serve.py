"""``detrkit serve``: an HTTP detection service (FastAPI + uvicorn) with a small web page.

* ``POST /v1/detect`` — multipart upload (field ``image``), optional ``threshold`` query parameter
  -> ``{"width", "height", "detections": [{"box": [x1, y1, x2, y2], "score", "category_id", "name"}]}``.
  413 when the upload exceeds ``max_bytes``, 400 when the image has more than ``max_pixels``, 415 when
  it is not an image, 503 when the queue is full.
* ``GET /healthz`` — liveness and the model loaded.
* ``GET /`` — a page to upload an image and see the boxes drawn.

Requests are queued and run in small batches by one worker, so concurrent uploads share the model
without running out of memory: at most ``max_batch`` images are in the model at once and at most
``max_queue`` wait.
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from PIL import Image

try:
    # Module level: FastAPI reads the endpoints' (string) annotations in this module's namespace.
    from fastapi import FastAPI, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the server needs the serve extra: pip install 'detrkit[serve]'") from e

from .data.images import ImageLoadError, decode_image
from .detector import Detector


@dataclass(frozen=True)
class ServeConfig:
    threshold: float = 0.7
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch: int = 8
    max_queue: int = 64


class _Batcher:
    """Collects pending images and runs them through the detector a batch at a time."""

    def __init__(self, detector: Detector, config: ServeConfig) -> None:
        self.detector, self.config = detector, config
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.config.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, image: Image.Image, threshold: float):
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((image, threshold, future))  # QueueFull -> 503 upstream
        return await future

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            while len(items) < self.config.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            # One threshold per call: group by it (normally everyone uses the default).
            by_threshold: dict[float, list] = {}
            for item in items:
                by_threshold.setdefault(item[1], []).append(item)
            for threshold, group in by_threshold.items():
                try:
                    results = await asyncio.to_thread(
                        self.detector.predict, [image for image, _, _ in group], threshold, segmentation=None
                    )
                except Exception as e:  # noqa: BLE001 - hand the failure to every waiting request
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, _, future), result in zip(group, results, strict=True):
                    if not future.done():
                        future.set_result(result)


def create_app(detector: Detector, config: ServeConfig | None = None):
    """The FastAPI application serving ``detector``."""
    config = config or ServeConfig()
    batcher = _Batcher(detector, config)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="detrkit", lifespan=lifespan)
    page = resources.files("detrkit").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        model = detector.model.config
        return {
            "status": "ok",
            "model": f"{model.backbone}, {model.num_classes} classes",
            "device": str(detector.device),
            "queued": batcher.queue.qsize() if batcher.queue is not None else 0,
        }

    @app.post("/v1/detect")
    async def detect(
        request: Request, image: UploadFile, threshold: float | None = Query(default=None, ge=0.0, le=1.0)
    ) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_bytes + 64 * 1024:
            raise HTTPException(413, f"upload is {int(length)} bytes; the limit is {config.max_bytes}")
        data = await image.read(config.max_bytes + 1)
        if len(data) > config.max_bytes:
            raise HTTPException(413, f"image is larger than the {config.max_bytes}-byte limit")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except Exception:  # noqa: BLE001 - PIL raises several types for non-images
            raise HTTPException(415, f"{image.filename or 'upload'}: not an image Pillow can read") from None
        if width * height > config.max_pixels:
            raise HTTPException(
                400, f"image is {width}x{height} = {width * height} pixels; the limit is {config.max_pixels}"
            )
        try:
            picture = decode_image(io.BytesIO(data), image.filename or "upload")
        except ImageLoadError as e:
            raise HTTPException(415, f"{image.filename or 'upload'}: {e.reason}") from None
        start = time.perf_counter()
        try:
            result = await batcher.submit(picture, config.threshold if threshold is None else threshold)
        except asyncio.QueueFull:
            raise HTTPException(503, "server busy: too many queued requests, retry shortly") from None
        return {
            "width": width,
            "height": height,
            "time_ms": round(1000 * (time.perf_counter() - start), 1),
            "detections": [
                {"box": box, "score": score, "category_id": label, "name": name}
                for box, score, label, name in zip(
                    result.boxes.tolist(),
                    result.scores.tolist(),
                    result.labels.tolist(),
                    result.names,
                    strict=True,
                )
            ],
        }

    return app


def serve(
    detector: Detector, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None
) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(detector, config), host=host, port=port, log_level="info")
