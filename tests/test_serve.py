"""The HTTP service over real sockets: upload, limits, EXIF, queueing, concurrency, and the page in
headless Chromium. Every server here listens on 127.0.0.1 only."""

from __future__ import annotations

import io
import mimetypes
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from PIL import Image, ImageOps

import detrkit
from conftest import shapes_config
from detrkit.data import SynthConfig, make_synthetic
from detrkit.errors import ConfigError

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from detrkit.inference.serve import ServeConfig, create_app  # noqa: E402

WAIT_S = 30  # upper bound for anything a test waits for; normal runs take well under a second
ANSWER_S = 10  # for answers that need no model (refusals): milliseconds normally


class GatedDetector(detrkit.Detector):
    """A `Detector` the test can hold still, deterministically and without sleeps.

    ``hold()`` closes a gate that every model call (the server's worker thread) waits at, so the
    worker is busy for as long as the test wants; images whose size is in ``slow_sizes`` wait at a
    second gate inside ``prepare`` (the server's decode step, before it queues the image).
    ``batches`` records how many images each model call got.
    """

    def __init__(self, model, **kwargs) -> None:
        super().__init__(model, device="cpu", **kwargs)
        self.model_gate, self.in_model = threading.Event(), threading.Event()
        self.prepare_gate, self.in_prepare = threading.Event(), threading.Event()
        self.model_gate.set()
        self.prepare_gate.set()
        self.slow_sizes: set[tuple[int, int]] = set()
        self.prepared: list[tuple[int, int]] = []
        self.batches: list[int] = []

    def prepare(self, image):
        self.prepared.append(image.size)
        if image.size in self.slow_sizes:
            self.in_prepare.set()
            if not self.prepare_gate.wait(WAIT_S):
                raise TimeoutError("the test never opened the prepare gate")
        return super().prepare(image)

    def predict_prepared(self, prepared, *args, **kwargs):
        self.batches.append(len(prepared))
        self.in_model.set()
        if not self.model_gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the model gate")
        return super().predict_prepared(prepared, *args, **kwargs)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Model calls wait until the block ends (also when it ends by a failed assertion)."""
        self.in_model.clear()
        self.model_gate.clear()
        self.batches = []
        try:
            yield
        finally:
            self.model_gate.set()
            self.prepare_gate.set()


def _varied_model() -> torch.nn.Module:
    """A random shapes model whose boxes, labels and scores differ from image to image and from
    query to query, so that comparing answers means something. Plain random weights give every
    query nearly the same box near the centre and the same class: the box head is scaled up, the
    queries spread apart, and the class head centred on the decoder's average output (what is
    common to all queries), so that its logits follow what differs between them."""
    torch.manual_seed(0)
    model = detrkit.build_model(shapes_config()).eval()
    with torch.no_grad():
        model.bbox_embed.layers[-1].weight.mul_(20)
        model.query_embed.weight.mul_(10)
        seen = []
        hook = model.class_embed.register_forward_hook(lambda m, i, o: seen.append(i[0][-1]))
        images = make_synthetic(SynthConfig(images=2, seed=1))["images"].values()
        detrkit.Detector(model, device="cpu").predict(list(images), threshold=0.0)
        hook.remove()
        mean = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).mean(0)
        model.class_embed.weight.mul_(10)
        model.class_embed.bias.copy_(-model.class_embed.weight @ mean)
    return model


@pytest.fixture(scope="module")
def model():
    return _varied_model()


@pytest.fixture(scope="module")
def picture():
    return next(iter(make_synthetic(SynthConfig(images=1, seed=4))["images"].values()))


@contextmanager
def _serving(detector: detrkit.Detector, config: ServeConfig) -> Iterator[str]:
    """Run the app in a uvicorn thread on a free 127.0.0.1 port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(detector, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    _wait_for(lambda: _healthy(url), "the server to start")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after WAIT_S seconds (never on a lucky timing)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(model):
    detector = GatedDetector(model, batch_size=8)
    config = ServeConfig(threshold=0.0, max_bytes=200_000, max_pixels=1_000_000, max_batch=8)
    with _serving(detector, config) as url:
        yield url, detector


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _post(url: str, data: bytes, name: str = "x.png", threshold: float | None = None, timeout=WAIT_S):
    params = {} if threshold is None else {"threshold": threshold}
    with httpx.Client(timeout=timeout) as client:
        return client.post(
            url + "/v1/detect",
            params=params,
            files={"image": (name, data, mimetypes.guess_type(name)[0] or "image/png")},
        )


def _assert_same(body: dict, expected: detrkit.Detections, what: str = "") -> None:
    """The server's JSON equals the Python API's result: names, ids, boxes (to float noise), scores."""
    detections = body["detections"]
    assert [d["name"] for d in detections] == expected.names, what
    assert [d["category_id"] for d in detections] == expected.labels.tolist(), what
    boxes = torch.tensor([d["box"] for d in detections]).reshape(-1, 4)
    torch.testing.assert_close(boxes, expected.boxes, atol=2e-4, rtol=1e-6, msg=lambda m: f"{what}: {m}")
    scores = torch.tensor([d["score"] for d in detections])
    torch.testing.assert_close(scores, expected.scores, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _queued(url: str) -> int:
    return httpx.get(url + "/healthz").json()["queued"]


def test_upload_returns_the_detectors_result(server, picture):
    url, detector = server
    response = _post(url, _png(picture), "shapes.png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == picture.size
    expected = detector.predict(picture, threshold=0.0)[0]
    assert len(set(expected.names)) > 1  # the model tells its queries apart (see _varied_model)
    _assert_same(body, expected)
    cut = round(float(expected.scores[2] + expected.scores[3]) / 2, 4)  # keeps the top three
    some = _post(url, _png(picture), threshold=cut).json()
    assert len(some["detections"]) == 3
    _assert_same(some, detector.predict(picture, threshold=cut)[0], f"threshold {cut}")
    assert _post(url, _png(picture), threshold=1.0).json()["detections"] == []


def test_health_and_page(server):
    url, _ = server
    health = httpx.get(url + "/healthz").json()
    assert health["status"] == "ok" and "resnet18" in health["model"]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and '<input type="file"' in page.text


def test_config_is_validated():
    with pytest.raises(ConfigError, match="max_queue"):
        ServeConfig(max_queue=0)  # asyncio.Queue(0) would be unbounded: never a 503
    with pytest.raises(ConfigError, match="threshold"):
        ServeConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="body_timeout"):
        ServeConfig(body_timeout=0.0)  # wait_for(..., 0) would answer every upload with 408


def test_limits_and_bad_uploads(server):
    url, _ = server
    noise = Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3))
    big = _post(url, _png(noise), "noise.png")
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    wide = Image.new("RGB", (2000, 600))  # 1.2 MP, a small file
    many = _post(url, _png(wide), "wide.png")
    assert many.status_code == 400 and "2000x600" in many.json()["detail"]
    text = httpx.post(
        url + "/v1/detect", files={"image": ("notes.txt", b"hello, not an image", "text/plain")}
    )
    assert text.status_code == 415 and "notes.txt" in text.json()["detail"]
    truncated = _png(Image.new("RGB", (64, 64), "red"))[:60]
    cut = _post(url, truncated, "cut.png")
    assert cut.status_code == 415
    missing = httpx.post(url + "/v1/detect")
    assert missing.status_code == 422
    strip = _post(url, _png(Image.new("RGB", (3000, 1))), "strip.png")  # resizes to a 1-pixel-high input
    assert strip.status_code == 200, strip.text


