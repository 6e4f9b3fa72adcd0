"""Post-processing on a model that has learned something: boxes are found where the shapes are.

A small panoptic DETR (things + the stuff classes sky and ground, mask head included) is trained
for ~20 s on two synthetic images and then asked about those same images through every
post-processing mode of the `Detector`. Generalisation to unseen images is what the convergence
benchmark measures (bench/convergence.py); here the point is that detection, instance, panoptic
and semantic outputs carry the trained detections correctly into image coordinates.
"""

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import detrkit
from conftest import fit_batch, tiny_config
from detrkit.data import CocoPanoptic, SynthConfig, TransformConfig, collate, eval_transforms, make_synthetic

SCALE = 0.2
STUFF = (100, 101)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = make_synthetic(SynthConfig(images=2, seed=3, empty_fraction=0.0, max_objects=3))
    dataset = CocoPanoptic(
        None,
        data["panoptic"],
        None,
        eval_transforms(TransformConfig.scaled(SCALE)),
        images=data["images"],
        pngs=data["panoptic_pngs"],
    )
    categories = dataset.category_map
    assert dataset.stuff_ids == STUFF
    config = tiny_config(
        masks=True,
        num_classes=len(categories.category_ids),
        category_ids=categories.category_ids,
        class_names=categories.names,
        stuff_ids=dataset.stuff_ids,
        frozen_bn=False,  # from scratch: BatchNorm must learn its statistics
        last_stage=3,
        num_queries=10,
        enc_layers=1,
        dec_layers=2,
        extra={"image_scale": SCALE},
    )
    model = detrkit.build_model(config)
    losses = fit_batch(model, collate([dataset[i] for i in range(len(dataset))]), 150, clip=1.0)
    assert losses["loss_bbox"] < 0.1 and losses["loss_ce"] < 0.1, losses
    return detrkit.Detector(model, device="cpu"), data


def _ground_truth(data, file_name):
    image_id = next(i["id"] for i in data["instances"]["images"] if i["file_name"] == file_name)
    annotations = [a for a in data["instances"]["annotations"] if a["image_id"] == image_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)])
    return boxes, [a["category_id"] for a in annotations]


def test_boxes_are_found_where_the_shapes_are(trained):
    detector, data = trained
    for file_name, image in data["images"].items():
        gt_boxes, gt_labels = _ground_truth(data, file_name)
        [result] = detector.predict(image, threshold=0.5, segmentation="instance")
        things = torch.tensor([label not in STUFF for label in result.labels.tolist()])
        boxes, labels = result.boxes[things], result.labels[things].tolist()
        assert sorted(labels) == sorted(gt_labels), (file_name, labels, gt_labels)
        iou = box_iou(gt_boxes, boxes)
        for k, category in enumerate(gt_labels):
            same_class = torch.tensor([label == category for label in labels])
            assert iou[k][same_class].max() > 0.7, (file_name, k, iou)
        # Instance masks come with every detection, at the image's own size.
        assert result.masks.shape == (len(result), image.height, image.width)


def test_panoptic_segments_are_the_detected_shapes_and_stuff(trained):
    detector, data = trained
    for file_name, image in data["images"].items():
        _, gt_labels = _ground_truth(data, file_name)
        [result] = detector.predict(image)  # panoptic: the model knows its stuff classes
        info = result.segments_info
        assert result.segments.shape == (image.height, image.width)
        assert sorted(s["category_id"] for s in info if s["isthing"]) == sorted(gt_labels)
        assert sorted(s["category_id"] for s in info if not s["isthing"]) == list(STUFF)
        ids = np.unique(result.segments.numpy())
        assert set(ids.tolist()) - {0} == {s["id"] for s in info}
        [semantic] = detector.predict(image, segmentation="semantic")
        assert set(semantic.semantic.unique().tolist()) <= set(detector.model.config.category_ids)
