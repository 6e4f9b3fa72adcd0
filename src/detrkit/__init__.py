"""detrkit: DETR (End-to-End Object Detection with Transformers) in PyTorch.

>>> import detrkit
>>> model = detrkit.build_model(detrkit.DetrConfig(num_classes=3))
>>> criterion = detrkit.build_criterion(model.config)
"""

from ._version import __version__
from .checkpoints.io import CheckpointError, config_of, convert_checkpoint, load_model, save_model
from .inference.detector import Detections, Detector
from .models.config import DetrConfig
from .models.criterion import SetCriterion, build_criterion
from .models.detr import Detr, build_model
from .models.matcher import HungarianMatcher
from .models.postprocess import PostProcess

__all__ = [
    "__version__",
    "CheckpointError",
    "Detections",
    "Detector",
    "Detr",
    "DetrConfig",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "build_criterion",
    "build_model",
    "config_of",
    "convert_checkpoint",
    "load_model",
    "save_model",
]
