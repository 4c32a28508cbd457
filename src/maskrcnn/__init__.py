"""maskrcnn: the Mask R-CNN family (Mask R-CNN, Cascade Mask R-CNN, Keypoint R-CNN) in pure PyTorch."""

__version__ = "0.1.0"
