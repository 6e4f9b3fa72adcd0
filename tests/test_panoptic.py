"""Panoptic / semantic post-processing against the original DETR's algorithm, and PQ on hand-computed cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detrkit.data.coco import rgb_to_id
from detrkit.panoptic import PostProcessPanoptic, id_to_rgb, png_bytes, semantic_segmentation
from detrkit.pq import image_pq_stats, summarize_pq


def original_panoptic(logits, masks, size, orig, is_thing, threshold=0.85):
    """The original DETR's PostProcessPanoptic for one unpadded image, loops and PIL included."""
    scores, labels = logits.softmax(-1).max(-1)
    keep = labels.ne(logits.shape[-1] - 1) & (scores > threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    cur_masks = F.interpolate(cur_masks[None], size, mode="bilinear").squeeze(0)
    h, w = cur_masks.shape[-2:]
    cur_masks = cur_masks.flatten(1)
    stuff = {}
    for k, label in enumerate(cur_classes.tolist()):
        if not is_thing[label]:
            stuff.setdefault(label, []).append(k)

    def ids_area(m, sc, dedup=False):
        if m.shape[0] == 0:
            m_id = torch.zeros((h, w), dtype=torch.long)
        else:
            m_id = m.transpose(0, 1).softmax(-1).argmax(-1).view(h, w)
        if dedup:
            for equiv in stuff.values():
                for eq in equiv:
                    m_id.masked_fill_(m_id.eq(eq), equiv[0])
        img = Image.fromarray(id_to_rgb(m_id.numpy())).resize((orig[1], orig[0]), resample=Image.NEAREST)
        m_id = torch.from_numpy(rgb_to_id(np.asarray(img)))
        return [int(m_id.eq(i).sum()) for i in range(len(sc))], m_id

    area, m_id = ids_area(cur_masks, cur_scores, dedup=True)
    if cur_classes.numel() > 0:
        while True:
            small = torch.tensor([a <= 4 for a in area], dtype=torch.bool)
            if not small.any():
                break
            cur_scores, cur_classes, cur_masks = cur_scores[~small], cur_classes[~small], cur_masks[~small]
            area, m_id = ids_area(cur_masks, cur_scores)
    return m_id, [(int(c), a) for c, a in zip(cur_classes.tolist(), area)]


def random_outputs(seed, batch=2, queries=12, classes=5, hw=(10, 13)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes + 1, generator=g)
    # About half the queries are confident (above the 0.85 threshold), some of them "no object".
    confident = torch.rand(batch, queries, generator=g) < 0.6
    boost = torch.randint(0, classes + 1, (batch, queries), generator=g)
    logits[confident.nonzero(as_tuple=True) + (boost[confident],)] += 8.0
    masks = 3 * torch.randn(batch, queries, *hw, generator=g)
    return {"pred_logits": logits, "pred_masks": masks, "pred_boxes": torch.rand(batch, queries, 4)}


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_matches_the_original_algorithm(seed):
    is_thing = [True, True, True, False, False]  # two stuff classes, so stuff merging happens
    outputs = random_outputs(seed)
    size, orig = (40, 52), [(61, 79), (40, 52)]
    post = PostProcessPanoptic(is_thing)
    results = post(outputs, torch.tensor([size, size]), torch.tensor(orig))
    for b, result in enumerate(results):
        ref_ids, ref_segments = original_panoptic(
            outputs["pred_logits"][b], outputs["pred_masks"][b], size, orig[b], is_thing
        )
        # Same pixels, same segments; our ids are the original's + 1 (0 = void).
        assert torch.equal(result["segments"], ref_ids + 1)
        assert [(s["label"], s["area"]) for s in result["segments_info"]] == ref_segments
        assert [s["id"] for s in result["segments_info"]] == list(range(1, len(ref_segments) + 1))
        assert all(s["isthing"] == is_thing[s["label"]] for s in result["segments_info"])
        assert all(s["area"] > 4 for s in result["segments_info"])
        stuff = [s["label"] for s in result["segments_info"] if not s["isthing"]]
        assert len(stuff) == len(set(stuff)), "one segment per stuff class"


def test_panoptic_with_nothing_confident_is_all_void():
    outputs = random_outputs(0)
    outputs["pred_logits"][..., -1] += 20  # every query says "no object"
    results = PostProcessPanoptic([True] * 5)(
        outputs, torch.tensor([[40, 52]] * 2), torch.tensor([[20, 26]] * 2)
    )
    for result in results:
        assert result["segments_info"] == []
        assert result["segments"].shape == (20, 26) and not result["segments"].any()


def test_png_round_trip():
    ids = np.array([[0, 1, 300], [70000, 2, 1]])
    decoded = rgb_to_id(np.asarray(Image.open(io.BytesIO(png_bytes(ids))).convert("RGB")))
    assert np.array_equal(decoded, ids)


def test_semantic_segmentation_picks_the_class_of_the_covering_mask():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 0] = logits[0, 1, 2] = 10.0  # query 0: class 0, query 1: class 2
    logits[0, 2, 3] = 10.0  # query 2: no object
    masks = torch.full((1, 3, 4, 8), -10.0)
    masks[0, 0, :, :4] = 10.0
    masks[0, 1, :, 4:] = 10.0
    masks[0, 2] = 10.0  # a "no object" query covering everything changes nothing
    [seg] = semantic_segmentation(
        {"pred_logits": logits, "pred_masks": masks}, torch.tensor([[16, 32]]), torch.tensor([[16, 32]])
    )
    assert seg.shape == (16, 32)
    assert (seg[:, :14] == 0).all() and (seg[:, 18:] == 2).all()


