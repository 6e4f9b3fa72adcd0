"""Evaluation: COCO AP and panoptic quality, and the evaluation loop."""
