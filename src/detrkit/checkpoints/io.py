"""Reading and writing DETR checkpoints in detrkit's, the original's and Hugging Face's formats.

Nothing here executes code from a file: PyTorch files are read with ``weights_only=True`` (the only
class allowed besides tensors and plain containers is ``argparse.Namespace``, which the original
training script stores as ``args``), everything else is safetensors or JSON. Files are written to a
temporary name and renamed, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..distributed import pick_device
from ..errors import CheckpointError
from ..fileio import atomic_write, read_json_file, write_json_atomic
from ..models.config import DetrConfig
from ..models.detr import Detr
from .configs import config_from_hf, hf_config_dict, infer_config
from .layouts import detrkit_to_hf, detrkit_to_original, hf_to_detrkit, original_to_detrkit

FORMATS = ("detrkit", "original", "hf")
StateDict = dict[str, torch.Tensor]

# Fields of the original training script's ``args`` that DetrConfig shares (same names).
_ORIGINAL_ARGS = (
    "dilation",
    "nheads",
    "dropout",
    "aux_loss",
    "set_cost_class",
    "set_cost_bbox",
    "set_cost_giou",
    "bbox_loss_coef",
    "giou_loss_coef",
    "mask_loss_coef",
    "dice_loss_coef",
    "eos_coef",
)


# ---------------------------------------------------------------------------------------------------
# Low-level I/O
# ---------------------------------------------------------------------------------------------------


def torch_load_safe(path: str | os.PathLike) -> Any:
    """``torch.load`` that refuses anything but tensors, plain containers and ``argparse.Namespace``."""
    if Path(path).is_file() and not _is_pytorch_file(Path(path)):
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle)"
        )
    try:
        # From an open file: torch.load would otherwise pick a reader by the file's name.
        with torch.serialization.safe_globals([argparse.Namespace]), open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain "
            f"containers, which could run code when unpickled ({detail}). detrkit never executes code "
            "from a checkpoint; if you trust the file, re-save its state dict with plain tensors."
        ) from None
    except Exception as e:  # noqa: BLE001 - the restricted unpickler fails in many ways on garbage
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte little-endian length of its JSON header, then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8


def _is_pytorch_file(path: Path) -> bool:
    """``torch.save`` output: a zip archive, or a legacy pickle (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith((b"PK\x03\x04", b"\x80"))


def _build(config: DetrConfig) -> Detr:
    """The model a checkpoint's weights go into: never with ImageNet weights (the file's replace
    them; a model trained from them must not download them again, nor fail offline)."""
    return Detr(dataclasses.replace(config, pretrained_backbone=False))


def _check_shapes(
    config: DetrConfig, state_dict: StateDict, source: str | os.PathLike, model: Detr | None = None
) -> None:
    """Raise :class:`CheckpointError` naming the tensors whose shapes contradict ``config``, as
    built in ``model`` (or on the meta device: no memory, no compute)."""
    if model is None:
        with torch.device("meta"):
            model = _build(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k} is {list(v.shape)} in the file but {list(expected[k])} for this config"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if wrong:
        raise CheckpointError(
            f"{source}: the weights contradict the checkpoint's config "
            f"(num_classes={config.num_classes}, d_model={config.d_model}, num_queries={config.num_queries}, "
            f"backbone={config.backbone}): {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json_file(path, error=CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def detect_layout(state_dict: StateDict) -> str:
    """``original``, ``hf`` or ``detrkit``, from the parameter names."""
    keys = list(state_dict)
    if any(k.startswith(("backbone.0.", "detr.backbone.0.")) for k in keys):
        return "original"
    if any("class_labels_classifier" in k or k.startswith(("model.backbone.", "detr.model.")) for k in keys):
        return "hf"
    if any(k.startswith("backbone.body.") for k in keys):
        return "detrkit"
    raise CheckpointError(f"unrecognised parameter names (e.g. {keys[:3]}): not a DETR checkpoint")


# ---------------------------------------------------------------------------------------------------
# Reading: any format -> (detrkit state dict, known config fields)
# ---------------------------------------------------------------------------------------------------


def _from_layout(state_dict: StateDict, where: Path) -> StateDict:
    try:
        layout = detect_layout(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if layout == "original":
        return original_to_detrkit(state_dict)
    if layout == "hf":
        return hf_to_detrkit(state_dict)
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def _read_hf_dir(path: Path) -> tuple[StateDict, dict[str, Any]]:
    hf = _read_json(path / "config.json")
    if hf.get("model_type") not in (None, "detr"):
        raise CheckpointError(f"{path}: config.json describes a {hf.get('model_type')!r} model, not DETR")
    if (path / "model.safetensors").exists():
        state_dict, _ = _read_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").exists():
        state_dict = torch_load_safe(path / "pytorch_model.bin")
        if not _is_state_dict(state_dict):
            raise CheckpointError(f"{path / 'pytorch_model.bin'}: expected a state dict of tensors")
    else:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
    try:
        known = config_from_hf(hf)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, AttributeError, KeyError) as e:  # a field of another type than transformers writes
        raise CheckpointError(
            f"{path / 'config.json'}: a field has a type transformers does not write ({e!r})"
        ) from None
    if isinstance(hf.get("detrkit_config"), dict):
        known.update(hf["detrkit_config"])  # written by detrkit: lossless round trip
    return _from_layout(state_dict, path), known


def read_checkpoint(source: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read any supported checkpoint: returns a detrkit-layout state dict and the config fields the
    file states (the rest is inferred from the weights by :func:`detrkit.checkpoints.configs.infer_config`)."""
    path = Path(source)
    if not path.exists():  # a local file or folder always wins over a name
        from .hub import OFFICIAL_CHECKPOINTS, download_hub_repo, download_official, hub_config, is_hub_id

        if str(source) in OFFICIAL_CHECKPOINTS:
            path = download_official(str(source))
            state_dict, known = read_checkpoint(path)
            return state_dict, {**OFFICIAL_CHECKPOINTS[str(source)].config, **known}
        if is_hub_id(str(source)):
            state_dict, known = _read_hf_dir(download_hub_repo(str(source)))
            return state_dict, {**hub_config(str(source)), **known}
        raise CheckpointError(
            f"{source}: no such file or directory, not an official checkpoint name "
            f"({', '.join(OFFICIAL_CHECKPOINTS)}), nor a Hugging Face Hub id (owner/name[@revision])"
        )
    if path.is_dir():
        if (path / "config.json").exists():
            return _read_hf_dir(path)
        raise CheckpointError(
            f"{path}: a directory without config.json (expected a Hugging Face DETR folder)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")

    # By content, not by name: a safetensors file renamed .pth is still read as safetensors (never
    # called a pickle), and a PyTorch checkpoint named .safetensors goes to the restricted unpickler.
    safetensors = _is_safetensors(path)
    if path.suffix == ".safetensors" and not safetensors and not _is_pytorch_file(path):
        raise CheckpointError(f"{path}: not a readable safetensors file (no safetensors header)")
    if safetensors:
        state_dict, metadata = _read_safetensors(path)
        known: dict[str, Any] = {}
        if metadata.get("format") == "detrkit":
            try:
                known = json.loads(metadata["config"])
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{path}: detrkit checkpoint with a broken config ({e})") from None
            if not isinstance(known, dict):
                raise CheckpointError(f"{path}: detrkit checkpoint whose config is not a JSON object")
        return _from_layout(state_dict, path), known

    obj = torch_load_safe(path)
    known = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            known.update({k: getattr(args, k) for k in _ORIGINAL_ARGS if hasattr(args, k)})
        if isinstance(obj.get("detrkit_config"), dict):
            known.update(obj["detrkit_config"])
        obj = obj["model"]
    if not _is_state_dict(obj):
        raise CheckpointError(f"{path}: expected a state dict of tensors, or a dict with one under 'model'")
    return _from_layout(obj, path), known


def load_model(source: str | os.PathLike, *, device: str | torch.device = "cpu", **overrides: Any) -> Detr:
    """Load a DETR from any supported checkpoint, in eval mode.

    ``source`` is a path to an original DETR ``.pth`` (published weights or a training checkpoint),
    a Hugging Face DETR folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``), a
    detrkit ``.safetensors`` file, or the name of an official checkpoint (``detr-r50``, ...). The
    architecture comes from the weights and the file's own config; ``overrides`` set what neither
    states (e.g. ``dilation=True`` for a DC5 ``.pth`` without ``args``).
    """
    device = pick_device(device)
    state_dict, known = read_checkpoint(source)
    known.update(overrides)
    try:
        config = infer_config(state_dict, **known)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    model = _build(config)
    _check_shapes(config, state_dict, source, model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Trainable BatchNorm (frozen_bn=False) counts its updates; the count is not a weight.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the inferred architecture ({config.backbone}, "
            f"{config.enc_layers}+{config.dec_layers} layers, masks={config.masks}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{source}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold NaN or infinite values: "
            "a model with them predicts nothing (was it saved from a diverged run?)"
        )
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _state_dict(model: Detr) -> StateDict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: Detr, path: str | os.PathLike, fmt: str = "detrkit") -> Path:
    """Save ``model`` as ``fmt``: ``detrkit`` (one ``.safetensors`` file with the config in its
    metadata), ``original`` (a ``.pth`` the original code loads) or ``hf`` (a folder that
    ``transformers`` loads with ``from_pretrained``). Returns the written path."""
    path = Path(path)
    config = model.config
    state_dict = _state_dict(model)
    if fmt == "detrkit":
        metadata = {"format": "detrkit", "detrkit_version": __version__, "config": config.to_json()}
        atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata=metadata))
    elif fmt == "original":
        if config.timm_name is not None:
            raise CheckpointError(
                f"cannot write {path} in the original DETR format: it holds torchvision ResNet backbones "
                f"only, not {config.backbone} (save it as detrkit or hf instead)"
            )
        payload = {"model": detrkit_to_original(state_dict), "detrkit_config": config.to_dict()}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    elif fmt == "hf":
        try:
            hf_state = detrkit_to_hf(state_dict)
            hf_config = {**hf_config_dict(config), "detrkit_config": config.to_dict()}
        except ValueError as e:
            raise CheckpointError(f"cannot write {path} as a Hugging Face checkpoint: {e}") from None
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(
            path / "model.safetensors", lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"})
        )
        write_json_atomic(path / "config.json", hf_config)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return path


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, **overrides: Any) -> Path:
    """Read ``src`` in any format and write it to ``dst`` as ``fmt`` (lossless)."""
    return save_model(load_model(src, **overrides), dst, fmt)


def config_of(source: str | os.PathLike) -> DetrConfig:
    """The DetrConfig a checkpoint loads with, without building the model."""
    state_dict, known = read_checkpoint(source)
    try:
        config = infer_config(state_dict, **known)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    _check_shapes(config, state_dict, source)
    return config
