"""``detrkit serve``: an HTTP detection service (FastAPI + uvicorn) with a small web page.

* ``POST /v1/detect`` — multipart upload (field ``image``), optional ``threshold`` query parameter
  -> ``{"width", "height", "detections": [{"box": [x1, y1, x2, y2], "score", "category_id", "name"}]}``.
  413 when the upload exceeds ``max_bytes``, 400 when the image has more than ``max_pixels`` (or than
  Pillow's decompression-bomb limit, if lower), 415 when it is not an image, 503 when the queue is full.
* ``GET /healthz`` — liveness and the model loaded.
* ``GET /`` — a page to upload an image and see the boxes drawn.

Requests are queued and run in small batches by one worker, so concurrent uploads share the model
without running out of memory: at most ``max_batch`` images are in the model at once and at most
``max_queue`` wait, each already resized to the model's input size (the full-size picture is decoded
and resized in a thread, then dropped). Request bodies are counted as they arrive: an upload over
the limit is refused with 413 without being read to the end, with or without a Content-Length.
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

from ..data.images import ImageLoadError, decode_image
from ..errors import ConfigError, MissingExtra
from .detector import Detector

try:
    # Module level: FastAPI reads the endpoints' (string) annotations in this module's namespace.
    from fastapi import FastAPI, HTTPException, Query, UploadFile
    from fastapi.responses import HTMLResponse
except ImportError as e:  # pragma: no cover - depends on the environment
    raise MissingExtra("detrkit serve", "serve", e) from e

# Room for the multipart envelope around the file itself.
_MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class ServeConfig:
    threshold: float = 0.7
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch: int = 8
    max_queue: int = 64
    # Seconds the rest of an upload may take to arrive; a client that sends less than its
    # Content-Length would otherwise hold the connection (and a slot) forever. 408 when exceeded.
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.body_timeout > 0:
            raise ConfigError(f"ServeConfig.body_timeout={self.body_timeout}: must be positive")
        # max_queue=0 would make asyncio.Queue unbounded: no 503, requests pile up without limit.
        for name in ("max_bytes", "max_pixels", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name}={getattr(self, name)}: must be at least 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"ServeConfig.threshold={self.threshold}: must be between 0 and 1")


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

    def full(self) -> bool:
        return self.queue.full()

    async def submit(self, prepared, threshold: float):
        """Queue one ``Detector.prepare`` output; raises ``asyncio.QueueFull`` (-> 503) when full."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((prepared, threshold, future))
        return await future

    def _predict(self, group: list, threshold: float) -> list:
        """Results (or exceptions) for ``group``; after a failure, each image alone, so that one bad
        image costs only its own request."""
        try:
            return self.detector.predict_prepared([p for p, _, _ in group], threshold, segmentation=None)
        except Exception as e:  # noqa: BLE001 - handed to the waiting request(s)
            if len(group) == 1:
                return [e]
            return [self._predict([item], threshold)[0] for item in group]

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
                results = await asyncio.to_thread(self._predict, group, threshold)
                for (_, _, future), result in zip(group, results, strict=True):
                    if future.done():  # the client went away
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes on ``path``, decided from the
    Content-Length header when there is one and by counting the body as it arrives otherwise, so an
    oversized upload is never read (or spooled to disk by the multipart parser) to its end."""

    def __init__(self, app, path: str, limit: int, timeout: float) -> None:
        self.app, self.path, self.limit, self.timeout = app, path, limit, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        too_large = JSONResponse(
            {"detail": f"upload is larger than the {self.limit - _MULTIPART_OVERHEAD}-byte limit"},
            status_code=413,
        )
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await too_large(scope, receive, send)
            return
        received, answered, complete = 0, False, False
        deadline = asyncio.get_running_loop().time() + self.timeout  # for the whole body

        async def counting_receive():
            nonlocal received, answered, complete
            if complete:  # the body is in; the app may wait for a disconnect as long as it likes
                return await receive()
            try:
                left = max(0.0, deadline - asyncio.get_running_loop().time())
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                answered = True
                slow = JSONResponse(
                    {"detail": f"the upload did not arrive within {self.timeout:g} s"}, status_code=408
                )
                await slow(scope, receive, send)
                return {"type": "http.disconnect"}
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request" and not answered:
                received += len(message.get("body", b""))
                if received > self.limit:
                    answered = True
                    await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}  # the app stops reading; its reply is dropped
            return message

        async def guarded_send(message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)


def _decode(data: bytes, filename: str, max_pixels: int, detector: Detector):
    """Upload bytes -> ``detector.prepare(picture)``, or an HTTPException (400 / 415). Runs in a
    worker thread: decoding a large image must not stall the event loop.

    The pixel limit is ``max_pixels`` or Pillow's own decompression-bomb limit, whichever is lower:
    ``decode_image`` refuses images above Pillow's, and those must get 400 as well, not 415."""
    limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise HTTPException(400, f"{filename}: too many pixels; the limit is {limit}") from None
    except Exception:  # noqa: BLE001 - PIL raises several types for non-images
        raise HTTPException(415, f"{filename}: not an image Pillow can read") from None
    if width * height > limit:
        raise HTTPException(400, f"image is {width}x{height} = {width * height} pixels; the limit is {limit}")
    try:
        picture = decode_image(io.BytesIO(data), filename)
    except ImageLoadError as e:
        raise HTTPException(415, f"{filename}: {e.reason}") from None
    return detector.prepare(picture)


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
    app.add_middleware(
        _BodyLimit,
        path="/v1/detect",
        limit=config.max_bytes + _MULTIPART_OVERHEAD,
        timeout=config.body_timeout,
    )
    page = resources.files("detrkit.inference").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        model = detector.model.config
        # An ONNX file is named as such, not by the default backbone of its reconstructed config.
        what = detector.model if getattr(detector.model, "postprocessed", False) else model.backbone
        return {
            "status": "ok",
            "model": f"{what}, {model.num_classes} classes",
            "device": str(detector.device),
            "queued": batcher.queue.qsize() if batcher.queue is not None else 0,
        }

    @app.post("/v1/detect")
    async def detect(
        image: UploadFile, threshold: float | None = Query(default=None, ge=0.0, le=1.0)
    ) -> dict[str, Any]:
        data = await image.read(config.max_bytes + 1)
        if len(data) > config.max_bytes:
            raise HTTPException(413, f"image is larger than the {config.max_bytes}-byte limit")
        if batcher.full():  # before decoding: a busy server should not also hold the picture
            raise HTTPException(503, "server busy: too many queued requests, retry shortly")
        filename = image.filename or "upload"
        prepared = await asyncio.to_thread(_decode, data, filename, config.max_pixels, detector)
        del data
        height, width = prepared[1]  # after EXIF orientation, the frame the boxes are in
        start = time.perf_counter()
        try:
            result = await batcher.submit(prepared, config.threshold if threshold is None else threshold)
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
    try:
        import uvicorn
    except ImportError as e:
        raise MissingExtra("detrkit serve", "serve", e) from e

    uvicorn.run(create_app(detector, config), host=host, port=port, log_level="info")
