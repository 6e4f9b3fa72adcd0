"""The official DETR checkpoints (original format), downloaded into the torch hub cache on demand."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.error
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

BASE_URL = "https://dl.fbaipublicfiles.com/detr/"

# COCO's 91-id layout used by the original detection checkpoints: label i is COCO category id i.
COCO_CLASSES = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A published checkpoint: where it lives, its SHA-256 prefix, what its file cannot tell."""

    filename: str
    sha256_prefix: str
    config: dict[str, Any] = field(default_factory=dict)
    box_ap: float | None = None  # COCO val2017, as published
    pq: float | None = None

    @property
    def url(self) -> str:
        return BASE_URL + self.filename


_COCO = {"class_names": COCO_CLASSES, "category_ids": tuple(range(91))}
# The panoptic checkpoints predict 250 labels: COCO's thing ids 0-90, then stuff (is_thing_map of the
# original's panoptic evaluation).
_PANOPTIC = {"stuff_ids": tuple(range(91, 250))}

OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    "detr-r50": OfficialCheckpoint("detr-r50-e632da11.pth", "e632da11", {**_COCO}, box_ap=42.0),
    "detr-r50-dc5": OfficialCheckpoint(
        "detr-r50-dc5-f0fb7ef5.pth", "f0fb7ef5", {**_COCO, "dilation": True}, 43.3
    ),
    "detr-r101": OfficialCheckpoint("detr-r101-2c7b67e5.pth", "2c7b67e5", {**_COCO}, box_ap=43.5),
    "detr-r101-dc5": OfficialCheckpoint(
        "detr-r101-dc5-a2e86def.pth", "a2e86def", {**_COCO, "dilation": True}, 44.9
    ),
    "detr-r50-panoptic": OfficialCheckpoint(
        "detr-r50-panoptic-00ce5173.pth", "00ce5173", _PANOPTIC, 38.8, pq=43.4
    ),
    "detr-r50-dc5-panoptic": OfficialCheckpoint(
        "detr-r50-dc5-panoptic-da08f1b1.pth", "da08f1b1", {**_PANOPTIC, "dilation": True}, 40.2, pq=44.6
    ),
    "detr-r101-panoptic": OfficialCheckpoint(
        "detr-r101-panoptic-40021d53.pth", "40021d53", _PANOPTIC, 40.1, pq=45.1
    ),
}


def cache_dir() -> Path:
    """Where official checkpoints are kept: ``$TORCH_HOME/hub/checkpoints`` (torch.hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_official(name: str, *, url: str | None = None, progress: bool = True) -> Path:
    """The local path of official checkpoint ``name``, downloading it (checksum verified) if needed.

    ``url`` overrides where it is fetched from (a mirror).
    """

    if name not in OFFICIAL_CHECKPOINTS:
        raise CheckpointError(
            f"unknown official checkpoint {name!r}: choose from {', '.join(OFFICIAL_CHECKPOINTS)}"
        )
    entry = OFFICIAL_CHECKPOINTS[name]
    dst = cache_dir() / entry.filename
    url = url or entry.url
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Writes to a temporary file, checks the hash, then renames: never a partial file at dst.
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=entry.sha256_prefix, progress=progress)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise CheckpointError(
                f"could not download {name} from {url} ({e}). Without internet access, fetch that file "
                f"on another machine and put it at {dst} (or pass its path to load_model)."
            ) from None
        except RuntimeError as e:  # hash mismatch
            raise CheckpointError(f"download of {name} from {url} is corrupt: {e}") from None
    digest = _sha256(dst)
    if not digest.startswith(entry.sha256_prefix):
        raise CheckpointError(
            f"{dst}: SHA-256 {digest[:8]}... does not match the published {entry.sha256_prefix}...; "
            f"delete it and download {url} again"
        )
    return dst


# --- Hugging Face Hub repositories ----------------------------------------------------------------
# What the official repositories' config.json cannot say: which of the panoptic models' 250 labels
# are stuff (their id2label names them, without a thing/stuff flag).
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/detr-resnet-50-panoptic": _PANOPTIC,
    "facebook/detr-resnet-50-dc5-panoptic": _PANOPTIC,
    "facebook/detr-resnet-101-panoptic": _PANOPTIC,
}

# "owner/name" or "owner/name@revision" (a branch, tag or commit), as transformers users write them.
HUB_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# What the Hub allows in a repository id besides HUB_REPO's characters (huggingface_hub's own
# validator): no "--" or "..", no leading or trailing "-" or "." in a part, at most 96 characters.
_NOT_HUB = re.compile(r"--|\.\.|(^|/)[-.]|[-.](/|$|@)")
# A name ending like a checkpoint file is a mistyped local path, not a repository.
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".json", ".ckpt")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a Hub repository id (a local path of that name wins, checked first)."""
    match = HUB_REPO.match(source)
    if match is None or len(match["repo"]) > 96 or _NOT_HUB.search(match["repo"]):
        return False
    return not match["repo"].lower().endswith(_FILE_SUFFIXES)


