"""Panoptic / semantic post-processing against the original DETR's algorithm, and PQ on hand-computed cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detrkit.data.panoptic import rgb_to_id
from detrkit.evaluation.pq import image_pq_stats, summarize_pq
from detrkit.models.panoptic import PostProcessPanoptic, id_to_rgb, png_bytes, semantic_segmentation


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


@pytest.mark.parametrize("orig", [(7, 9), (23, 31), (40, 52), (97, 41), (120, 160)])
def test_panoptic_matches_the_original_algorithm_at_any_output_size(orig):
    """Down- (even below the 10x13 mask logits) and upscaled outputs, non-uniform scales included."""
    is_thing = [True, True, True, False, False]
    size = (40, 52)
    for seed in range(3):
        outputs = random_outputs(seed, batch=1)
        [result] = PostProcessPanoptic(is_thing)(outputs, torch.tensor([size]), torch.tensor([orig]))
        ref_ids, ref_segments = original_panoptic(
            outputs["pred_logits"][0], outputs["pred_masks"][0], size, orig, is_thing
        )
        assert result["segments"].shape == orig
        assert torch.equal(result["segments"], ref_ids + 1)
        assert [(s["label"], s["area"]) for s in result["segments_info"]] == ref_segments


# --- small segments, by hand ---------------------------------------------------------------------------
# Six queries take part (classes 0 and 1 are things, 2 is stuff); Q4 is not confident and Q5 says "no
# object", so neither takes part although their mask logits are the highest anywhere. Winning query
# per pixel (mask logits -10 where not stated):
#   row 0:  1 1 0 0 0 7 7 7      Q0 (class 0): 5 everywhere
#   row 1:  1 1 0 0 0 7 7 7      Q1 (class 1): 10 on the 2x2 block (4 px)
#   row 2:  0 0 0 0 6 6 0 0      Q2 (class 1): 10 on row 5's strip (5 px), 7 at (3, 7)
#   row 3:  0 0 0 0 6 6 0 3      Q3 (class 0): 10 at (3, 7) (1 px)
#   row 4:  0 0 0 0 6 6 0 0      Q6 (stuff 2): 10 on its block, 6 under Q7
#   row 5:  2 2 2 2 2 0 0 0      Q7 (stuff 2): 10 on rows 0-1, columns 5-7
# Q7 is merged into Q6, the first query of its stuff class, leaving Q7 no pixels. Segments of at most 4
# pixels (Q1, Q3 and the emptied Q7) are dropped and each of their pixels goes to the best remaining
# query there: Q1's block to Q0, Q3's pixel to Q2 (7 > 5), Q7's to Q6 (6 > 5).
SMALL_FINAL = [
    [0, 0, 0, 0, 0, 6, 6, 6],
    [0, 0, 0, 0, 0, 6, 6, 6],
    [0, 0, 0, 0, 6, 6, 0, 0],
    [0, 0, 0, 0, 6, 6, 0, 2],
    [0, 0, 0, 0, 6, 6, 0, 0],
    [2, 2, 2, 2, 2, 0, 0, 0],
]


def small_segment_outputs():
    classes = [0, 1, 1, 0, 0, 3, 2, 2]  # 3 = no object
    logits = torch.zeros(1, 8, 4)
    for q, c in enumerate(classes):
        if q != 4:  # Q4: uniform probabilities, below the threshold
            logits[0, q, c] = 10.0
    m = torch.full((8, 6, 8), -10.0)
    m[0] = 5.0
    m[1, 0:2, 0:2] = 10.0
    m[2, 5, 0:5] = 10.0
    m[2, 3, 7] = 7.0
    m[3, 3, 7] = 10.0
    m[4, 2:4, 2:4] = 20.0
    m[5, 4, 6] = 20.0
    m[6, 2:5, 4:6] = 10.0
    m[6, 0:2, 5:8] = 6.0
    m[7, 0:2, 5:8] = 10.0
    return {"pred_logits": logits, "pred_masks": m[None]}


def _as_segments(result):
    """(id, label, isthing, area) of each segment."""
    return [(s["id"], s["label"], s["isthing"], s["area"]) for s in result["segments_info"]]


def test_small_segments_are_dropped_and_their_pixels_reassigned():
    post = PostProcessPanoptic([True, True, False])
    [result] = post(small_segment_outputs(), torch.tensor([[6, 8]]), torch.tensor([[6, 8]]))
    # Ids follow the surviving queries in order: Q0 -> 1, Q2 -> 2, Q6 -> 3.
    query_to_id = {0: 1, 2: 2, 6: 3}
    expected = torch.tensor([[query_to_id[q] for q in row] for row in SMALL_FINAL])
    assert torch.equal(result["segments"], expected)
    assert _as_segments(result) == [(1, 0, True, 30), (2, 1, True, 6), (3, 2, False, 12)]


def test_small_segments_are_judged_at_the_output_size_when_upscaling():
    """At twice the size Q1's block has 16 pixels and stays; Q3's pixel has 4 and still goes."""
    post = PostProcessPanoptic([True, True, False])
    [result] = post(small_segment_outputs(), torch.tensor([[6, 8]]), torch.tensor([[12, 16]]))
    query_to_id = {0: 1, 1: 2, 2: 3, 6: 4}
    base = torch.tensor([[query_to_id[q] for q in row] for row in SMALL_FINAL])
    base[0:2, 0:2] = query_to_id[1]
    expected = base.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(result["segments"], expected)
    assert _as_segments(result) == [(1, 0, True, 104), (2, 1, True, 16), (3, 1, True, 24), (4, 2, False, 48)]


def test_small_segments_are_judged_at_the_output_size_when_downscaling():
    """The same prediction at twice the resolution, halved on output: Q1's block has 16 pixels at the
    model's size but 4 in the output, so it goes, exactly as at the model's own size."""
    outputs = small_segment_outputs()
    outputs["pred_masks"] = outputs["pred_masks"].repeat_interleave(2, -2).repeat_interleave(2, -1)
    post = PostProcessPanoptic([True, True, False])
    [result] = post(outputs, torch.tensor([[12, 16]]), torch.tensor([[6, 8]]))
    query_to_id = {0: 1, 2: 2, 6: 3}
    expected = torch.tensor([[query_to_id[q] for q in row] for row in SMALL_FINAL])
    assert torch.equal(result["segments"], expected)
    assert _as_segments(result) == [(1, 0, True, 30), (2, 1, True, 6), (3, 2, False, 12)]


def test_a_padded_batch_gives_each_image_the_segments_it_gets_alone():
    """An image's mask logits padded (edge-replicated, as a model's would be near the border) in a batch
    with a larger image: the result is the image's own, for both images."""
    is_thing = [True, True, True, False, False]
    sizes = [(24, 40), (40, 28)]  # landscape padded at the bottom, portrait on the right
    origs = [(37, 61), (30, 21)]
    alone = [random_outputs(seed, batch=1, hw=(h // 4, w // 4)) for seed, (h, w) in zip((7, 8), sizes)]
    expected = [
        PostProcessPanoptic(is_thing)(out, torch.tensor([size]), torch.tensor([orig]))[0]
        for out, size, orig in zip(alone, sizes, origs)
    ]
    padded = []
    for out, (h, w) in zip(alone, sizes):
        pad = (0, 40 // 4 - w // 4, 0, 40 // 4 - h // 4)
        padded.append(F.pad(out["pred_masks"], pad, mode="replicate"))
    batch = {
        "pred_logits": torch.cat([out["pred_logits"] for out in alone]),
        "pred_masks": torch.cat(padded),
    }
    results = PostProcessPanoptic(is_thing)(batch, torch.tensor(sizes), torch.tensor(origs))
    for result, own in zip(results, expected):
        assert len(own["segments_info"]) >= 2, "a test case with several segments"
        assert torch.equal(result["segments"], own["segments"])
        assert result["segments_info"] == own["segments_info"]


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


def test_an_image_whose_png_cannot_be_read_counts_its_segments_as_missed():
    """Validation must not crash (nor leave other processes waiting) on a missing ground-truth PNG."""
    from detrkit.data.images import ImageLoadError
    from detrkit.evaluation.pq import PanopticEvaluator

    segments = [
        {"id": 1, "category_id": 1, "iscrowd": 0},
        {"id": 2, "category_id": 1, "iscrowd": 0},
        {"id": 3, "category_id": 2, "iscrowd": 1},  # crowd: ignored, never a miss
        {"id": 4, "category_id": 2},  # no iscrowd key: not a crowd
    ]

    def ground_truth(image_id):
        error = ImageLoadError(f"{image_id}.png", "no such file")
        error.segments_info = segments
        raise error

    evaluator = PanopticEvaluator({1: True, 2: False}, ground_truth, [1, 2])
    evaluator.add_unreadable([7])
    assert evaluator.num_images == 1
    tp, fp, fn, _ = evaluator.stats[evaluator._row[1]]
    assert (tp, fp, fn) == (0, 0, 2)
    assert evaluator.stats[evaluator._row[2]].tolist() == [0, 0, 1, 0]


def test_pq_leaves_out_segments_absent_from_the_png():
    """A ``segments_info`` entry with no pixel cannot be found: perfect predictions still score 1."""
    gt = strip([(0, 30, 1), (30, 99, 2), (99, 100, 3)])  # segment 3: a single pixel, still a segment
    segments = [
        {"id": 1, "category_id": 4}, {"id": 2, "category_id": 100},
        {"id": 3, "category_id": 1}, {"id": 9, "category_id": 4},
    ]  # fmt: skip
    stats = image_pq_stats(gt, segments, gt, segments[:3])
    assert stats[4].tolist() == pytest.approx([1, 0, 0, 1.0])
    assert stats[1].tolist() == pytest.approx([1, 0, 0, 1.0])
    assert summarize_pq(stats, ISTHING)["panoptic/PQ"] == pytest.approx(1.0)
