"""maskrcnn: the Mask R-CNN family (Mask R-CNN, Cascade Mask R-CNN, Keypoint R-CNN) in pure PyTorch."""

__version__ = "0.1.0"

__all__ = ["PRESETS", "Config", "build_model", "get_config", "__version__"]


def __getattr__(name: str):
    # imported on first use, so that `import maskrcnn.cli` does not start torch (and its OpenMP
    # runtime) before the command line has set the runtime's environment (maskrcnn/_openmp.py)
    if name in ("PRESETS", "Config", "get_config"):
        from maskrcnn import config

        return getattr(config, name)
    if name == "build_model":
        from maskrcnn.modeling.build import build_model

        return build_model
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
