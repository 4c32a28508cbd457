"""Image decoding and the training augmentation (horizontal flip) applied to images and targets.

Resizing is the model's job (``ImagePreprocessor``: multi-scale shortest side in training), so a
sample leaves the pipeline at its original size and the same code path serves training and
inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from maskrcnn.structures.masks import PolygonMasks


class BadImageError(ValueError):
    """An image file that is missing, unreadable, or not what the annotations say."""


def load_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> Tensor:
    """``(3, H, W)`` uint8 RGB with the EXIF orientation applied (photos from phones are stored
    sideways and tagged; COCO annotations refer to the upright image)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            arr = np.array(img)
    except FileNotFoundError:
        raise BadImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None
    if expected_size is not None and arr.shape[:2] != tuple(expected_size):
        raise BadImageError(f"image {path} is {arr.shape[1]}x{arr.shape[0]} (WxH) but the annotations say "
                            f"{expected_size[1]}x{expected_size[0]}")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def hflip(image: Tensor, target: dict, flip_map: Sequence[int] | None = None) -> tuple[Tensor, dict]:
    """Mirror an image and its target left-right.

    Boxes and crowd boxes ``x -> W - x`` (and swap x1/x2), polygons likewise, bitmaps flipped;
    keypoints ``(G, K, 3)`` mirrored and reordered by ``flip_map`` (left eye <-> right eye ...).
    """
    w = image.shape[-1]
    out = dict(target)
    for key in ("boxes", "crowd_boxes"):
        if key in target:
            b = target[key]
            out[key] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    masks = target.get("masks")
    if isinstance(masks, PolygonMasks):
        out["masks"] = masks.flip(w)
    elif isinstance(masks, Tensor):
        out["masks"] = masks.flip(-1)
    if "keypoints" in target:
        kp = target["keypoints"].clone()
        kp[..., 0] = w - kp[..., 0]
        if flip_map is not None:
            kp = kp[:, list(flip_map)]
        out["keypoints"] = kp
    return image.flip(-1), out
