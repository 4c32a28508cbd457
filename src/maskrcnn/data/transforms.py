"""Image decoding and the training augmentation (horizontal flip) applied to images and targets.

Resizing is the model's job (``ImagePreprocessor``: multi-scale shortest side in training), so a
sample leaves the pipeline at its original size and the same code path serves training and
inference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from maskrcnn.structures.masks import PolygonMasks


class BadImageError(ValueError):
    """An image file that is missing, unreadable, or not what the annotations say."""


class ImageTooLarge(BadImageError):
    """An image with more pixels than the caller allows (an upload to the server)."""


def load_image(path: str | Path | BinaryIO, expected_size: tuple[int, int] | None = None, name: str | None = None,
               max_pixels: int | None = None) -> Tensor:
    """``(3, H, W)`` uint8 RGB with the EXIF orientation applied (photos from phones are stored
    sideways and tagged; COCO annotations refer to the upright image). ``path`` may be an open
    binary file (an upload), called ``name`` in errors; ``max_pixels`` refuses larger images before
    their pixels are decoded."""
    src = Path(path) if isinstance(path, (str, os.PathLike)) else path
    label = name or str(src)
    try:
        with Image.open(src) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLarge(f"image {label} is {img.width}x{img.height} pixels, more than the "
                                    f"{max_pixels:,} allowed")
            arr = rgb_array(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise BadImageError(f"image not found: {label}") from None
    except Image.DecompressionBombError as e:  # PIL's own limit (~179 million pixels) before any decoding
        raise ImageTooLarge(f"image {label} is too large to decode: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadImageError):
            raise
        if isinstance(e, UnidentifiedImageError):  # PIL's message names the Python object of an upload
            raise BadImageError(f"cannot decode image {label}: not in an image format PIL reads") from None
        raise BadImageError(f"cannot decode image {label}: {type(e).__name__}: {e}") from None
    if expected_size is not None and arr.shape[:2] != tuple(expected_size):
        raise BadImageError(f"image {label} is {arr.shape[1]}x{arr.shape[0]} (WxH) but the annotations say "
                            f"{expected_size[1]}x{expected_size[0]}")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def rgb_array(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 from any PIL mode.

    PIL's ``convert("RGB")`` clips integer and float pixels to 0..255, which turns a 16-bit
    grayscale PNG (medical, microscopy, depth scans) into a nearly white image: those modes are
    scaled here instead. Every 8-bit mode (L, P, 1, LA, RGBA, CMYK, YCbCr, ...) is left to PIL.
    """
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, and I (what older PILs give 16-bit PNGs)
        # the 16-bit range whatever the container: pixels of one dataset stay comparable across images
        gray = np.round(np.asarray(img).astype(np.float64).clip(0, 65535) * (255 / 65535))
    elif img.mode == "F":
        gray = np.asarray(img).astype(np.float64)
        if not np.isfinite(gray).all():
            raise ValueError("float image has NaN or infinite pixels")
        # float images are written either in 0..1 or in 0..255; a maximum above 1 tells them apart
        gray = np.round(gray.clip(0, 1) * 255 if gray.max() <= 1.0 else gray.clip(0, 255))
    else:
        return np.array(img.convert("RGB"))
    return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)


def hflip(image: Tensor, target: dict, flip_map: Sequence[int] | None = None) -> tuple[Tensor, dict]:
    """Mirror an image and its target left-right.

    Boxes and crowd boxes ``x -> W - x`` (and swap x1/x2), polygons likewise, bitmaps flipped;
    keypoints ``(G, K, 3)`` mirrored and reordered by ``flip_map`` (left eye <-> right eye ...).

    Keypoints also go ``x -> W - x``, the rule of both detectron2 and torchvision; what differs is
    the value it applies to (``model.keypoint_head.pixel_convention``, added when the dataset is
    read): detectron2's half-pixel shift makes pixel index i land at W - i - 0.5, the centre of the
    mirrored pixel W - 1 - i, while torchvision's unshifted index lands at W - i.
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
        kp[kp[..., 2] == 0] = 0  # COCO's unlabelled (0, 0, 0), which both libraries restore after a flip
        out["keypoints"] = kp
    return image.flip(-1), out
