"""The whole detector as one exportable graph: uint8 images in, final detections out.

``DeployableDetector(model)`` computes what ``model.eval()(images)`` computes, written so that
``torch.export`` can record it once for every batch size and image size:

- inputs: ``images (N, H, W, 3)`` uint8 RGB (images smaller than the tensor sit in its top-left
  corner) and ``image_sizes (N, 2)`` int64, each image's true (height, width);
- preprocessing in the graph: normalisation, each image resized by its own scale (shortest side to
  ``min_size_test``, longest at most ``max_size_test``, the model's resize style), zero padding to
  the batch's size rounded up to ``size_divisibility``;
- the per-image Python loops of the eager model become batched tensor code with no data-dependent
  Python control flow: proposals and detections are kept in fixed-width padded tensors with a
  validity mask, and NMS and RoIAlign are the custom ops of ``ops.py``;
- outputs, padded to the most detections of any image in the batch (``num_detections`` says how
  many of each image's rows are real): ``boxes (N, D, 4)`` in input-image pixels, ``scores (N, D)``,
  ``labels (N, D)`` (1..K), and, with the heads present, ``masks (N, D, H, W)`` pasted into the input
  frame (bool, or probabilities when the model's mask threshold is negative) or, with
  ``masks="raw"``, ``mask_probs (N, D, M, M)`` to paste with the boxes; ``keypoints (N, D, K, 3)``
  and ``keypoints_scores (N, D, K)``.

Greedy NMS depends on the order of equal scores, which runtimes break differently; the graph gives
every candidate its rank in the eager model's order (descending score, then position) as the NMS
score, so every runtime keeps the same boxes as the eager model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskrcnn.export import ops
from maskrcnn.modeling.detector import MaskRCNN
from maskrcnn.modeling.preprocess import ImagePreprocessor
from maskrcnn.modeling.poolers import MultiLevelRoIPooler, assign_boxes_to_levels
from maskrcnn.modeling.roi_heads.cascade import CascadeROIHeads
from maskrcnn.modeling.roi_heads.mask_head import mask_probabilities
from maskrcnn.structures.keypoints import decode_heatmaps, rounded_roi_size
from maskrcnn.structures.masks import paste_weights

MASK_OUTPUTS = ("pasted", "raw")


class UnsupportedExport(ValueError):
    """The model uses an option the exported graph does not implement."""


def _item(t: Tensor) -> int:
    """A tensor's value as an int the export records as a symbol (it is a shape in what follows)."""
    v = t.item()
    torch._check(v >= 0)
    return v  # type: ignore[return-value]


def _length(value: Tensor, limit: int) -> int:
    """``value`` (0-d, at most ``limit``) as a size the graph computes while it runs: the length of a
    ``nonzero``. OpenVINO takes a size it can bound by arithmetic on its inputs to be that bound."""
    return torch.nonzero(torch.arange(limit, device=value.device) < value).shape[0]


