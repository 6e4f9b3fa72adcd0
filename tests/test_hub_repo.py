"""Hugging Face Hub ids (``owner/name[@revision]``) through the real huggingface_hub download code,
against a server on 127.0.0.1 that answers as the Hub does (``HF_ENDPOINT``); then offline from the
populated cache, and the errors for what cannot be had. Each load runs in a subprocess, since
huggingface_hub reads its environment when it is imported."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from functools import partial

import pytest
import torch

from conftest import padded_batch, require
from test_parity_hf import SMALL, assert_close, hf_model, hf_outputs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubHandler(http.server.BaseHTTPRequestHandler):
    """``/{owner}/{name}/resolve/{revision}/{file}``: the file with the Hub's metadata headers
    (commit, ETag, size), or 404 with the Hub's error code."""

    def __init__(self, *args, repos, **kwargs):
        self.repos = repos
        super().__init__(*args, **kwargs)

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound")
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return self._error(404, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        path = self.repos[repo] / name
        if not path.is_file():
            return self._error(404, "EntryNotFound")
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = hf_model(segmentation=False)
    model.save_pretrained(root / "tiny-detr")  # as transformers writes a repository
    # A stand-in for an official panoptic repository: 250 labels, as theirs, on a tiny network.
    transformers = require("transformers")
    require("timm")
    small = {**SMALL, "id2label": {i: f"class{i}" for i in range(250)}}
    config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet18", **small)
    transformers.DetrForSegmentation(config).save_pretrained(root / "panoptic")
    repos = {"someone/tiny-detr": root / "tiny-detr", "facebook/detr-resnet-50-panoptic": root / "panoptic"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(HubHandler, repos=repos))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield model, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


LOAD = """
import sys, torch, detrkit
model = detrkit.load_model(sys.argv[1])
images, mask = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(images, mask)
torch.save({k: out[k] for k in ("pred_logits", "pred_boxes")}, sys.argv[3])
print("classes", model.config.class_names)
"""


def _run(args, home, endpoint, offline=False):
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_hub_id_downloads_through_huggingface_hub_and_matches_transformers(hub, tmp_path):
    model, endpoint, _ = hub
    images, padding_mask = padded_batch()
    torch.save((images, padding_mask), tmp_path / "inputs.pt")
    expected = hf_outputs(model, images, padding_mask)
    home = tmp_path / "hf-home"
    for source in ("someone/tiny-detr", f"someone/tiny-detr@{COMMIT}"):
        out = tmp_path / "outputs.pt"
        result = _run(["-c", LOAD, source, str(tmp_path / "inputs.pt"), str(out)], home, endpoint)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "('circle', 'square', 'triangle')" in result.stdout
        assert_close(expected, torch.load(out))
    # It went where huggingface_hub keeps its files.
    assert list(home.rglob("snapshots/*/model.safetensors"))

    # Offline, from the populated cache, with nothing listening: the same model.
    out = tmp_path / "offline.pt"
    result = _run(
        ["-c", LOAD, "someone/tiny-detr", str(tmp_path / "inputs.pt"), str(out)],
        home,
        "http://127.0.0.1:9",
        offline=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(expected, torch.load(out))


@pytest.mark.parametrize(
    "source,offline,message",
    [
        ("someone/no-such-model", False, "no such repository on the Hugging Face Hub, or a private one"),
        ("someone/tiny-detr@v9", False, "has no such revision"),
        ("someone/tiny-detr", True, "not in the local Hugging Face cache"),
    ],
)
def test_what_cannot_be_had_is_named(hub, tmp_path, source, offline, message):
    _, endpoint, _ = hub
    result = _run(["-m", "detrkit", "info", source], tmp_path / "empty-home", endpoint, offline=offline)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and source.split("@")[0] in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_hub_is_not_retried(tmp_path):
    """Nothing listening at the endpoint (and not HF_HUB_OFFLINE): straight to the cache, whose miss is
    named with the path looked for, instead of huggingface_hub's five retries (~27 s)."""
    result = _run(["-m", "detrkit", "info", "runs/model"], tmp_path / "empty-home", "http://127.0.0.1:9")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not in the local Hugging Face cache" in result.stderr
    assert "no local file or folder of that name" in result.stderr
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr


def test_a_local_folder_of_the_same_name_wins(hub, tmp_path, monkeypatch):
    import detrkit

    model, _, _ = hub
    local = tmp_path / "someone" / "tiny-detr"
    model.save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    images, padding_mask = padded_batch()
    loaded = detrkit.load_model("someone/tiny-detr")  # no server, no network: the folder
    with torch.no_grad():
        assert_close(hf_outputs(model, images, padding_mask), loaded(images, padding_mask))


def test_official_panoptic_repositories_know_their_stuff_classes(hub, tmp_path):
    """Their config.json names 250 labels without saying which are stuff; detrkit knows (91-249)."""
    _, endpoint, _ = hub
    show = (
        "import detrkit; d = detrkit.Detector.from_pretrained('facebook/detr-resnet-50-panoptic'); "
        "c = d.model.config; print(c.masks, c.stuff_ids[0], c.stuff_ids[-1], len(c.stuff_ids), d.default_segmentation)"
    )
    result = _run(["-c", show], tmp_path / "home", endpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "91", "249", "159", "panoptic"]


@pytest.fixture
def endpoint(monkeypatch):
    """Set huggingface_hub's endpoint (and clear offline mode and proxies) for _endpoint_reachable."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)


def test_the_endpoint_probe(endpoint, monkeypatch):
    import socket

    from huggingface_hub import constants

    from detrkit.checkpoints.hub import _endpoint_reachable

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        endpoint(f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert _endpoint_reachable()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert not _endpoint_reachable()  # offline mode: never probed
    finally:
        listener.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint("http://127.0.0.1:9")
    assert not _endpoint_reachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert _endpoint_reachable()  # through a proxy: left to huggingface_hub


@pytest.mark.parametrize("url,address", [("https://hub.example", ("hub.example", 443)),
                                          ("http://hub.example", ("hub.example", 80)),
                                          ("http://hub.example:8080", ("hub.example", 8080))])  # fmt: skip
def test_the_endpoint_probe_connects_to_the_scheme_port(endpoint, monkeypatch, url, address):
    import socket

    from detrkit.checkpoints.hub import _endpoint_reachable

    tried = []

    class Connection:
        def close(self):
            pass

    def connect(where, timeout):
        tried.append(where)
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    endpoint(url)
    assert _endpoint_reachable() and tried == [address]
