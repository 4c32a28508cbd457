"""``build_model(cfg)``: every module constructed explicitly from the typed config (no registry).

Building never reads a file: weights come from whoever asked for them (the trainer initialises the
trunk from ``model.backbone.weights``, checkpoint loaders load checkpoints), so a checkpoint alone is
enough to rebuild and use its model on any machine.
"""

from __future__ import annotations

import torch
from torch import nn

from maskrcnn.config import Config
from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.backbone import Backbone
from maskrcnn.modeling.backbone.fpn import FPN
from maskrcnn.modeling.backbone.resnet import ResNet, freeze, make_stage
from maskrcnn.modeling.detector import MaskRCNN
from maskrcnn.modeling.poolers import MultiLevelRoIPooler
from maskrcnn.modeling.preprocess import ImagePreprocessor
from maskrcnn.modeling.roi_heads.box_head import FastRCNNConvFCHead, FastRCNNPredictor
from maskrcnn.modeling.roi_heads.c4 import Res5ROIHeads
from maskrcnn.modeling.roi_heads.cascade import CascadeROIHeads
from maskrcnn.modeling.roi_heads.keypoint_head import KeypointRCNNConvDeconvUpsampleHead
from maskrcnn.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead, MaskRCNNMLPHead
from maskrcnn.modeling.roi_heads.standard import StandardROIHeads
from maskrcnn.modeling.rpn import RPN, RPNHead


def build_anchor_generator(cfg: Config) -> AnchorGenerator:
    """The RPN's anchors: one level per RPN feature map (FPN: strides 4-64; C4: 16)."""
    m = cfg.model
    rpn_strides = (16,) if m.architecture == "C4" else (4, 8, 16, 32, 64)
    if len(m.anchors.sizes) != len(rpn_strides):
        raise ValueError(f"model.anchors.sizes has {len(m.anchors.sizes)} levels but the {m.architecture} RPN "
                         f"runs on {len(rpn_strides)}")
    anchors = AnchorGenerator(m.anchors.sizes, m.anchors.aspect_ratios, rpn_strides, m.anchors.style, m.anchors.offset)
    if len(set(anchors.num_anchors)) != 1:
        raise ValueError("the RPN head is shared by all levels: every level needs the same number of anchors")
    return anchors