def _exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [6, 8])  # 90 degrees clockwise / counter-clockwise
def test_exif_rotated_upload_is_measured_and_detected_upright(server, picture, orientation):
    url, detector = server
    jpeg = _exif_jpeg(picture.resize((180, 120)), orientation)  # stored 180 x 120 (W x H)
    with Image.open(io.BytesIO(jpeg)) as stored:
        assert stored.size == (180, 120) and stored.getexif()[0x0112] == orientation
        raw = stored.convert("RGB")  # the pixels as stored, not rotated
        upright = ImageOps.exif_transpose(stored).convert("RGB")  # independent of detrkit's loader
    assert upright.size == (120, 180)
    response = _post(url, jpeg, "phone.jpg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (120, 180)
    expected = detector.predict(upright, threshold=0.0)[0]
    _assert_same(body, expected, f"orientation {orientation}")
    # The check has teeth: the picture unrotated, or turned the other way, gives other boxes.
    other = raw.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    for wrong in (raw, other):
        boxes = detector.predict(wrong, threshold=0.0)[0].boxes
        assert not torch.allclose(boxes, expected.boxes, atol=1.0)


def _png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares ``width`` x ``height`` RGB pixels (data: one byte)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to declare ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BOMBS = [
    ("png", 100_000, 100_000),  # 1e10 pixels: past twice Pillow's limit, Image.open raises
    ("png", 12_000, 12_000),  # 1.4e8: past Pillow's limit, under twice it (Pillow only warns)
    ("png", 1_500, 1_000),  # 1.5e6: under Pillow's limit, over this server's max_pixels
    ("jpeg", 65_000, 65_000),
]


def _assert_bomb_refused(url: str, kind: str, width: int, height: int, limit: int) -> None:
    data = (_png_claiming if kind == "png" else _jpeg_claiming)(width, height)
    assert len(data) < 1000
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:  # the header really says so
        with pytest.raises(Image.DecompressionBombError, match=f"{width * height} pixels"):
            Image.open(io.BytesIO(data))
    else:
        with Image.open(io.BytesIO(data)) as claimed:
            assert claimed.size == (width, height)
    response = _post(url, data, f"bomb.{kind}")
    assert response.status_code == 400, (kind, width, height, response.status_code, response.text)
    detail = response.json()["detail"]
    assert "too many pixels" in detail or f"{width}x{height}" in detail, detail
    assert f"the limit is {limit}" in detail, detail


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("kind", "width", "height"), BOMBS)
def test_decompression_bomb_is_400_and_the_server_carries_on(server, picture, kind, width, height):
    url, _ = server
    _assert_bomb_refused(url, kind, width, height, limit=1_000_000)
    assert httpx.get(url + "/healthz").status_code == 200
    after = _post(url, _png(picture))
    assert after.status_code == 200 and after.json()["detections"], after.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_400_when_max_pixels_is_above_pillows_limit(model, picture):
    """``--max-pixels`` above Pillow's limit: Pillow's limit applies, still with 400 (not 415)."""
    pillow = Image.MAX_IMAGE_PIXELS
    config = ServeConfig(threshold=0.0, max_pixels=10 * pillow)
    with _serving(detrkit.Detector(model, device="cpu"), config) as url:
        for kind, width, height in BOMBS[:2] + BOMBS[3:]:
            _assert_bomb_refused(url, kind, width, height, limit=pillow)
        assert _post(url, _png(picture)).status_code == 200


