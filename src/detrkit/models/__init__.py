"""The model: DETR, its backbone and transformer, the matcher, the criterion and the post-processors."""
