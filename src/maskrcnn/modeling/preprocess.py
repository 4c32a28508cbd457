"""Inside the model, before and after the network: check the inputs, convert them to what the
weights expect, resize, pad into one batch; map the detections back onto the original images.

Users always pass RGB images, ``(3, H, W)`` float in [0, 1] or uint8 in [0, 255] (torchvision's
convention), of any sizes. The preset decides what the network sees: torchvision's weights want
RGB in 0-1 normalised by ImageNet mean/std, detectron2's (MSRA) weights BGR in 0-255 minus a mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn._checks import Checks
from maskrcnn._seeding import derive_seed
from maskrcnn.config.choices import RESIZE_STYLES
from maskrcnn.structures.masks import PolygonMasks, paste_masks_in_image



def resized_size(h: int, w: int, min_size: int, max_size: int, style: str) -> tuple[int, int, float]:
    """Output ``(h, w)`` and scale of "shortest side to ``min_size``, longest at most ``max_size``".

    torchvision floors ``size * scale`` (``interpolate(recompute_scale_factor=True)``); detectron2's
    ResizeShortestEdge rounds to nearest.
    """
    scale = min(min_size / min(h, w), max_size / max(h, w))
    # a side is at least 1 px: an image of extreme aspect ratio (4000x10) would otherwise get a 0-px side
    if style == "torchvision":
        return max(1, int(math.floor(h * scale))), max(1, int(math.floor(w * scale))), scale
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)), scale


def _scale_xy(keypoints: Tensor, sx: float, sy: float) -> Tensor:
    """``(..., K, 3)`` keypoints with x, y scaled (visibility kept)."""
    factor = torch.tensor([sx, sy, 1.0], dtype=keypoints.dtype, device=keypoints.device)
    return keypoints * factor


def _degenerate_message(i: int, boxes: Tensor, degenerate: Tensor) -> str:
    bad = degenerate.nonzero()[:, 0]
    return (f"targets[{i}]['boxes'] rows {bad[:5].tolist()} have zero or negative width/height "
            f"(e.g. {boxes[bad[0]].tolist()}); drop degenerate boxes before training")


FLOAT_SLACK = 0.5  # how far outside 0-1 a float image may stray before it is taken for another scale


def _range_message(i: int, img: Tensor):
    def message() -> str:
        lo, hi = (float(v) for v in img.aminmax())
        return (f"images[{i}] is float with values from {lo:g} to {hi:g}: float images must be in 0-1 (divide "
                "0-255 pixels by 255, or pass uint8; the model normalises them itself)")
    return message


class ImagePreprocessor(nn.Module):
    """Normalise, resize and batch images (and their targets); rescale detections afterwards.

    Args:
        channel_order: ``"RGB"`` or ``"BGR"``: what the network's first conv expects.
        pixel_scale: 1.0 (inputs in 0-1) or 255.0 (0-255), before ``mean``/``std`` (in that scale).
        min_size_train: shortest-side sizes; one is drawn per image in training (multi-scale).
        max_size_train, min_size_test, max_size_test: as detectron2's INPUT.* (800 / 1333).
        size_divisibility: the batch is zero-padded (after normalisation) to a multiple of this.
        resize_style: ``"torchvision"`` (floor, bilinear) or ``"detectron2"`` (round, antialiased).
        resize: set False if the data pipeline already resized the images.
    """

    def __init__(self, channel_order: str = "RGB", pixel_scale: float = 1.0,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 min_size_train: Sequence[int] = (800,), max_size_train: int = 1333, min_size_test: int = 800,
                 max_size_test: int = 1333, size_divisibility: int = 32, resize_style: str = "torchvision",
                 resize: bool = True) -> None:
        super().__init__()
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        if resize_style not in RESIZE_STYLES:
            raise ValueError(f"resize_style must be one of {RESIZE_STYLES}, got {resize_style!r}")
        self.channel_order = channel_order
        self.pixel_scale = float(pixel_scale)
        # kept as Python floats and made into tensors of the input's dtype: a float32 buffer would
        # round 0.485 before a float64 model ever saw it
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.min_size_train = tuple(min_size_train)
        self.max_size_train = max_size_train
        self.min_size_test = min_size_test
        self.max_size_test = max_size_test
        self.size_divisibility = size_divisibility
        self.resize_style = resize_style
        self.resize = resize

    # -- input checks ---------------------------------------------------------------------------
    @staticmethod
    def check_images(images: object, checks: Checks | None = None) -> list[Tensor]:
        """Structure checked now; values (NaN/inf) with ``checks`` (read back once per batch) or now."""
        if isinstance(images, Tensor):
            if images.dim() == 3:
                images = [images]
            elif images.dim() == 4:
                images = list(images.unbind(0))
            else:
                raise ValueError(f"images must be (3, H, W) tensors or an (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError(f"images must be a non-empty list of (3, H, W) tensors, got {type(images).__name__}")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor):
                raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(img).__name__}")
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"images[{i}] must have shape (3, H, W) (RGB, channels first), got {tuple(img.shape)}")
            if img.shape[1] == 0 or img.shape[2] == 0:
                raise ValueError(f"images[{i}] is empty: shape {tuple(img.shape)}")
            if img.dtype != torch.uint8 and not img.is_floating_point():
                raise TypeError(f"images[{i}] must be float (0-1) or uint8 (0-255), got {img.dtype}")
        own = Checks() if checks is None else checks
        for i, img in enumerate(images):
            if img.is_floating_point():
                own.add(~torch.isfinite(img), f"images[{i}] contains NaN or inf")
                # 0-255 floats (detectron2's habit, OpenCV conversions) or already-normalised pixels would
                # give a confident wrong answer (no detections); the slack admits resampling overshoot
                lo, hi = img.aminmax()
                own.add((lo < -FLOAT_SLACK) | (hi > 1 + FLOAT_SLACK), _range_message(i, img))
        if checks is None:
            own.run()
        return list(images)

    @staticmethod
    def check_targets(targets: object, images: Sequence[Tensor], num_classes: int, need_masks: bool,
                      num_keypoints: int = 0, checks: Checks | None = None) -> list[dict]:
        """Structure checked now; values (finite, non-degenerate, label range) gathered in ``checks`` and
        read back once for the whole batch (each read waits for the device), or now without one."""
        own = Checks() if checks is None else checks
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            raise ValueError(f"targets must be a list with one dict per image ({len(images)}), got "
                             f"{type(targets).__name__}{'' if not hasattr(targets, '__len__') else f' of {len(targets)}'}")
        out = []
        for i, (t, img) in enumerate(zip(targets, images)):
            if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
                raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
            boxes, labels = t["boxes"], t["labels"]
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(f"targets[{i}]['boxes'] must be a float (G, 4) tensor, got "
                                 f"{getattr(boxes, 'shape', type(boxes).__name__)}")
            if not isinstance(labels, Tensor) or labels.shape != (boxes.shape[0],) or labels.is_floating_point():
                raise ValueError(f"targets[{i}]['labels'] must be an integer ({boxes.shape[0]},) tensor")
            own.add(~torch.isfinite(boxes), f"targets[{i}]['boxes'] contains NaN or inf")
            degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            own.add(degenerate, lambda i=i, boxes=boxes, degenerate=degenerate: _degenerate_message(i, boxes, degenerate))
            crowd = t.get("crowd_boxes")
            if crowd is not None:
                if (not isinstance(crowd, Tensor) or crowd.dim() != 2 or crowd.shape[1] != 4
                        or not crowd.is_floating_point()):
                    raise ValueError(f"targets[{i}]['crowd_boxes'] must be a finite float (C, 4) tensor")
                own.add(~torch.isfinite(crowd), f"targets[{i}]['crowd_boxes'] must be a finite float (C, 4) tensor")
            own.add((labels < 1) | (labels > num_classes),
                    lambda i=i, labels=labels: f"targets[{i}]['labels'] must be in 1..{num_classes} (0 is background), "
                    f"got values in {int(labels.min())}..{int(labels.max())}")
            if need_masks:
                masks = t.get("masks")
                if masks is None:
                    raise ValueError(f"targets[{i}] needs 'masks' to train the mask head")
                if isinstance(masks, PolygonMasks):
                    if len(masks) != boxes.shape[0]:
                        raise ValueError(f"targets[{i}]['masks'] has {len(masks)} polygon instances for {boxes.shape[0]} boxes")
                elif isinstance(masks, Tensor):
                    if masks.dim() != 3 or masks.shape[0] != boxes.shape[0] or tuple(masks.shape[1:]) != tuple(img.shape[1:]):
                        raise ValueError(f"targets[{i}]['masks'] must be ({boxes.shape[0]}, {img.shape[1]}, {img.shape[2]}) "
                                         f"to match its boxes and image, got {tuple(masks.shape)}")
                else:
                    raise TypeError(f"targets[{i}]['masks'] must be a (G, H, W) tensor or PolygonMasks")
            if num_keypoints:
                kp = t.get("keypoints")
                want = (boxes.shape[0], num_keypoints, 3)
                if not isinstance(kp, Tensor) or tuple(kp.shape) != want or not kp.is_floating_point():
                    raise ValueError(f"targets[{i}] needs 'keypoints', a float {want} tensor (x, y, visibility) to "
                                     f"train the keypoint head, got {getattr(kp, 'shape', type(kp).__name__)}")
                own.add(~torch.isfinite(kp), f"targets[{i}]['keypoints'] contains NaN or inf")
            out.append(dict(t))
        if checks is None:
            own.run()
        return out

    # -- forward --------------------------------------------------------------------------------
    def _to_network(self, img: Tensor, dtype: torch.dtype) -> Tensor:
        x = img.to(dtype)
        x = x * (self.pixel_scale / 255.0) if img.dtype == torch.uint8 else x * self.pixel_scale
        if self.channel_order == "BGR":
            x = x.flip(0)
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).reshape(3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).reshape(3, 1, 1)
        return (x - mean) / std

    def _resize(self, x: Tensor, min_size: int, max_size: int) -> Tensor:
        h, w = x.shape[-2:]
        nh, nw, scale = resized_size(h, w, min_size, max_size, self.resize_style)
        if (nh, nw) == (h, w):
            return x
        torchvision = self.resize_style == "torchvision"
        if torchvision and min(h, w) * scale >= 1:
            return F.interpolate(x[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                                 align_corners=False)[0]
        # detectron2's resize, or a side that the scale would shrink under 1 px (kept at 1 px)
        return F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=not torchvision)[0]

    def forward(self, images: Sequence[Tensor], dtype: torch.dtype, targets: Sequence[dict] | None = None
                ) -> tuple[Tensor, list[tuple[int, int]], list[dict] | None]:
        """-> ``(batch (N, 3, H, W), per-image sizes inside the padding, resized targets)``."""
        resized, sizes, new_targets = [], [], []
        for i, img in enumerate(images):
            x = self._to_network(img, dtype)
            if self.resize:
                if self.training:
                    seed = targets[i].get("seed") if targets is not None else None
                    gen = torch.Generator().manual_seed(derive_seed(seed, 3)) if seed is not None else None
                    pick = int(torch.randint(len(self.min_size_train), (), generator=gen))
                    x = self._resize(x, self.min_size_train[pick], self.max_size_train)
                else:
                    x = self._resize(x, self.min_size_test, self.max_size_test)
            resized.append(x)
            sizes.append((x.shape[-2], x.shape[-1]))
            if targets is not None:
                new_targets.append(self._resize_target(targets[i], img.shape[-2:], x.shape[-2:]))
        return self.batch(resized), sizes, (new_targets if targets is not None else None)

    @staticmethod
    def _resize_target(t: dict, old: Sequence[int], new: Sequence[int]) -> dict:
        if tuple(old) == tuple(new):
            return t
        sy, sx = new[0] / old[0], new[1] / old[1]
        t = dict(t)
        for key in ("boxes", "crowd_boxes"):
            if key in t:
                t[key] = t[key] * torch.tensor([sx, sy, sx, sy], dtype=t[key].dtype, device=t[key].device)
        if "keypoints" in t:
            t["keypoints"] = _scale_xy(t["keypoints"], sx, sy)
        masks = t.get("masks")
        if isinstance(masks, PolygonMasks):
            t["masks"] = masks.scale(sx, sy)
        elif isinstance(masks, Tensor):
            t["masks"] = F.interpolate(masks[:, None].float(), size=tuple(new), mode="nearest")[:, 0].to(masks.dtype) \
                if masks.shape[0] else masks.new_zeros((0, *new))
        return t

    def batch(self, images: Sequence[Tensor]) -> Tensor:
        d = self.size_divisibility
        h = max(x.shape[-2] for x in images)
        w = max(x.shape[-1] for x in images)
        if d > 1:
            h, w = int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)
        out = images[0].new_zeros((len(images), 3, h, w))
        for i, x in enumerate(images):
            out[i, :, : x.shape[-2], : x.shape[-1]].copy_(x)
        return out

    @staticmethod
    def postprocess(dets: list[dict[str, Tensor]], sizes: Sequence[tuple[int, int]],
                    original_sizes: Sequence[tuple[int, int]], paste_style: str, mask_threshold: float | None
                    ) -> list[dict[str, Tensor]]:
        """Boxes and keypoints to original image coordinates; ``mask_probs`` pasted into full-size
        ``masks (D, 1, H, W)``."""
        out = []
        for d, (h, w), (oh, ow) in zip(dets, sizes, original_sizes):
            r = dict(d)
            scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=d["boxes"].dtype, device=d["boxes"].device)
            r["boxes"] = d["boxes"] * scale
            if "keypoints" in r:
                r["keypoints"] = _scale_xy(r["keypoints"], ow / w, oh / h)
            if "mask_probs" in r:
                probs = r.pop("mask_probs")
                r["masks"] = paste_masks_in_image(probs, r["boxes"], (oh, ow), paste_style, mask_threshold)[:, None]
            out.append(r)
        return out