def _frame_limit(p: ImagePreprocessor) -> int:
    """The padded frame's largest side: no resized side exceeds ``max_size_test``."""
    d = max(p.size_divisibility, 1)
    return -(-p.max_size_test // d) * d


def _resized_sizes(sizes: Tensor, min_size: int, max_size: int, style: str) -> Tensor:
    """``resized_size`` of ``modeling/preprocess.py`` for a batch, in float64 as Python computes it."""
    hw = sizes.to(torch.float64)
    scale = torch.minimum(min_size / hw.min(dim=1).values, max_size / hw.max(dim=1).values)[:, None]
    out = hw * scale if style == "torchvision" else hw * scale + 0.5
    return out.floor().clamp(min=1).long()


def _bilinear_taps(in_len: Tensor, out_len: Tensor, frame: int) -> tuple[Tensor, Tensor]:
    """Source rows ``(N, frame, 2)`` and weights of ``interpolate(bilinear, align_corners=False)`` from
    ``in_len`` to ``out_len`` samples per image (PyTorch's float32 arithmetic); zero past ``out_len``."""
    ratio = (in_len.float() / out_len.float())[:, None]
    dst = torch.arange(frame, device=in_len.device, dtype=torch.float32)[None]
    src = (ratio * (dst + 0.5) - 0.5).clamp(min=0)
    last = (in_len - 1)[:, None]
    i0 = torch.minimum(src.long(), last)
    i1 = i0 + (i0 < last).long()
    lam1 = (src - i0.float()).clamp(0, 1)
    inside = (dst < out_len[:, None].float()).float()
    return torch.stack([i0, i1], -1), torch.stack([(1 - lam1) * inside, lam1 * inside], -1)


def _antialias_taps(in_len: Tensor, out_len: Tensor, frame: int) -> tuple[Tensor, Tensor]:
    """As ``_bilinear_taps`` for ``interpolate(bilinear, antialias=True)``: a triangle filter
    stretched by the downscaling factor, normalised over the source samples it covers."""
    scale = (in_len.double() / out_len.double())[:, None]
    support = scale.clamp(min=1.0)
    taps = _item((2 * support).floor().max()) + 2
    dst = torch.arange(frame, device=in_len.device, dtype=torch.float64)[None]
    centre = scale * (dst + 0.5)
    lo = (centre - support + 0.5).floor().clamp(min=0)
    hi = torch.minimum((centre + support + 0.5).floor(), in_len[:, None].double())
    j = torch.arange(taps, device=in_len.device, dtype=torch.float64)
    pos = lo[..., None] + j  # (N, frame, taps)
    w = (1 - ((pos - centre[..., None] + 0.5) / support[..., None]).abs()).clamp(min=0) * (pos < hi[..., None])
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    w = w * (dst < out_len[:, None].double())[..., None]
    idx = torch.minimum(pos.long(), (in_len - 1)[:, None, None])
    return idx, w.float()


def _resize_axis(x: Tensor, idx: Tensor, w: Tensor, dim: int) -> Tensor:
    """Resample ``x (N, C, H, W)`` along ``dim`` (2 or 3) with per-image taps ``(N, L, T)``."""
    n, c = x.shape[:2]
    length, taps = idx.shape[1], idx.shape[2]
    if dim == 3:
        x = x.transpose(2, 3)
    other = x.shape[3]
    rows = idx.reshape(n, 1, length * taps, 1).expand(n, c, length * taps, other)
    picked = x.gather(2, rows).reshape(n, c, length, taps, other)
    out = (picked * w[:, None, :, :, None]).sum(3)
    return out.transpose(2, 3) if dim == 3 else out


class _ExportPooler(nn.Module):
    """A ``MultiLevelRoIPooler`` that takes the batch's RoIs as one ``(R, 5)`` tensor (image, box)
    and pools with the ``maskrcnn::roi_align`` op, without data-dependent Python control flow. The
    RoI heads pass their ``boxes`` argument to the pooler untouched, so they accept it as it is."""

    def __init__(self, pooler: MultiLevelRoIPooler) -> None:
        super().__init__()
        if pooler.pooler_type != "ROIAlign":
            raise UnsupportedExport(f"export supports RoIAlign pooling, not {pooler.pooler_type} "
                                    "(model.*_head.pooler_type)")
        self.p = pooler

    def _align(self, feature: Tensor, rois: Tensor, stride: int) -> Tensor:
        p = self.p
        return ops.roi_align(feature, rois, p.output_size[0], p.output_size[1], 1.0 / stride, p.sampling_ratio,
                             p.aligned)

    def forward(self, features: Sequence[Tensor], rois: Tensor) -> Tensor:  # type: ignore[override]
        p = self.p
        if len(features) == 1:
            return self._align(features[0], rois, p.strides[0])
        levels = assign_boxes_to_levels(rois[:, 1:], p.min_level, p.max_level, p.canonical_scale,
                                        p.canonical_level, p.eps, p.log_eps)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + p.output_size)
        for lvl, (feature, stride) in enumerate(zip(features, p.strides)):
            idx = torch.nonzero(levels == lvl)[:, 0]
            out = out.index_put((idx,), self._align(feature, rois[idx], stride))
        return out


def _true_sizes(images: Tensor, image_sizes: Tensor) -> Tensor:
    """``image_sizes`` kept inside the tensor (the runtimes check them; the graph must not read outside)."""
    return torch.stack([image_sizes[:, 0].clamp(1, images.shape[1]), image_sizes[:, 1].clamp(1, images.shape[2])], 1)


def _image_index(n: int, per_image: int, like: Tensor) -> Tensor:
    """``(n * per_image,)`` image index of each row, in ``like``'s dtype (a RoI's first column)."""
    # not repeat_interleave: its ONNX translation fails on a symbolic count
    return torch.arange(n, device=like.device, dtype=like.dtype)[:, None].expand(n, per_image).reshape(-1)


