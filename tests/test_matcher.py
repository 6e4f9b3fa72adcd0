import pytest
import torch

from detrkit import HungarianMatcher
from test_criterion import random_outputs, random_targets


def test_batched_equals_per_image():
    outputs = random_outputs(batch=3, queries=9, layers=1, seed=4)
    targets = random_targets(counts=(4, 0, 2), seed=5)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single = matcher({k: outputs[k][i : i + 1] for k in ("pred_logits", "pred_boxes")}, [target])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])


def test_empty_targets():
    outputs = random_outputs(batch=2, layers=1)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    for targets in ([empty, empty], [empty, random_targets(counts=(2,))[0]]):
        indices = HungarianMatcher()(outputs, targets)
        assert len(indices[0][0]) == 0 and len(indices[0][1]) == 0
        assert [len(i) for i, _ in indices] == [len(t["labels"]) for t in targets]


def test_permutation_invariance():
    outputs = random_outputs(batch=1, queries=8, layers=1, seed=7)
    target = random_targets(counts=(5,), seed=8)[0]
    matcher = HungarianMatcher()
    src, tgt = matcher(outputs, [target])[0]
    assignment = dict(zip(tgt.tolist(), src.tolist()))

    # Permuting the targets permutes the assignment the same way.
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = {k: v[perm] for k, v in target.items()}
    src_p, tgt_p = matcher(outputs, [permuted])[0]
    assert dict(zip(perm[tgt_p].tolist(), src_p.tolist())) == assignment

    # Permuting the queries permutes the chosen predictions.
    qperm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = {k: outputs[k][:, qperm] for k in ("pred_logits", "pred_boxes")}
    src_q, tgt_q = matcher(shuffled, [target])[0]
    assert dict(zip(tgt_q.tolist(), qperm[src_q].tolist())) == assignment


def test_matches_the_obvious_assignment():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.3, 0.3, 0.1]])
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_boxes": boxes[[2, 0, 1]][None]}
    src, tgt = HungarianMatcher()(outputs, [{"labels": torch.tensor([0, 1, 0]), "boxes": boxes}])[0]
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 2, 2: 0}


def test_non_finite_predictions_do_not_crash():
    outputs = random_outputs(batch=1, layers=1)
    outputs["pred_boxes"][0, 0] = float("nan")
    src, tgt = HungarianMatcher()(outputs, random_targets(counts=(3,)))[0]
    assert len(src) == 3 and 0 not in src.tolist()


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="all matcher costs are 0"):
        HungarianMatcher(0, 0, 0)
