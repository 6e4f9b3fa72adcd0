"""The HTTP service over real sockets: upload, limits, concurrency, and the page in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import detrkit
from conftest import shapes_config
from detrkit.data import SynthConfig, make_synthetic

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from detrkit.serve import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def picture():
    return next(iter(make_synthetic(SynthConfig(images=1, seed=4))["images"].values()))


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    config = shapes_config()
    detector = detrkit.Detector(detrkit.build_model(config), device="cpu", batch_size=8)
    app = create_app(
        detector, ServeConfig(threshold=0.0, max_bytes=200_000, max_pixels=1_000_000, max_batch=8)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url, detector
    server.should_exit = True
    thread.join(timeout=10)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_returns_the_detectors_result(server, picture):
    url, detector = server
    response = httpx.post(url + "/v1/detect", files={"image": ("shapes.png", _png(picture), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == picture.size
    expected = detector.predict(picture, threshold=0.0)[0]
    assert [d["name"] for d in body["detections"]] == expected.names
    assert torch.allclose(torch.tensor([d["box"] for d in body["detections"]]), expected.boxes, atol=1e-3)
    high = httpx.post(
        url + "/v1/detect?threshold=1.0", files={"image": ("s.png", _png(picture), "image/png")}
    )
    assert high.json()["detections"] == []


def test_health_and_page(server):
    url, _ = server
    health = httpx.get(url + "/healthz").json()
    assert health["status"] == "ok" and "resnet18" in health["model"]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and '<input type="file"' in page.text


def test_limits_and_bad_uploads(server):
    url, _ = server
    noise = Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3))
    big = httpx.post(url + "/v1/detect", files={"image": ("noise.png", _png(noise), "image/png")})
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    wide = Image.new("RGB", (2000, 600))  # 1.2 MP, a small file
    many = httpx.post(url + "/v1/detect", files={"image": ("wide.png", _png(wide), "image/png")})
    assert many.status_code == 400 and "2000x600" in many.json()["detail"]
    text = httpx.post(
        url + "/v1/detect", files={"image": ("notes.txt", b"hello, not an image", "text/plain")}
    )
    assert text.status_code == 415 and "notes.txt" in text.json()["detail"]
    truncated = _png(Image.new("RGB", (64, 64), "red"))[:60]
    cut = httpx.post(url + "/v1/detect", files={"image": ("cut.png", truncated, "image/png")})
    assert cut.status_code == 415
    missing = httpx.post(url + "/v1/detect")
    assert missing.status_code == 422
    strip = httpx.post(  # 1 x 3000: resizes to a 1-pixel-high input, still answered
        url + "/v1/detect", files={"image": ("strip.png", _png(Image.new("RGB", (3000, 1))), "image/png")}
    )
    assert strip.status_code == 200, strip.text


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


def test_twenty_concurrent_requests_are_all_answered(server, picture):
    url, detector = server
    variants = [picture.resize((picture.width - 8 * (i % 3), picture.height)) for i in range(20)]

    def call(image):
        with httpx.Client(timeout=60) as client:
            return client.post(url + "/v1/detect", files={"image": ("x.png", _png(image), "image/png")})

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(call, variants))
    assert [r.status_code for r in responses] == [200] * 20
    for image, response in zip(variants, responses):
        expected = detector.predict(image, threshold=0.0)[0]
        got = torch.tensor([d["score"] for d in response.json()["detections"]])
        assert torch.allclose(got, expected.scores, atol=1e-4)


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