def hub_config(source: str) -> dict[str, Any]:
    """DetrConfig fields known for an official Hub repository beyond its config.json (else {})."""
    match = HUB_REPO.match(source)
    return dict(HUB_CONFIGS.get(match["repo"], {})) if match else {}


def download_hub_repo(source: str, *, token: str | bool | None = None) -> Path:
    """Fetch ``config.json`` and the weights of a DETR repository on the Hugging Face Hub into its
    usual cache (``HF_HOME``; ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` honoured, as by
    ``transformers``) and return the local folder that holds them."""
    match = HUB_REPO.match(source)
    if match is None:
        raise CheckpointError(f"{source}: not a Hugging Face Hub repository id (owner/name[@revision])")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(
            f"{source}: loading from the Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    repo, revision = match["repo"], match["revision"]
    where = f"{repo}" + (f" at revision {revision!r}" if revision else "")

    # huggingface_hub retries a connection error five times (~27 s) before it falls back to its cache;
    # an endpoint that cannot be resolved or connected to goes straight to the cache instead.
    local_only = not _endpoint_reachable()

    def fetch(filename: str) -> Path:
        return Path(
            hf_hub_download(repo, filename, revision=revision, token=token, local_files_only=local_only)
        )

    try:
        config = fetch("config.json")
        not_cached = None
        for filename in WEIGHT_FILES:
            try:
                fetch(filename)
                return config.parent
            except LocalEntryNotFoundError as e:  # offline: the other file may be in the cache
                not_cached = e
            except EntryNotFoundError:  # the repository has the other format
                continue
        if not_cached is not None:
            raise not_cached
        raise CheckpointError(f"{where}: the repository has no {' or '.join(WEIGHT_FILES)}")
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        raise CheckpointError(
            f"{where}: not in the local Hugging Face cache ({_hf_cache()}) and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1), and there is no local file or folder of that name. Download it "
            "once online, or pass a local path."
        ) from None
    except GatedRepoError:
        raise CheckpointError(
            f"{where}: a gated repository; accept its terms on the Hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{where}: no such repository on the Hugging Face Hub, or a private one (set HF_TOKEN); "
            "a local folder of that name would have been used first"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repository has no such revision") from None
    except EntryNotFoundError:
        raise CheckpointError(
            f"{where}: the repository has no config.json (not a transformers model)"
        ) from None
    except OSError as e:  # network errors that huggingface_hub does not translate
        raise CheckpointError(f"{where}: download from the Hugging Face Hub failed ({e})") from None


def _endpoint_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint (``HF_ENDPOINT``) opens within ``timeout`` seconds.

    Offline mode answers False. Behind a proxy the endpoint may be unreachable directly yet served,
    so with a proxy set this answers True and leaves the network to huggingface_hub.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
    ):
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
