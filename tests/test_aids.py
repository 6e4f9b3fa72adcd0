"""Training-only convergence aids (detrkit.training.aids): Group DETR's grouped decoding, matching and losses
equal running each group on its own; denoising queries are noised as DN-DETR's, decoded apart from
the object queries and each other, and each is scored against its own object; a model trained with
the aids is a plain DETR in every format (no aid parameter in the saved weights; transformers loads
it with the same outputs)."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

import detrkit
from conftest import padded_batch, require
from detrkit.checkpoints.io import save_model, torch_load_safe
from detrkit.checkpoints.layouts import detrkit_to_original
from detrkit.errors import ConfigError
from detrkit.models.criterion import build_criterion
from detrkit.models.matcher import HungarianMatcher
from detrkit.models.transformer import DenoisingQueries
from detrkit.training.aids import TrainingAids
from detrkit.training.config import TrainConfig, build_config
from detrkit.training.run_dir import BEST, LAST
from detrkit.training.trainer import Trainer

Q = 5
SMALL = dict(
    backbone="resnet18",
    d_model=32,
    nheads=4,
    enc_layers=1,
    dec_layers=3,
    dim_feedforward=64,
    num_queries=Q,
    num_classes=3,
    dropout=0.0,
)


def _targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, 3, (n,), generator=g), "boxes": torch.cat([centre, size], 1)})
    return out


def _outputs(batch, queries, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one():
        return {
            "pred_logits": torch.randn(batch, queries, 4, generator=g),
            "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.2,
        }

    out = one()
    out["aux_outputs"] = [one() for _ in range(layers - 1)]
    return out


def _group(outputs, g):
    def cut(o):
        return {k: o[k][:, g * Q : (g + 1) * Q] for k in ("pred_logits", "pred_boxes")}

    return {**cut(outputs), "aux_outputs": [cut(a) for a in outputs["aux_outputs"]]}


def test_each_query_group_decodes_as_the_model_with_those_queries_alone():
    torch.manual_seed(0)
    model = detrkit.build_model(**SMALL).eval()
    images, mask = padded_batch()
    extra = torch.randn(2 * Q, SMALL["d_model"])
    with torch.no_grad():
        grouped = model(images, mask, extra_queries=extra)
        for g, queries in enumerate([model.query_embed.weight.clone(), extra[:Q], extra[Q:]]):
            alone = detrkit.build_model(**SMALL).eval()
            alone.load_state_dict({**model.state_dict(), "query_embed.weight": queries})
            reference = alone(images, mask)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(_group(grouped, g)[key], reference[key], atol=1e-5, rtol=1e-5)
            for ours, theirs in zip(_group(grouped, g)["aux_outputs"], reference["aux_outputs"], strict=True):
                torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_grouped_matching_is_one_to_one_within_each_group():
    matcher = HungarianMatcher()
    targets = _targets([0, 2, 7])  # 7 > Q: each group matches Q of them
    outputs = _outputs(3, 3 * Q)
    grouped = matcher(outputs, targets, groups=3)
    for image, (rows, cols) in enumerate(grouped):
        expected_rows, expected_cols = [], []
        for g in range(3):
            r, c = matcher(_group(outputs, g), targets)[image]
            expected_rows.append(r + g * Q)
            expected_cols.append(c)
        assert torch.equal(rows, torch.cat(expected_rows)) and torch.equal(cols, torch.cat(expected_cols))
    assert [len(r) for r, _ in grouped] == [0, 3 * 2, 3 * Q]


@pytest.mark.parametrize("with_norm", [False, True])
def test_group_losses_are_the_mean_of_each_group_on_its_own(with_norm):
    criterion = build_criterion(detrkit.DetrConfig(**SMALL))
    targets = _targets([1, 3, 7])
    outputs = _outputs(3, 3 * Q)
    norm = criterion.loss_norm([targets]) if with_norm else None
    grouped = criterion(outputs, targets, norm)
    alone = [criterion(_group(outputs, g), targets, norm) for g in range(3)]
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_1", "loss_giou_1"):
        expected = sum(a[key] for a in alone) / 3
        torch.testing.assert_close(grouped[key], expected, atol=1e-6, rtol=1e-5)
    # Logging: the cardinality of the model's own queries.
    torch.testing.assert_close(grouped["cardinality_error"], alone[0]["cardinality_error"])


def test_query_groups_refuse_masks_but_a_preset_with_masks_trains_without_them():
    with pytest.raises(ConfigError, match="query_groups=2"):
        TrainConfig(query_groups=2, model={"masks": True})
    with pytest.raises(
        ConfigError, match="denoising_groups=3: this training aid trains detection models only"
    ):
        TrainConfig(denoising_groups=3, panoptic=True)
    assert build_config("cpu-tiny").query_groups > 1
    for masks in ({"model.masks": True}, {"panoptic": True}):
        assert build_config("cpu-tiny", overrides={**masks, "model.last_stage": 3}).query_groups == 1
        with pytest.raises(ConfigError, match="query_groups=2"):
            build_config("cpu-tiny", overrides={**masks, "model.last_stage": 3, "query_groups": 2})
    with pytest.raises(ValueError, match="mask head"):
        TrainingAids(detrkit.build_model(**{**SMALL, "masks": True, "d_model": 64}), 2)


def test_denoising_queries_are_decoded_apart_from_the_object_queries_and_from_each_other():
    torch.manual_seed(0)
    model = detrkit.build_model(**SMALL).eval()
    images, mask = padded_batch()
    aid = TrainingAids(model, query_groups=2, denoising_groups=3)
    queries, _ = aid.denoising_queries(_targets([2, 1]))  # M = 2: the second image has an empty slot
    extra = aid.extra_queries.weight
    with torch.no_grad():
        joint = model(images, mask, extra_queries=extra, denoising=queries)
        plain = model(images, mask, extra_queries=extra)
        # The object queries never see the denoising queries: their decoding is DETR's own.
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(joint[key], plain[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            joint["aux_outputs"][0]["pred_boxes"], plain["aux_outputs"][0]["pred_boxes"], atol=1e-5, rtol=1e-5
        )
        # Each denoising group decodes alone as it does among the others.
        size = queries.content.shape[1] // 3
        for g in range(3):
            part = slice(g * size, (g + 1) * size)
            alone = DenoisingQueries(
                queries.content[:, part], queries.position[:, part], 1, queries.padding[:, part]
            )
            out = model(images, mask, denoising=alone)["denoising"]
            torch.testing.assert_close(
                out["pred_boxes"], joint["denoising"]["pred_boxes"][:, part], atol=1e-5, rtol=1e-5
            )
        # Empty slots are not attended to: what they hold changes no real query's output.
        changed = queries._replace(content=queries.content.masked_fill(queries.padding[..., None], 3.0))
        again = model(images, mask, extra_queries=extra, denoising=changed)["denoising"]
        real = ~queries.padding
        assert real.sum() == 3 * 3
        torch.testing.assert_close(
            again["pred_logits"][real], joint["denoising"]["pred_logits"][real], atol=1e-5, rtol=1e-5
        )
        # An image without objects has only empty slots: its outputs are unused, but must stay finite.
        empty, _ = aid.denoising_queries(_targets([1, 0]))
        assert empty.padding[1].all()
        assert torch.isfinite(model(images, mask, denoising=empty)["denoising"]["pred_boxes"]).all()


def test_denoising_noise_is_dn_detrs():
    torch.manual_seed(0)
    aid = TrainingAids(detrkit.build_model(**SMALL), denoising_groups=400, label_noise=0.2, box_noise=0.4)
    targets = _targets([3, 1])
    labels, boxes, valid = aid.noised_targets(targets)
    size = 3
    assert labels.shape == (2, 400 * size) and boxes.shape == (2, 400 * size, 4)
    truth_labels = torch.stack(
        [torch.cat([t["labels"], torch.full((size - len(t["labels"]),), 3)]) for t in targets]
    )
    truth_boxes = torch.stack(
        [torch.cat([t["boxes"], torch.zeros(size - len(t["boxes"]), 4)]) for t in targets]
    )
    truth_labels, truth_boxes = truth_labels.repeat(1, 400), truth_boxes.repeat(1, 400, 1)
    assert torch.equal(valid, truth_labels != 3)
    assert torch.equal(labels[~valid], truth_labels[~valid])  # empty slots stay "no object"
    # A label is redrawn with probability 0.2, uniformly over the 3 classes: it changes 2/15 of the time.
    changed = (labels[valid] != truth_labels[valid]).float().mean()
    assert abs(changed - 0.2 * 2 / 3) < 0.02 and labels[valid].max() < 3
    # Centres move by up to 0.4 * half the size, sizes by up to 40%, and both use their whole range.
    shift = (boxes[..., :2] - truth_boxes[..., :2]).abs()[valid] / (truth_boxes[..., 2:][valid] / 2)
    scale = (boxes[..., 2:] / truth_boxes[..., 2:].clamp(min=1e-9))[valid]
    assert shift.max() <= 0.4 + 1e-5 and shift.max() > 0.39
    assert (
        scale.min() >= 0.6 - 1e-5 and scale.max() <= 1.4 + 1e-5 and scale.min() < 0.61 and scale.max() > 1.39
    )
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_denoising_losses_score_each_copy_against_its_own_object():
    criterion = build_criterion(detrkit.DetrConfig(**SMALL))
    criterion.add_denoising_weights()
    targets = _targets([2, 0, 3])
    aid = TrainingAids(detrkit.build_model(**SMALL), denoising_groups=2)
    _, indices = aid.denoising_queries(targets)
    outputs = _outputs(3, 2 * 3)  # 2 copies of M = 3 slots per image, 3 decoder layers
    losses = criterion.denoising_losses({**outputs, "indices": indices, "groups": 2}, targets, num_boxes=5.0)
    layers = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs["aux_outputs"])]
    for suffix, out in layers:
        ce = l1 = giou = 0.0
        for b, t in enumerate(targets):  # copy g of target j is query g * M + j
            for g in range(2):
                for j in range(len(t["labels"])):
                    q = g * 3 + j
                    ce -= F.log_softmax(out["pred_logits"][b, q], -1)[t["labels"][j]]
                    l1 += (out["pred_boxes"][b, q] - t["boxes"][j]).abs().sum()
                    pair = [
                        box_convert(x[None], "cxcywh", "xyxy")
                        for x in (out["pred_boxes"][b, q], t["boxes"][j])
                    ]
                    giou += 1 - generalized_box_iou(*pair)[0, 0]
        torch.testing.assert_close(losses[f"loss_ce_dn{suffix}"], ce / 10)
        torch.testing.assert_close(losses[f"loss_bbox_dn{suffix}"], l1 / 10)
        torch.testing.assert_close(losses[f"loss_giou_dn{suffix}"], giou / 10)
    for matched, denoising in (
        ("loss_ce", "loss_ce_dn"),
        ("loss_bbox_1", "loss_bbox_dn_1"),
        ("loss_giou_0", "loss_giou_dn_0"),
    ):
        assert criterion.weight_dict[denoising] == criterion.weight_dict[matched]


def test_a_model_trained_with_the_aids_is_a_plain_detr_in_every_format(tmp_path, data_root):
    transformers = require("transformers")
    model_fields = {k: v for k, v in SMALL.items() if k != "num_classes"}
    config = TrainConfig(
        data=str(data_root), output_dir=str(tmp_path / "run"), model=model_fields, image_scale=0.12,
        epochs=2, batch_size=4, num_workers=0, seed=0, query_groups=3, denoising_groups=2, lr=1e-3,
    )  # fmt: skip
    trainer = Trainer(config, log=lambda m: None)
    start = {k: v.clone() for k, v in trainer.aid.aid_state_dict().items()}
    trainer.fit()
    saved = torch_load_safe(tmp_path / "run" / LAST)
    plain = detrkit.build_model(detrkit.DetrConfig.from_dict(saved["detrkit_config"]))
    assert saved["model"].keys() == plain.state_dict().keys()  # nothing of the aids in the model
    assert saved["aids"]["extra_queries.weight"].shape == (2 * Q, SMALL["d_model"])
    assert saved["aids"]["label_embed.weight"].shape == (4 + 1, SMALL["d_model"])  # 4 synthetic classes
    for key in ("extra_queries.weight", "label_embed.weight", "box_embed.layers.0.weight"):
        assert not torch.equal(saved["aids"][key], start[key]), key  # the aids trained

    model = detrkit.load_model(tmp_path / "run" / BEST).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        ours = model(images, mask)
    original = save_model(model, tmp_path / "original.pth", "original")
    assert torch_load_safe(original)["model"].keys() == detrkit_to_original(plain.state_dict()).keys()
    hf_dir = save_model(model, tmp_path / "hf", "hf")
    for reloaded in (detrkit.load_model(original), detrkit.load_model(hf_dir)):
        with torch.no_grad():
            again = reloaded.eval()(images, mask)
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(again[key], ours[key])
    hf = transformers.DetrForObjectDetection.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long())
    torch.testing.assert_close(theirs.logits, ours["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs.pred_boxes, ours["pred_boxes"], atol=1e-4, rtol=0)


def test_resume_restores_the_aid_and_refuses_to_change_it(tmp_path, data_root):
    model_fields = {k: v for k, v in SMALL.items() if k != "num_classes"}
    base = dict(
        data=str(data_root), model=model_fields, image_scale=0.12, batch_size=4, num_workers=0, seed=0,
        query_groups=2, denoising_groups=2, lr=1e-3,
    )  # fmt: skip
    Trainer(TrainConfig(output_dir=str(tmp_path / "a"), epochs=2, **base), log=lambda m: None).fit()
    Trainer(TrainConfig(output_dir=str(tmp_path / "b"), epochs=1, **base), log=lambda m: None).fit()
    resumed = Trainer(
        TrainConfig(output_dir=str(tmp_path / "b"), **base), resume=True, overrides={"epochs": 2},
        log=lambda m: None,
    )  # fmt: skip
    resumed.fit()
    a, b = torch_load_safe(tmp_path / "a" / LAST), torch_load_safe(tmp_path / "b" / LAST)
    assert "label_embed.weight" in a["aids"]
    for key in ("model", "aids"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for change in ({"query_groups": 3}, {"denoising_groups": 0}):
        with pytest.raises(ConfigError, match=next(iter(change))):
            Trainer(
                TrainConfig(output_dir=str(tmp_path / "b"), **base), resume=True, overrides=change,
                log=lambda m: None,
            )  # fmt: skip


def test_an_image_without_objects_denoises_as_if_nothing_were_masked():
    # Its denoising group is all padding: the guard lets the group attend to itself (older PyTorch
    # returns NaN for an all-masked row). With it, the outputs equal those of no padding at all; a
    # fully masked row in torch 2.x attends to nothing instead (zeros), and differs.
    torch.manual_seed(0)
    model = detrkit.build_model(detrkit.DetrConfig(**SMALL)).train()
    images, mask = padded_batch()
    content, position = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    padding = torch.tensor([[False, False], [True, True]])  # image 1 has no object: both slots empty
    runs = [
        model(images, mask, denoising=DenoisingQueries(content, position, groups=1, padding=p))
        for p in (padding, None)
    ]
    masked, unmasked = (r["denoising"]["pred_boxes"] for r in runs)
    assert torch.allclose(masked, unmasked, atol=1e-6)
    assert torch.isfinite(masked).all()


def test_noised_boxes_stay_inside_the_image():
    torch.manual_seed(0)
    aid = TrainingAids(detrkit.build_model(detrkit.DetrConfig(**SMALL)),
                       denoising_groups=50, box_noise=1.0)  # fmt: skip
    edges = torch.tensor([[0.02, 0.98, 0.04, 0.04], [0.99, 0.01, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    _, boxes, valid = aid.noised_targets([{"boxes": edges, "labels": torch.tensor([0, 1, 2])}])
    boxes = boxes[valid]
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert (boxes == 0.0).any() and (boxes == 1.0).any()  # the noise did push some past the edges


def test_denoising_losses_are_normalised_by_the_true_box_count_also_with_query_groups():
    # With G query groups the matched losses divide by G * boxes (each group matches every box);
    # the D denoising copies divide by D * boxes, whatever G is.
    torch.manual_seed(0)
    config = detrkit.DetrConfig(**{**SMALL, "num_queries": 3})
    criterion = build_criterion(config)
    targets = [
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]), "labels": torch.tensor([0, 2])}
    ]
    groups, copies = 2, 2
    outputs = {"pred_logits": torch.randn(1, 3 * groups, 4), "pred_boxes": torch.rand(1, 3 * groups, 4)}
    dn_boxes = torch.rand(1, 2 * copies, 4)
    outputs["denoising"] = {
        "pred_logits": torch.randn(1, 2 * copies, 4),
        "pred_boxes": dn_boxes,
        "indices": [(torch.arange(2 * copies), torch.arange(2).repeat(copies))],
        "groups": copies,
    }
    losses = criterion(outputs, targets)
    expected = (dn_boxes[0] - targets[0]["boxes"].repeat(copies, 1)).abs().sum() / (2 * copies)
    assert losses["loss_bbox_dn"] == pytest.approx(float(expected), rel=1e-6)


def test_the_per_step_schedule_counts_optimizer_steps_with_gradient_accumulation_and_max_steps(tmp_path):
    from conftest import tiny
    from detrkit.data import SynthConfig, write_synthetic

    root = write_synthetic(
        tmp_path / "d", SynthConfig(images=4, seed=1, min_size=64, max_size=96), {"train": 4, "val": 2}
    )
    for max_steps, expected in ((None, 0.5), (4, 0.25)):
        cfg = tiny(tmp_path, root, epochs=3, grad_accum=2, lr_schedule="linear", max_steps=max_steps,
                   output_dir=str(tmp_path / f"run{max_steps}"))  # fmt: skip
        trainer = Trainer(cfg, log=lambda m: None)
        trainer.state.step = 3
        # 4 batches an epoch, 2 per optimizer step: 2 steps an epoch, 6 in the run (or max_steps).
        assert trainer.lr_factor(0.0, batches=4)() == pytest.approx(expected)
