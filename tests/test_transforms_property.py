"""Property-based checks of the training transforms on random boxes (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from detrkit.data.transforms import RandomResize, TransformConfig, train_transforms

CONFIG = TransformConfig.scaled(0.2)


@st.composite
def samples(draw):
    height = draw(st.integers(24, 200))
    width = draw(st.integers(24, 200))
    n = draw(st.integers(0, 8))
    boxes = []
    for _ in range(n):
        x0 = draw(st.floats(0, width - 2))
        y0 = draw(st.floats(0, height - 2))
        x1 = draw(st.floats(x0 + 1, width))
        y1 = draw(st.floats(y0 + 1, height))
        boxes.append([x0, y0, x1, y1])
    seed = draw(st.integers(0, 2**31 - 1))
    return height, width, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), seed


def _run(transform, height, width, boxes, seed):
    torch.manual_seed(seed)
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(len(boxes)),
    }
    return transform(image, target)


@settings(max_examples=150, deadline=None)
@given(samples())
def test_training_transforms_keep_boxes_valid(sample):
    height, width, boxes, seed = sample
    image, target = _run(train_transforms(CONFIG), height, width, boxes, seed)
    h, w = image.shape[-2:]
    out = target["boxes"]
    assert out.canvas_size == (h, w)
    assert len(out) == len(target["labels"]) <= len(boxes)
    if len(out):
        assert (out[:, 0] >= 0).all() and (out[:, 1] >= 0).all()
        assert (out[:, 2] <= w).all() and (out[:, 3] <= h).all()
        assert ((out[:, 2] - out[:, 0]) >= 1).all() and ((out[:, 3] - out[:, 1]) >= 1).all()
    # Labels of surviving objects are a subset, in order: objects are only ever removed.
    labels = target["labels"].tolist()
    assert labels == sorted(labels) and set(labels) <= set(range(len(boxes)))
    assert min(h, w) <= max(CONFIG.train_scales) and max(h, w) <= CONFIG.max_size


@settings(max_examples=100, deadline=None)
@given(samples())
def test_flip_and_resize_never_drop_objects(sample):
    height, width, boxes, seed = sample
    keep_all = v2.Compose(
        [v2.RandomHorizontalFlip(0.5), RandomResize(list(CONFIG.train_scales), CONFIG.max_size)]
    )
    image, target = _run(keep_all, height, width, boxes, seed)
    assert len(target["boxes"]) == len(boxes)
    h, w = image.shape[-2:]
    scale = torch.tensor([w / width, h / height] * 2)
    widths = (target["boxes"][:, 2] - target["boxes"][:, 0]) / scale[0]
    assert torch.allclose(widths, boxes[:, 2] - boxes[:, 0], atol=1e-3)
