"""maskrcnn: the Mask R-CNN family (Mask R-CNN, Cascade Mask R-CNN, Keypoint R-CNN) in pure PyTorch."""

__version__ = "0.1.0"

from maskrcnn.config import PRESETS, Config, get_config
from maskrcnn.modeling.build import build_model

__all__ = ["PRESETS", "Config", "build_model", "get_config", "__version__"]