def build_model(cfg: Config) -> MaskRCNN:
    """The detector described by ``cfg.model``, with freshly initialised weights (``model.backbone.weights``
    is not read here: see ``maskrcnn.engine.trainer``)."""
    m = cfg.model
    i = m.input
    preprocess = ImagePreprocessor(i.channel_order, i.pixel_scale, i.pixel_mean, i.pixel_std, i.min_size_train,
                                   i.max_size_train, i.min_size_test, i.max_size_test, i.size_divisibility,
                                   i.resize_style)
    b = m.backbone
    c4 = m.architecture == "C4"
    body = ResNet(b.depth, b.groups, b.width_per_group, b.norm, b.norm_eps, b.stride_in_1x1, b.freeze_at,
                  out_features=("res4",) if c4 else ("res2", "res3", "res4", "res5"), stem_channels=b.stem_channels,
                  res2_channels=b.res2_channels)
    if c4:
        backbone, channels, strides = Backbone(body), body.out_channels["res4"], (16,)
        rpn_levels, roi_levels = (0,), (0,)
    else:
        fpn = FPN([body.out_channels[s] for s in ("res2", "res3", "res4", "res5")], m.fpn.out_channels, m.fpn.norm,
                  m.fpn.norm_eps)
        backbone, channels, strides = Backbone(body, fpn), m.fpn.out_channels, (4, 8, 16, 32)
        rpn_levels, roi_levels = (0, 1, 2, 3, 4), (0, 1, 2, 3)
    anchors = build_anchor_generator(cfg)
    r = m.rpn
    rpn = RPN(RPNHead(channels, anchors.num_anchors[0], r.num_convs), anchors, fg_iou=r.fg_iou_thresh,
              bg_iou=r.bg_iou_thresh, batch_size_per_image=r.batch_size_per_image,
              positive_fraction=r.positive_fraction, pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
              post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test), nms_thresh=r.nms_thresh,
              min_size=r.min_size, score_thresh=r.score_thresh, box_weights=r.bbox_reg_weights,
              smooth_l1_beta=r.smooth_l1_beta, loss_normalizer=r.loss_normalizer,
              objectness_loss_weight=r.objectness_loss_weight, box_loss_weight=r.box_loss_weight,
              nms_on_probability=r.nms_on_probability, crowd_ioa_thresh=r.crowd_ioa_thresh,
              box_decode_float32=m.box_decode_float32)

    rh, bh, mh = m.roi_heads, m.box_head, m.mask_head
    level_rule = dict(canonical_scale=rh.pooler_canonical_scale, canonical_level=rh.pooler_canonical_level,
                      eps=rh.pooler_level_eps, log_eps=rh.pooler_level_log_eps)
    box_pooler = MultiLevelRoIPooler(bh.pooler_resolution, strides, bh.pooler_sampling_ratio, bh.pooler_aligned,
                                     bh.pooler_type, **level_rule)
    if c4:
        res5, res5_channels = make_stage(b.depth, 3, channels, 2, b.norm, b.norm_eps, b.groups, b.width_per_group,
                                         b.stride_in_1x1, b.res2_channels)
        if b.freeze_at >= 5:
            freeze(res5)
        box_head, box_dim, mask_in = res5, res5_channels, res5_channels
        mask_pooler = None
    else:
        box_head = FastRCNNConvFCHead(channels, bh.pooler_resolution, bh.num_conv, bh.conv_dim, bh.num_fc, bh.fc_dim,
                                      bh.norm)
        box_dim, mask_in = box_head.out_dim, channels
        mask_pooler = MultiLevelRoIPooler(mh.pooler_resolution, strides, mh.pooler_sampling_ratio, mh.pooler_aligned,
                                          mh.pooler_type, **level_rule) if m.mask_on else None
    predictor = FastRCNNPredictor(box_dim, rh.num_classes, bh.class_agnostic)

    def new_mask_head() -> nn.Module:
        softmax = mh.loss == "softmax"
        if mh.head == "mlp":
            resolution = bh.pooler_resolution if c4 else mh.pooler_resolution  # C4: res5's output, 7x7 -> 14x14
            return MaskRCNNMLPHead(mask_in, resolution, rh.num_classes, mh.mlp_dims, mh.class_agnostic, softmax)
        return MaskRCNNConvUpsampleHead(mask_in, rh.num_classes, mh.num_conv, mh.conv_dim, mh.norm,
                                        class_agnostic=mh.class_agnostic, softmax=softmax)

    mask_head = new_mask_head() if m.mask_on else None
    common = dict(fg_iou=rh.fg_iou_thresh, bg_iou=rh.bg_iou_thresh, batch_size_per_image=rh.batch_size_per_image,
                  positive_fraction=rh.positive_fraction, append_gt=rh.append_gt, box_weights=bh.bbox_reg_weights,
                  smooth_l1_beta=bh.smooth_l1_beta, score_thresh=rh.score_thresh, nms_thresh=rh.nms_thresh,
                  detections_per_image=rh.detections_per_image, min_size=rh.min_size,
                  mask_target_aligned=mh.target_aligned, mask_target_sampling=mh.target_sampling_ratio,
                  mask_target_binarize=mh.target_binarize, crowd_ioa_thresh=rh.crowd_ioa_thresh,
                  drop_empty_detections=rh.drop_empty_detections, box_decode_float32=m.box_decode_float32)
    if m.keypoint_on:
        kh = m.keypoint_head
        if kh.num_keypoints < 1:
            raise ValueError(f"model.keypoint_head.num_keypoints must be >= 1, got {kh.num_keypoints}")
        common.update(keypoint_pooler=MultiLevelRoIPooler(kh.pooler_resolution, strides, kh.pooler_sampling_ratio,
                                                          kh.pooler_aligned, kh.pooler_type, **level_rule),
                      keypoint_head=KeypointRCNNConvDeconvUpsampleHead(channels, kh.num_keypoints, kh.conv_dims,
                                                                       kh.up_scale),
                      keypoint_score=kh.score, keypoint_loss_weight=kh.loss_weight,
                      keypoint_loss_normalizer=kh.loss_normalizer)
    cc = m.cascade
    if cc.enabled:
        if c4:
            raise ValueError("model.cascade needs the FPN architecture")
        n = len(cc.ious)
        heads = [box_head] + [FastRCNNConvFCHead(channels, bh.pooler_resolution, bh.num_conv, bh.conv_dim, bh.num_fc,
                                                 bh.fc_dim, bh.norm) for _ in range(n - 1)]
        predictors = [FastRCNNPredictor(box_dim, rh.num_classes, class_agnostic=True) for _ in range(n)]
        if m.mask_on and cc.mask_mode == "per_stage":
            mask_head = nn.ModuleList([mask_head] + [new_mask_head() for _ in range(n - 1)])
        for key in ("fg_iou", "bg_iou", "box_weights"):
            common.pop(key)
        roi_heads = CascadeROIHeads(box_pooler, heads, predictors, num_classes=rh.num_classes, mask_pooler=mask_pooler,
                                    mask_head=mask_head, stage_ious=cc.ious, stage_box_weights=cc.bbox_reg_weights,
                                    stage_loss_weights=cc.stage_loss_weights, scale_gradients=cc.scale_gradients,
                                    resample=cc.resample, mask_mode=cc.mask_mode, **common)
    else:
        heads_cls = Res5ROIHeads if c4 else StandardROIHeads
        roi_heads = heads_cls(box_pooler, box_head, predictor, num_classes=rh.num_classes, mask_pooler=mask_pooler,
                              mask_head=mask_head, **common)
    model = MaskRCNN(preprocess, backbone, rpn, roi_heads, rh.num_classes, rpn_levels, roi_levels, mh.paste_style,
                     mh.mask_threshold, m.channels_last, m.precision)
    return model.to(memory_format=torch.channels_last) if m.channels_last else model
