"""Training-only convergence aids (detrkit.aids): Group DETR's grouped decoding, matching and losses
equal running each group on its own, and a model trained with an aid is a plain DETR in every
format (no aid parameter in the saved weights; transformers loads it with the same outputs)."""

import pytest
import torch

import detrkit
from conftest import padded_batch, require
from detrkit.aids import GroupDetr
from detrkit.checkpoints import save_model, torch_load_safe
from detrkit.convert import detrkit_to_original
from detrkit.criterion import build_criterion
from detrkit.data import SynthConfig, write_synthetic
from detrkit.errors import ConfigError
from detrkit.matcher import HungarianMatcher
from detrkit.train_config import TrainConfig, build_config
from detrkit.trainer import BEST, LAST, Trainer

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
    assert build_config("cpu-tiny").query_groups > 1
    for masks in ({"model.masks": True}, {"panoptic": True}):
        assert build_config("cpu-tiny", overrides={**masks, "model.last_stage": 3}).query_groups == 1
        with pytest.raises(ConfigError, match="query_groups=2"):
            build_config("cpu-tiny", overrides={**masks, "model.last_stage": 3, "query_groups": 2})
    with pytest.raises(ValueError, match="mask head"):
        GroupDetr(detrkit.build_model(**{**SMALL, "masks": True, "d_model": 64}), 2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("aidsdata")
    return write_synthetic(
        root, SynthConfig(images=8, seed=1, min_size=64, max_size=96), {"train": 8, "val": 4}
    )


def test_a_model_trained_with_query_groups_is_a_plain_detr_in_every_format(tmp_path, data_root):
    transformers = require("transformers")
    model_fields = {k: v for k, v in SMALL.items() if k != "num_classes"}
    config = TrainConfig(
        data=str(data_root), output_dir=str(tmp_path / "run"), model=model_fields, image_scale=0.12,
        epochs=2, batch_size=4, num_workers=0, seed=0, query_groups=3, lr=1e-3,
    )  # fmt: skip
    trainer = Trainer(config, log=lambda m: None)
    start = {k: v.clone() for k, v in trainer.aid.extra_queries.state_dict().items()}
    trainer.fit()
    saved = torch_load_safe(tmp_path / "run" / LAST)
    plain = detrkit.build_model(detrkit.DetrConfig.from_dict(saved["detrkit_config"]))
    assert saved["model"].keys() == plain.state_dict().keys()  # nothing of the aid in the model
    assert saved["aids"]["extra_queries.weight"].shape == (2 * Q, SMALL["d_model"])
    assert not torch.equal(saved["aids"]["extra_queries.weight"], start["weight"])  # the aid trained

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
        query_groups=2, lr=1e-3,
    )  # fmt: skip
    Trainer(TrainConfig(output_dir=str(tmp_path / "a"), epochs=2, **base), log=lambda m: None).fit()
    Trainer(TrainConfig(output_dir=str(tmp_path / "b"), epochs=1, **base), log=lambda m: None).fit()
    resumed = Trainer(
        TrainConfig(output_dir=str(tmp_path / "b"), **base), resume=True, overrides={"epochs": 2},
        log=lambda m: None,
    )  # fmt: skip
    resumed.fit()
    a, b = torch_load_safe(tmp_path / "a" / LAST), torch_load_safe(tmp_path / "b" / LAST)
    for key in ("model", "aids"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    with pytest.raises(ConfigError, match="query_groups"):
        Trainer(
            TrainConfig(output_dir=str(tmp_path / "b"), **base), resume=True, overrides={"query_groups": 3},
            log=lambda m: None,
        )  # fmt: skip