def _clip(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clamp ``boxes (N, ..., 4)`` into each image's ``sizes (N, 2)`` (height, width)."""
    shape = (sizes.shape[0],) + (1,) * (boxes.dim() - 2)
    h = sizes[:, 0].to(boxes.dtype).reshape(shape)
    w = sizes[:, 1].to(boxes.dtype).reshape(shape)
    x1, y1, x2, y2 = boxes.clamp(min=0).unbind(-1)
    return torch.stack([torch.minimum(x1, w), torch.minimum(y1, h), torch.minimum(x2, w), torch.minimum(y2, h)], -1)


def _ranks(scores: Tensor, valid: Tensor) -> Tensor:
    """Per row, each valid entry's NMS score: ``width - position`` in descending-score order (ties by
    index, as the eager model's stable sort), so higher is better and no two are equal; -1 if invalid."""
    width = scores.shape[1]
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    positions = torch.arange(width, device=scores.device).expand_as(order)
    rank = torch.zeros_like(order).scatter(1, order, positions)
    return torch.where(valid, (width - rank).float(), torch.full_like(scores, -1.0, dtype=torch.float32))


def _top_per_image(image: Tensor, value: Tensor, num_images: int, k: int) -> tuple[Tensor, Tensor]:
    """For items of ``image (S,)`` with positive ``value (S,)``: per image the positions of the ``k``
    best, ``(N, k)``, and which of those exist (an image may have fewer)."""
    own = image[None, :] == torch.arange(num_images, device=image.device)[:, None]
    table = torch.where(own, value[None, :], torch.full_like(own, -1.0, dtype=value.dtype))
    table = torch.cat([table, table.new_full((num_images, k), -1.0)], dim=1)
    best, pos = table.topk(k, dim=1)
    return pos, best > 0


class DeployableDetector(nn.Module):
    """Exportable inference of a ``MaskRCNN`` (module docstring). Shares the model's weights.

    Args:
        model: the detector (any family: FPN or C4, cascade, masks, keypoints).
        masks: ``"pasted"`` (full-image masks) or ``"raw"`` (``mask_probs`` per detection).
    """

    def __init__(self, model: MaskRCNN, masks: str = "pasted") -> None:
        super().__init__()
        if masks not in MASK_OUTPUTS:
            raise UnsupportedExport(f"masks must be one of {MASK_OUTPUTS}, got {masks!r}")
        if model.preprocess.resize is False:
            raise UnsupportedExport("export needs the model's own resize (the ImagePreprocessor has resize=False)")
        self.model = model
        heads = copy.copy(model.roi_heads)  # shares the weights; only the poolers are replaced
        heads._modules = dict(heads._modules)
        for name in ("box_pooler", "mask_pooler", "keypoint_pooler"):
            if getattr(heads, name, None) is not None:
                setattr(heads, name, _ExportPooler(getattr(heads, name)))
        self.heads = heads
        self.masks = masks

    @property
    def output_names(self) -> list[str]:
        names = ["boxes", "scores", "labels", "num_detections"]
        if self.heads.mask_on:
            names.append("masks" if self.masks == "pasted" else "mask_probs")
        if self.heads.keypoint_head is not None:
            names += ["keypoints", "keypoints_scores"]
        return names

    # -- preprocessing ---------------------------------------------------------------------------
    def preprocess(self, images: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """``images`` and their true ``sizes`` -> normalised, resized, padded batch ``(N, 3, Hb, Wb)``
        and each image's size in it."""
        p = self.model.preprocess
        x = images.permute(0, 3, 1, 2).float() * (p.pixel_scale / 255.0)
        if p.channel_order == "BGR":
            x = x.flip(1)
        mean = torch.tensor(p.mean, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(p.std, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
        x = (x - mean) / std
        new = _resized_sizes(sizes, p.min_size_test, p.max_size_test, p.resize_style)
        d = max(p.size_divisibility, 1)
        frame = ((new.max(dim=0).values + d - 1) // d) * d
        limit = _frame_limit(p)
        hb, wb = _length(frame[0], limit), _length(frame[1], limit)
        taps = _bilinear_taps if p.resize_style == "torchvision" else _antialias_taps
        x = _resize_axis(x, *taps(sizes[:, 0], new[:, 0], hb), dim=2)
        x = _resize_axis(x, *taps(sizes[:, 1], new[:, 1], wb), dim=3)
        return x, new

    # -- RPN -----------------------------------------------------------------------------------
    def proposals(self, features: Sequence[Tensor], padded: tuple[int, int], sizes: Tensor) -> tuple[Tensor, Tensor]:
        """-> ``(N, P, 4)`` proposals in descending objectness and which exist, as ``RPN._proposals``."""
        rpn = self.model.rpn
        logits, deltas = rpn.head(features)
        anchors = rpn.anchor_generator(padded, [f.shape[-2:] for f in features], torch.float32, features[0].device)
        n = logits[0].shape[0]
        boxes, scores, levels = [], [], []
        for lvl, (a, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            k = torch.sym_min(rpn.pre_nms_topk[1], lg.shape[1])
            lg, idx = lg.float().topk(k, dim=1)
            dl = dl.float().gather(1, idx[..., None].expand(-1, -1, 4))
            boxes.append(rpn.box_coder.decode(dl.reshape(-1, 4), a[idx.reshape(-1)]).reshape(n, k, 4))
            scores.append(lg)
            levels.append(torch.full((k,), lvl, dtype=torch.long, device=lg.device))
        b, s, level = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels)
        valid = torch.isfinite(b).all(-1) & torch.isfinite(s)
        b = _clip(b, sizes)
        valid &= ((b[..., 2] - b[..., 0]) > rpn.min_size) & ((b[..., 3] - b[..., 1]) > rpn.min_size)
        if rpn.nms_on_probability or rpn.score_thresh > 0:
            prob = torch.sigmoid(s)
            valid &= prob >= rpn.score_thresh
            if rpn.nms_on_probability:
                s = prob
        rank = _ranks(s, valid)
        num_levels = len(features)
        per_level = torch.where(level[None, None, :] == torch.arange(num_levels, device=b.device)[None, :, None],
                                rank[:, None, :], torch.full_like(rank, -1.0)[:, None, :])
        post = rpn.post_nms_topk[1]
        keep = ops.nms(b, per_level, rpn.nms_thresh, 0.0, post)
        img, box = keep[:, 0], keep[:, 2]
        pos, exists = _top_per_image(img, rank[img, box], n, post)
        box = torch.cat([box, box.new_zeros(post)])[pos]
        return b.gather(1, box[..., None].expand(-1, -1, 4)), exists

    # -- detections ------------------------------------------------------------------------------
    def _box_predictions(self, features: Sequence[Tensor], proposals: Tensor, sizes: Tensor
                         ) -> tuple[Tensor, Tensor]:
        """-> per-class boxes ``(N, P, K + 1 or 1, 4)`` (clipped) and class probabilities ``(N, P, K + 1)``."""
        heads = self.heads
        n, p = proposals.shape[:2]
        image = _image_index(n, p, proposals)
        flat = proposals.reshape(-1, 4)
        rois = torch.cat([image[:, None], flat], 1)
        if isinstance(heads, CascadeROIHeads):
            probs = []
            for k in range(heads.num_stages):
                logits, deltas = heads._stage(k, features, rois)
                probs.append(torch.softmax(logits.float(), -1))
                coder = heads.stage_coders[k]
                if k + 1 < heads.num_stages:
                    refined = _clip(coder.decode(deltas.float()[:, -4:], rois[:, 1:]).reshape(n, p, 4), sizes)
                    rois = torch.cat([image[:, None], refined.reshape(-1, 4)], 1)
            scores = torch.stack(probs).mean(0)
        else:
            logits, deltas = heads.box_predictor(heads.box_features(features, rois))
            scores, coder = torch.softmax(logits.float(), -1), heads.box_coder
        boxes = coder.decode(deltas.float(), rois[:, 1:]).reshape(n, p, -1, 4)
        return _clip(boxes, sizes), scores.reshape(n, p, -1)

    def detections(self, features: Sequence[Tensor], proposals: Tensor, exists: Tensor, sizes: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> ``boxes (N, D, 4)``, ``scores``, ``labels``, ``num_detections (N,)`` as
        ``detections_from_predictions`` (D: the most detections of any image)."""
        heads = self.heads
        n, p = proposals.shape[:2]
        boxes, scores = self._box_predictions(features, proposals, sizes)
        k = scores.shape[2] - 1
        boxes = boxes.expand(-1, -1, k + 1, -1)[:, :, 1:]  # class-agnostic: the same box for every class
        scores = scores[:, :, 1:]
        cand = exists[..., None] & (scores > heads.score_thresh)
        if heads.min_size >= 0:
            cand &= ((boxes[..., 2] - boxes[..., 0]) >= heads.min_size) & ((boxes[..., 3] - boxes[..., 1]) >= heads.min_size)
        rank = _ranks(scores.reshape(n, p * k), cand.reshape(n, p * k)).reshape(n, p, k)
        per_class_boxes = boxes.permute(0, 2, 1, 3).reshape(n * k, p, 4)
        per_class_rank = rank.permute(0, 2, 1).reshape(n * k, 1, p)
        limit = heads.detections_per_image
        keep = ops.nms(per_class_boxes, per_class_rank, heads.nms_thresh, 0.0, limit)
        img, cls, roi = keep[:, 0] // k, keep[:, 0] % k, keep[:, 2]
        flat = roi * k + cls  # index into an image's (P * K) candidates
        pos, found = _top_per_image(img, rank.reshape(n, p * k)[img, flat], n, limit)
        flat = torch.cat([flat, flat.new_zeros(limit)])[pos]
        det_boxes = boxes.reshape(n, p * k, 4).gather(1, flat[..., None].expand(-1, -1, 4))
        det_scores = scores.reshape(n, p * k).gather(1, flat)
        labels = flat % k + 1
        if heads.drop_empty_detections:
            found &= (det_boxes[..., 2] > det_boxes[..., 0]) & (det_boxes[..., 3] > det_boxes[..., 1])
            slot = torch.arange(limit, device=found.device)
            order = torch.sort(torch.where(found, slot, slot + limit), dim=1).indices
            det_boxes = det_boxes.gather(1, order[..., None].expand(-1, -1, 4))
            det_scores, labels, found = det_scores.gather(1, order), labels.gather(1, order), found.gather(1, order)
        count = found.sum(1)
        d = _length(count.max(), limit)
        return det_boxes[:, :d], det_scores[:, :d], labels[:, :d], count

    # -- whole graph -----------------------------------------------------------------------------
    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        model, heads = self.model, self.heads
        original = _true_sizes(images, image_sizes)
        x, sizes = self.preprocess(images, original)
        if model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(model.dtype)
        features = model.backbone(x)
        padded = (x.shape[-2], x.shape[-1])
        proposals, exists = self.proposals([features[i] for i in model.rpn_levels], padded, sizes)
        roi_feats = [features[i] for i in model.roi_levels]
        boxes, scores, labels, count = self.detections(roi_feats, proposals, exists, sizes)
        n, d = boxes.shape[:2]
        image = _image_index(n, d, boxes)
        rois = torch.cat([image[:, None], boxes.reshape(-1, 4)], 1)
        ratio = (original.double() / sizes.double()).float()  # (N, 2): y, x
        scale = torch.stack([ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]], 1)[:, None, :]
        out = [boxes * scale, scores, labels, count]
        if heads.mask_on:
            probs = heads.mask_probs(roi_feats, rois, labels.reshape(-1))
            if self.masks == "raw":
                out.append(probs.reshape(n, d, *probs.shape[1:]))
            else:
                out.append(self._paste(probs, out[0].reshape(-1, 4), images.shape[1], images.shape[2]).reshape(
                    n, d, images.shape[1], images.shape[2]))
        if heads.keypoint_head is not None:
            logits = heads.keypoint_head(heads.keypoint_pooler(roi_feats, rois))
            kb = rois[:, 1:]
            one = kb.new_ones(1)  # the maximum of no boxes is 1 px
            wc, hc = rounded_roi_size(kb)
            frame = _frame_limit(self.model.preprocess)  # the boxes lie inside the padded frame
            max_w, max_h = _length(torch.cat([wc, one]).max(), frame), _length(torch.cat([hc, one]).max(), frame)
            kps, kscores = decode_heatmaps(logits, kb, heads.keypoint_score, max_h, max_w)
            factor = torch.stack([ratio[:, 1], ratio[:, 0], torch.ones_like(ratio[:, 0])], 1)[:, None, None, :]
            # no -1 in these shapes: with no detections onnxruntime would divide by zero inferring it
            out.append(kps.reshape(n, d, kps.shape[1], 3) * factor)
            out.append(kscores.reshape(n, d, kps.shape[1]))
        return tuple(out)

    def _paste(self, probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
        model = self.model
        ry, rx, masks = paste_weights(probs, boxes, height, width, model.paste_style)
        pasted = torch.bmm(ry, torch.bmm(masks, rx.transpose(1, 2)))
        return pasted >= model.mask_threshold if model.mask_threshold >= 0 else pasted