# --- PQ on cases computed by hand --------------------------------------------------------------------
ISTHING = {1: True, 2: True, 4: True, 100: False}


def strip(spans):
    """[(start, stop, id)] -> int[1, 100] id map."""
    ids = np.zeros((1, 100), dtype=np.int64)
    for start, stop, value in spans:
        ids[0, start:stop] = value
    return ids


def test_pq_hand_computed():
    gt = strip([(0, 10, 1), (10, 20, 2), (20, 100, 3)])
    gt_segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 100}]
    pred = strip([(0, 8, 5), (20, 90, 7), (90, 100, 9)])
    pred_segments = [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 100}, {"id": 9, "category_id": 2}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments)
    assert stats[1].tolist() == pytest.approx([1, 0, 1, 0.8])  # tp, fp, fn, iou
    assert stats[100].tolist() == pytest.approx([1, 0, 0, 70 / 80])
    assert stats[2].tolist() == pytest.approx([0, 1, 0, 0])
    m = summarize_pq(stats, ISTHING)
    pq1, pq100 = 0.8 / 1.5, 0.875
    assert m["panoptic/PQ"] == pytest.approx((pq1 + pq100 + 0) / 3)
    assert m["panoptic/PQ_th"] == pytest.approx(pq1 / 2)
    assert m["panoptic/PQ_st"] == pytest.approx(pq100)
    assert m["panoptic/SQ"] == pytest.approx((0.8 + 0.875 + 0) / 3)
    assert m["panoptic/RQ"] == pytest.approx((1 / 1.5 + 1 + 0) / 3)


def test_pq_void_pixels_leave_the_union_and_mostly_void_predictions_are_not_false_positives():
    gt = strip([(10, 20, 1), (24, 100, 2)])  # 0-9 and 20-23 are void
    gt_segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 100}]
    pred = strip([(0, 12, 3), (12, 24, 4), (24, 100, 5)])
    pred_segments = [{"id": 3, "category_id": 2}, {"id": 4, "category_id": 1}, {"id": 5, "category_id": 100}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments)
    # Segment 4: intersection 8, union 12 + 10 - 8 - 4 void pixels = 10 -> IoU 0.8, a match.
    assert stats[1].tolist() == pytest.approx([1, 0, 0, 0.8])
    assert stats[100].tolist() == pytest.approx([1, 0, 0, 1.0])
    assert 2 not in stats  # segment 3 is 10/12 void: ignored
    assert summarize_pq(stats, ISTHING)["panoptic/PQ"] == pytest.approx(0.9)


def test_pq_crowd_regions():
    gt = strip([(0, 50, 1), (50, 100, 2)])
    gt_segments = [{"id": 1, "category_id": 1, "iscrowd": 1}, {"id": 2, "category_id": 100}]
    pred = strip([(0, 30, 3), (40, 60, 6), (60, 100, 5)])
    pred_segments = [{"id": 3, "category_id": 1}, {"id": 6, "category_id": 1}, {"id": 5, "category_id": 100}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments)
    # The crowd is never a false negative; segment 3 lies on it (ignored); segment 6 only half (FP).
    assert stats[1].tolist() == pytest.approx([0, 1, 0, 0])
    assert stats[100].tolist() == pytest.approx([1, 0, 0, 0.8])
    m = summarize_pq(stats, ISTHING)
    assert m["panoptic/PQ"] == pytest.approx(0.4)
    assert m["panoptic/PQ_st"] == pytest.approx(0.8) and m["panoptic/PQ_th"] == pytest.approx(0.0)


def test_pq_perfect_and_empty():
    gt = strip([(0, 30, 1), (30, 100, 2)])
    segments = [{"id": 1, "category_id": 4}, {"id": 2, "category_id": 100}]
    m = summarize_pq(image_pq_stats(gt, segments, gt, segments), ISTHING)
    assert m["panoptic/PQ"] == m["panoptic/SQ"] == m["panoptic/RQ"] == pytest.approx(1.0)
    # Nothing predicted: every ground-truth segment is a false negative.
    m = summarize_pq(image_pq_stats(gt, segments, np.zeros_like(gt), []), ISTHING)
    assert m["panoptic/PQ"] == 0.0
