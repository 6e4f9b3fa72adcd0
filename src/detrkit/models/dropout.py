"""Dropout whose random mask is cheap to draw on a CPU.

``F.dropout`` draws its mask with ``bernoulli_``, which on a CPU costs about 8 ns per element: in
DETR's training step at 800x1066 that is 9% of the step, most of it for the encoder's attention
weights (batch x 8 heads x ~850^2 per layer). Here the mask comes from raw 64-bit words of the same
generator (``random_`` over the full int64 range, ~3.5 ns per word), each split into two 32-bit
integers that are compared with a threshold: an element is kept when its integer is at or above
``round(p * 2**32)`` (offset to the signed range), so the drop probability is ``p`` to within 2^-33
and kept elements are scaled by ``1 / (1 - p)``, as ``F.dropout`` does. The mask is a function of
``torch.manual_seed`` like ``F.dropout``'s (a different draw from the same seed).

On other devices ``F.dropout`` is used: GPU kernels draw their masks cheaply already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 2**32


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """Bool Tensor[shape], True with probability ``1 - p`` independently per element, drawn from
    the default generator of ``device``."""
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
    # A signed int32 is uniform on [-2^31, 2^31): below -2^31 + round(p * 2^32) with probability p.
    threshold = -(2**31) + round(p * _LEVELS)
    return (words.view(torch.int32)[:numel] >= threshold).view(shape)


class _ScaleKept(torch.autograd.Function):
    """``x * keep * scale`` that saves the Bool mask (1 byte per element) for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the CPU mask of :func:`keep_mask` (elsewhere ``F.dropout``)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _ScaleKept.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same attribute ``p``, same ``repr``) on :func:`dropout`."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training)
