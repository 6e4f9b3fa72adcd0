"""The criterion against transformers' DETR loss, and its own invariants."""

import pytest
import torch

import detrkit
from conftest import require, tiny_config
from detrkit.models.criterion import SetCriterion, build_criterion


def random_outputs(batch=3, queries=7, classes=4, layers=3, mask_size=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one():
        out = {
            "pred_logits": torch.randn(batch, queries, classes + 1, generator=g, requires_grad=False),
            "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.1,
        }
        return out

    outputs = one()
    outputs["aux_outputs"] = [one() for _ in range(layers - 1)]
    if mask_size is not None:
        outputs["pred_masks"] = torch.randn(batch, queries, *mask_size, generator=g)
    return outputs


def random_targets(counts=(2, 0, 3), classes=4, image_sizes=((48, 64), (40, 64), (48, 56)), seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n, (h, w) in zip(counts, image_sizes):
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append(
            {
                "labels": torch.randint(0, classes, (n,), generator=g),
                "boxes": torch.cat([cxcy, wh], 1),
                "masks": torch.rand(n, h, w, generator=g) > 0.5,
            }
        )
    return targets


def to_hf(outputs, targets):
    hf_out = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    if "pred_masks" in outputs:
        hf_out["pred_masks"] = outputs["pred_masks"]
    hf_out["auxiliary_outputs"] = [
        {"logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]} for a in outputs["aux_outputs"]
    ]
    hf_targets = [
        {"class_labels": t["labels"], "boxes": t["boxes"], "masks": t["masks"].float()} for t in targets
    ]
    return hf_out, hf_targets


@pytest.mark.parametrize("masks", [False, True], ids=["detection", "segmentation"])
def test_losses_match_transformers(masks):
    config = tiny_config(masks=masks)
    outputs = random_outputs(mask_size=(12, 16) if masks else None)
    targets = random_targets()
    ours = build_criterion(config)(outputs, targets)

    # transformers' own DETR loss (its module has moved between releases): only this test needs it.
    hf_loss = require("transformers.loss.loss_for_object_detection")
    matcher = hf_loss.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    names = ["labels", "boxes", "cardinality"] + (["masks"] if masks else [])
    theirs = hf_loss.ImageLoss(matcher, num_classes=4, eos_coef=0.1, losses=names)(*to_hf(outputs, targets))

    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, atol=1e-5), (key, ours[key], value)
    # class_error is the original's logging-only top-1 error of the matched queries.
    assert "class_error" in ours and "class_error_0" not in ours


def test_weight_dict_and_total_loss():
    config = tiny_config(masks=True)
    criterion = build_criterion(config)
    assert criterion.weight_dict["loss_ce"] == 1
    assert criterion.weight_dict["loss_bbox"] == 5
    assert criterion.weight_dict["loss_giou"] == 2
    assert criterion.weight_dict["loss_mask"] == 1 and criterion.weight_dict["loss_dice"] == 1
    for i in range(config.dec_layers - 1):
        assert {f"loss_ce_{i}", f"loss_bbox_{i}", f"loss_giou_{i}"} <= set(criterion.weight_dict)
    assert "loss_mask_0" not in criterion.weight_dict
    losses = criterion(random_outputs(mask_size=(12, 16)), random_targets())
    assert {"loss_mask", "loss_dice", "loss_ce_1", "loss_giou_1"} <= set(losses)
    assert "loss_mask_0" not in losses


def test_no_objects_anywhere_gives_finite_losses_and_gradients():
    model = detrkit.build_model(tiny_config(masks=True)).train()
    criterion = build_criterion(model.config)
    images = torch.randn(2, 3, 64, 64)
    outputs = model(images)
    empty = [
        {
            "labels": torch.zeros(0, dtype=torch.long),
            "boxes": torch.zeros(0, 4),
            "masks": torch.zeros(0, 64, 64, dtype=torch.bool),
        }
    ] * 2
    losses = criterion(outputs, empty)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.class_embed.weight.grad is not None and torch.isfinite(model.class_embed.weight.grad).all()
    assert losses["loss_bbox"] == 0 and losses["class_error"] == 100


def test_perfect_predictions_have_zero_box_loss():
    targets = random_targets(counts=(2, 1, 3))
    outputs = random_outputs(layers=1)
    for i, t in enumerate(targets):
        outputs["pred_boxes"][i, : len(t["boxes"])] = t["boxes"]
        outputs["pred_logits"][i, : len(t["labels"])] = -10.0
        outputs["pred_logits"][i, torch.arange(len(t["labels"])), t["labels"]] = 10.0
    losses = build_criterion(tiny_config(aux_loss=False))(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class_error"].item() == 0


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"labels": torch.tensor([4]), "boxes": torch.rand(1, 4)}, r"labels must be in \[0, 3\]"),
        ({"labels": torch.tensor([0, 1]), "boxes": torch.rand(1, 4)}, "expected boxes Tensor"),
        ({"boxes": torch.rand(1, 4)}, "needs 'labels' and 'boxes'"),
    ],
)
def test_bad_targets_raise_clear_errors(bad, match):
    outputs = random_outputs(batch=1, layers=1)
    with pytest.raises(ValueError, match=match):
        build_criterion(tiny_config())(outputs, [bad])


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss"):
        SetCriterion(3, detrkit.HungarianMatcher(), {}, losses=("labels", "bogus"))