def test_full_queue_answers_503_and_the_server_recovers(model):
    """One image in the model, one in a one-place queue: the next uploads get 503, whether the queue
    is full when they arrive (refused before decoding) or fills while they decode."""
    detector = GatedDetector(model, batch_size=1)
    config = ServeConfig(threshold=0.0, max_batch=1, max_queue=1)
    sizes = {name: (64 + 8 * i, 48) for i, name in enumerate("ABXCD")}
    uploads = {name: _png(Image.new("RGB", size, "gray")) for name, size in sizes.items()}
    detector.slow_sizes = {sizes["X"]}
    with _serving(detector, config) as url, ThreadPoolExecutor(max_workers=3) as pool:
        with detector.hold():
            detector.prepare_gate.clear()
            a = pool.submit(_post, url, uploads["A"], "a.png")
            assert detector.in_model.wait(WAIT_S), "A never reached the model"
            x = pool.submit(_post, url, uploads["X"], "x.png")
            assert detector.in_prepare.wait(WAIT_S), "X never started decoding"  # past the queue check
            b = pool.submit(_post, url, uploads["B"], "b.png")
            _wait_for(lambda: _queued(url) == 1, "B to wait in the queue")
            detector.prepare_gate.set()  # X decoded, but the queue filled meanwhile
            late = x.result(timeout=ANSWER_S)  # TimeoutError here: X was queued, not refused
            assert late.status_code == 503 and "busy" in late.json()["detail"], late.text
            refused = _post(url, uploads["C"], "c.png", timeout=ANSWER_S)
            assert refused.status_code == 503 and "busy" in refused.json()["detail"], refused.text
            assert sizes["C"] not in detector.prepared  # refused before it was decoded
            assert not a.done() and not b.done()
        for name, future in (("A", a), ("B", b)):
            response = future.result(timeout=WAIT_S)
            assert response.status_code == 200, (name, response.text)
        assert detector.batches == [1, 1]
        assert _post(url, uploads["D"], "d.png").status_code == 200
        assert _queued(url) == 0


def test_oversized_upload_without_content_length_is_cut_off(server):
    url, _ = server

    def body():  # chunked transfer: no Content-Length for the server to check up front
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(200):  # 200 x 64 KiB = 12.5 MiB, far over the 200 kB limit
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    try:
        response = httpx.post(
            url + "/v1/detect",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=b"},
            timeout=30,
        )
    except httpx.TransportError:  # the server may close the connection while we still send
        response = None
    if response is not None:
        # Answered by the body counter, not after the multipart parser spooled it all to disk.
        assert response.status_code == 413 and response.json()["detail"].startswith("upload is larger")
    assert httpx.get(url + "/healthz").status_code == 200


