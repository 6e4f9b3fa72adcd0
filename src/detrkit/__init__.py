"""detrkit: DETR (End-to-End Object Detection with Transformers) in PyTorch.

>>> import detrkit
>>> model = detrkit.build_model(detrkit.DetrConfig(num_classes=3))
>>> criterion = detrkit.build_criterion(model.config)
"""

__version__ = "0.1.0"

from .checkpoints import CheckpointError, config_of, convert_checkpoint, load_model, save_model
from .config import DetrConfig
from .criterion import SetCriterion, build_criterion
from .detector import Detections, Detector
from .matcher import HungarianMatcher
from .model import Detr, build_model
from .postprocess import PostProcess

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
