"""The paper's attention figures: what each detection's query looks at (decoder cross-attention of the
last layer) and what a few image positions attend to (encoder self-attention of the last layer).

Attention weights are averaged over heads. They are recorded by running the two attention modules
with ``need_weights=True`` for one forward pass (the model is otherwise unchanged).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from ..fileio import atomic_write
from .detector import Detector, ImageInput, to_pil


@dataclass
class AttentionMaps:
    """Attention of one image.

    ``boxes`` Tensor[N, 4] xyxy in original pixels, ``scores`` Tensor[N], ``names`` of the confident
    detections; ``decoder`` Tensor[N, h, w]: each detection's cross-attention over the feature map;
    ``encoder`` Tensor[h, w, h, w]: self-attention of each feature position over all positions;
    ``image`` the original picture; ``scale`` (sy, sx) original pixels per feature cell.
    """

    image: Image.Image
    boxes: Tensor
    scores: Tensor
    names: list[str]
    decoder: Tensor
    encoder: Tensor | None
    scale: tuple[float, float]


@contextlib.contextmanager
def _recording(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Run ``modules`` (MultiheadAttention) with weights returned and keep the weights per name."""
    records: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():
        module.forward = functools.partial(type(module).forward, module, need_weights=True)

        def hook(_module, _args, output, name=name):
            records[name] = output[1]

        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for module in modules.values():
            del module.forward  # back to the class's forward


@torch.inference_mode()
def attention_maps(detector: Detector, image: ImageInput, threshold: float = 0.7) -> AttentionMaps:
    """Detections of ``image`` above ``threshold`` with the attention behind them."""
    model = detector.model
    picture = to_pil(image)
    tensor = detector.preprocess(picture)[None].to(detector.device)
    modules = {"decoder": model.transformer.decoder.layers[-1].multihead_attn}
    if model.config.enc_layers:
        modules["encoder"] = model.transformer.encoder.layers[-1].self_attn
    shapes: list[tuple[int, int]] = []
    handle = model.input_proj.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[-2:])))
    try:
        with _recording(modules) as records:
            outputs = model(tensor)
    finally:
        handle.remove()
    h, w = shapes[0]
    orig = torch.tensor([[picture.height, picture.width]], device=detector.device)
    [found] = detector._post(outputs, orig)
    keep = (found["scores"] > threshold).nonzero().flatten()
    keep = keep[found["scores"][keep].argsort(descending=True)]
    labels = found["labels"][keep].cpu()
    encoder = records.get("encoder")
    return AttentionMaps(
        image=picture,
        boxes=found["boxes"][keep].cpu(),
        scores=found["scores"][keep].cpu(),
        names=[detector.class_names[int(label)] for label in labels],
        decoder=records["decoder"][0, keep].reshape(len(keep), h, w).float().cpu(),
        encoder=None if encoder is None else encoder[0].reshape(h, w, h, w).float().cpu(),
        scale=(picture.height / h, picture.width / w),
    )


def draw_attention(
    maps: AttentionMaps,
    path: str | os.PathLike,
    *,
    max_detections: int = 6,
    points: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Write the figure: a row of decoder maps with the boxes they produced, and (when the model has
    an encoder) a row of encoder self-attention maps for reference points (``(x, y)`` in original
    pixels; default: the centres of the detections, or a few fixed points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    count = min(len(maps.scores), max_detections)
    if points is None:
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in maps.boxes[:4].tolist()]
        width, height = maps.image.size
        points = centres or [
            (width * fx, height * fy) for fx, fy in ((0.25, 0.25), (0.75, 0.25), (0.5, 0.75))
        ]
    rows = 1 + (maps.encoder is not None)
    cols = max(count, len(points) if maps.encoder is not None else 0, 1) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    extent = (0, maps.image.width, maps.image.height, 0)
    ax = axes[0][0]
    ax.imshow(maps.image)
    ax.set_title(f"{count} detections" if count else "no detection above threshold", fontsize=9)
    for i in range(count):
        x1, y1, x2, y2 = maps.boxes[i].tolist()
        color = plt.cm.tab10(i % 10)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=2))
        panel = axes[0][i + 1]
        panel.imshow(maps.decoder[i].numpy(), cmap="viridis", extent=extent)
        panel.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=1.5))
        panel.set_title(f"{maps.names[i]} {maps.scores[i]:.2f}", fontsize=9)
    if maps.encoder is not None:
        ax = axes[1][0]
        ax.imshow(maps.image)
        ax.set_title("encoder: reference points", fontsize=9)
        sy, sx = maps.scale
        h, w = maps.encoder.shape[:2]
        for j, (x, y) in enumerate(points[: cols - 1]):
            cy, cx = min(int(y / sy), h - 1), min(int(x / sx), w - 1)
            color = plt.cm.tab10(j % 10)
            ax.add_patch(Circle((x, y), radius=max(2, min(maps.image.size) / 60), color=color))
            panel = axes[1][j + 1]
            panel.imshow(maps.encoder[cy, cx].numpy(), cmap="viridis", extent=extent)
            panel.add_patch(Circle((x, y), radius=max(2, min(maps.image.size) / 60), color=color))
            panel.set_title(f"self-attention at ({x:.0f}, {y:.0f})", fontsize=9)
    fig.tight_layout()
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    plt.close(fig)
    return path