def test_twenty_concurrent_requests_equal_the_python_api(server):
    """20 different images at once, queued behind a busy model so that they are batched together
    (pairs of the same size also share model batches), with two thresholds mixed: every answer is
    the Python API's for that image and threshold, boxes and labels included."""
    url, detector = server
    synthetic = list(make_synthetic(SynthConfig(images=20, seed=5))["images"].values())
    images = [im.resize(synthetic[i - 1].size) if i % 2 else im for i, im in enumerate(synthetic)]
    thresholds = [0.3 if i % 3 == 1 else None for i in range(20)]  # None: the server's default, 0.0
    uploads = [_png(image) for image in images]
    with ThreadPoolExecutor(max_workers=20) as pool:
        with detector.hold():
            first = pool.submit(_post, url, uploads[0], "0.png", thresholds[0])
            assert detector.in_model.wait(WAIT_S), "the first request never reached the model"
            rest = [pool.submit(_post, url, uploads[i], f"{i}.png", thresholds[i]) for i in range(1, 20)]
            _wait_for(lambda: _queued(url) == 19, "19 queued requests")
        responses = [future.result(timeout=WAIT_S) for future in [first, *rest]]
    batches = list(detector.batches)
    assert batches[0] == 1 and sum(batches) == 20 and max(batches) > 1, batches
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    expected = [
        detector.predict(image, threshold=0.0 if t is None else t)[0] for image, t in zip(images, thresholds)
    ]
    # Swapped answers would show: any two images differ in names or boxes.
    for i in range(20):
        for j in range(i):
            a, b = expected[i], expected[j]
            assert a.names != b.names or not torch.allclose(a.boxes, b.boxes, atol=1.0), (i, j)
    for i, (image, response) in enumerate(zip(images, responses)):
        body = response.json()
        assert (body["width"], body["height"]) == image.size
        _assert_same(body, expected[i], f"image {i}")


def _chromium():
    for browser, driver in (("chromium", "chromedriver"), ("chromium-browser", "chromedriver")):
        if shutil.which(browser) and shutil.which(driver):
            return shutil.which(browser), shutil.which(driver)
    return None


def test_page_in_headless_chromium(server, picture, tmp_path):
    found = _chromium()
    if found is None:
        if os.environ.get("DETRKIT_REQUIRE_BROWSER"):
            pytest.fail("DETRKIT_REQUIRE_BROWSER is set but chromium/chromedriver are not installed")
        pytest.skip("chromium and chromedriver not installed (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, detector = server
    path = tmp_path / "shapes.png"
    picture.save(path)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(url + "/")
        threshold = driver.find_element(By.ID, "threshold")
        threshold.clear()
        threshold.send_keys("0")
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, "results").get_attribute("data-count") != "-1"
        )
        count = int(driver.find_element(By.ID, "results").get_attribute("data-count"))
        assert count == len(detector.predict(picture, threshold=0.0)[0]) > 0
        rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert len(rows) == count
        size = driver.execute_script(
            "const c = document.getElementById('canvas'); return [c.width, c.height];"
        )
        assert tuple(size) == picture.size
        # Boxes were drawn: the canvas differs from the plain picture somewhere.
        changed = driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            const c = document.getElementById('canvas');
            createImageBitmap(document.getElementById('file').files[0]).then((bitmap) => {
              const plain = new OffscreenCanvas(c.width, c.height).getContext('2d');
              plain.drawImage(bitmap, 0, 0);
              const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              const b = plain.getImageData(0, 0, c.width, c.height).data;
              let n = 0;
              for (let i = 0; i < a.length; i += 4) if (a[i] !== b[i] || a[i + 1] !== b[i + 1]) n++;
              done(n);
            });
            """
        )
        assert changed > 0
        assert "objects in" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


def test_a_body_shorter_than_its_content_length_times_out(model):
    """A client that promises more than it sends must not hold the connection forever: 408 once
    body_timeout passes, the connection is closed, and the server goes on answering."""
    with _serving(detrkit.Detector(model, device="cpu"), ServeConfig(body_timeout=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S) as conn:
            head = (
                "POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
            )
            conn.sendall(head.encode() + b"--b\r\n")  # then nothing more
            start = time.monotonic()
            reply = b""
            while chunk := conn.recv(65536):  # until the server closes the connection
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"did not arrive within 1 s" in reply
        assert time.monotonic() - start < ANSWER_S
        assert httpx.get(url + "/healthz").status_code == 200
