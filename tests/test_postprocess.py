"""Post-processing of instance masks against masks whose place in the image is known by construction."""

import torch
import torch.nn.functional as F

from detrkit import PostProcess
from detrkit.models.postprocess import PostProcessSegm

# Two images padded into one batch: the first is landscape (padded at the bottom), the second portrait
# (padded on the right). Both were resized by 0.32 from their original size.
IMAGE_SIZES = torch.tensor([[48, 80], [64, 48]])
ORIG_SIZES = torch.tensor([[150, 250], [200, 150]])
PADDED = (64, 80)
# Rectangles of positive mask logits, in cells of the quarter-resolution mask grid:
# (image, query) -> (row0, row1, col0, col1), end-exclusive.
CELLS = {(0, 0): (2, 7, 3, 15), (1, 0): (9, 15, 1, 6)}


def mask_outputs():
    """pred_masks of +10 on the rectangles in CELLS and -10 elsewhere; also +10 in the padding."""
    masks = torch.full((2, 2, PADDED[0] // 4, PADDED[1] // 4), -10.0)
    for (b, q), (r0, r1, c0, c1) in CELLS.items():
        masks[b, q, r0:r1, c0:c1] = 10.0
    # The second query of each image is positive only in its padding: below image 0 (input rows 48-63),
    # right of image 1 (input columns 48-79). Neither may show in the masks.
    masks[0, 1, 12:, :] = 10.0
    masks[1, 1, :, 12:] = 10.0
    logits = torch.zeros(2, 2, 3)
    boxes = torch.full((2, 2, 4), 0.5)
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}


def expected_mask(cells, image_size, orig_size, margin=0):
    """The rectangle in original pixels: a pixel is in it when its centre, mapped into the model input,
    falls in the rectangle's input pixels, shrunk by ``margin`` input pixels. (Each mask cell covers
    4x4 input pixels; the bilinear upsampling crosses 0 exactly half-way between cells, i.e. on the
    cells' borders, except at the rectangle's corners, which it rounds off by an input pixel.)"""
    (h, w), (oh, ow) = image_size, orig_size
    mask = torch.zeros(oh, ow, dtype=torch.bool)
    if cells is None:
        return mask
    r0, r1, c0, c1 = (4 * v for v in cells)
    ys = (torch.arange(oh) + 0.5) * h / oh
    xs = (torch.arange(ow) + 0.5) * w / ow
    inside_y = (ys >= r0 + margin) & (ys < r1 - margin)
    inside_x = (xs >= c0 + margin) & (xs < c1 - margin)
    return inside_y[:, None] & inside_x[None, :]


def _grow(mask, pixels=1):
    return F.max_pool2d(mask[None, None].float(), 2 * pixels + 1, 1, pixels)[0, 0].bool()


def assert_rectangle(mask, cells, image_size, orig_size, min_iou):
    """``mask`` is the rectangle but for its border, which may lie one original pixel off (the final
    nearest-neighbour resize takes each pixel from the input pixel its top-left corner falls in, as
    the original's ``F.interpolate(mode="nearest")``, not its centre), and its rounded corners."""
    exact = expected_mask(cells, image_size, orig_size)
    union = (mask | exact).sum().item()
    assert union and (mask & exact).sum().item() / union > min_iou
    inner = ~_grow(~expected_mask(cells, image_size, orig_size, margin=1))
    assert inner.any() and mask[inner].all(), "pixels inside the rectangle are missing"
    assert not mask[~_grow(exact)].any(), "pixels outside the rectangle are set"


def test_instance_masks_land_on_the_original_image_where_the_logits_are():
    outputs = mask_outputs()
    results = PostProcess()(outputs, ORIG_SIZES)
    results = PostProcessSegm()(results, outputs, IMAGE_SIZES, ORIG_SIZES)
    for b, result in enumerate(results):
        oh, ow = ORIG_SIZES[b].tolist()
        assert result["masks"].shape == (2, oh, ow) and result["masks"].dtype == torch.bool
        for q in range(2):
            mask = result["masks"][q]
            cells = CELLS.get((b, q))
            if cells is None:
                assert not mask.any(), f"image {b} query {q}: mask from the padding"
                continue
            assert_rectangle(mask, cells, IMAGE_SIZES[b].tolist(), (oh, ow), min_iou=0.9)


def test_instance_masks_of_a_single_unpadded_image_scale_with_the_image():
    """No padding, a non-integer scale that differs between height and width."""
    masks = torch.full((1, 1, 10, 16), -5.0)
    masks[0, 0, 1:4, 9:15] = 5.0
    outputs = {
        "pred_logits": torch.zeros(1, 1, 2),
        "pred_boxes": torch.full((1, 1, 4), 0.5),
        "pred_masks": masks,
    }
    image_size, orig = torch.tensor([[40, 64]]), torch.tensor([[91, 171]])
    [result] = PostProcessSegm()(PostProcess()(outputs, orig), outputs, image_size, orig)
    assert_rectangle(result["masks"][0], (1, 4, 9, 15), (40, 64), (91, 171), min_iou=0.85)
    # The rectangle's top-right corner region is in, the image's opposite corner out.
    assert result["masks"][0, 12:30, 100:160].all() and not result["masks"][0, 50:, :80].any()
