"""The presets: plain functions that return a :class:`Config` (``maskrcnn.PRESETS``)."""

from __future__ import annotations

from maskrcnn.config.schema import Config, RPNConfig


def mask_rcnn_R_50_FPN() -> Config:
    """The paper's ResNet-50-FPN Mask R-CNN with detectron2's training recipe (RoIAlignV2,
    adaptive sampling, L1 box losses), on the torchvision input convention so that torchvision's
    ImageNet ResNet weights initialise the trunk (stride in the 3x3 conv, RGB 0-1)."""
    return Config()


def mask_rcnn_R_101_FPN() -> Config:
    cfg = Config()
    cfg.model.backbone.depth = 101
    return cfg


def mask_rcnn_X_101_32x8d_FPN() -> Config:
    cfg = Config()
    cfg.model.backbone.depth = 101
    cfg.model.backbone.groups = 32
    cfg.model.backbone.width_per_group = 8
    return cfg


def mask_rcnn_R_50_C4() -> Config:
    """The paper's ResNet-50-C4: RPN and RoI pooling on res4 (stride 16), res5 as the box head."""
    cfg = Config()
    m = cfg.model
    m.architecture = "C4"
    m.anchors.sizes = ((32, 64, 128, 256, 512),)
    m.rpn.pre_nms_topk_train = 12000  # one level holds all anchors, hence detectron2's larger C4 budgets
    m.rpn.pre_nms_topk_test = 6000
    m.rpn.post_nms_topk_train = 2000
    m.roi_heads.batch_size_per_image = 512
    m.box_head.pooler_resolution = 14
    m.mask_head.num_conv = 0
    return cfg


def shapes_R_18_FPN() -> Config:
    """The CPU-sized model of ``maskrcnn demo``: a half-width ResNet-18 with a 64-channel FPN, trained
    from scratch (batch norm in training mode, nothing frozen) on the 192-px synthetic shapes in
    about ten minutes on two CPU cores."""
    cfg = Config()
    m = cfg.model
    m.backbone.depth = 18
    m.backbone.stem_channels = 32
    m.backbone.res2_channels = 32
    m.backbone.norm = "BN"
    m.backbone.freeze_at = 0
    m.fpn.out_channels = 64
    m.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 1000, 500
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 500, 300
    m.roi_heads.num_classes = 4
    m.roi_heads.batch_size_per_image = 64
    m.box_head.fc_dim = 256
    m.mask_head.conv_dim = 64
    m.input.min_size_train, m.input.max_size_train = (192,), 320
    m.input.min_size_test, m.input.max_size_test = 192, 320
    # no loader processes: a batch of four 192-px PNGs loads in ~6 ms beside a ~150 ms step, and on a
    # 2-core machine two workers took cores from the model (demo 7 min 46 s -> 6 min 17 s without
    # them, same AP, AMD EPYC 2026-12-07)
    cfg.data.num_workers = 0
    s = cfg.solver
    s.ims_per_batch, s.base_lr, s.max_iter = 4, 0.02, 2000
    s.schedule, s.warmup_iters, s.warmup_factor, s.clip_grad_norm = "cosine", 100, 0.01, 10.0
    t = cfg.train
    t.output_dir, t.checkpoint_period, t.eval_period, t.log_period = "outputs/shapes_R_18_FPN", 500, 500, 20
    return cfg


def cascade_mask_rcnn_R_50_FPN() -> Config:
    """Cascade Mask R-CNN with the hyperparameters of seed 000 where it gives them: anchor IoU
    0.3/0.7, a box head of 4 convs and 2 FCs (GroupNorm in the convs), proposals 4000/1000 before/after
    NMS in training and 2000/1000 at test, stem and res2 frozen, 7x7 box and 14x14 mask pooling with
    2x2 samples per bin; three stages at IoU 0.5/0.6/0.7 with detectron2's stage settings."""
    cfg = Config()
    m = cfg.model
    m.cascade.enabled = True
    m.box_head.num_conv, m.box_head.num_fc, m.box_head.norm = 4, 2, "GN"
    m.box_head.class_agnostic = True
    m.box_head.pooler_sampling_ratio = m.mask_head.pooler_sampling_ratio = 2
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 4000, 1000
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 2000, 1000
    return cfg


def cascade_mask_rcnn_R_101_FPN() -> Config:
    cfg = cascade_mask_rcnn_R_50_FPN()
    cfg.model.backbone.depth = 101
    return cfg


def cascade_mask_rcnn_X_101_32x8d_FPN() -> Config:
    cfg = cascade_mask_rcnn_R_101_FPN()
    cfg.model.backbone.groups, cfg.model.backbone.width_per_group = 32, 8
    return cfg


def shapes_cascade_R_18_FPN() -> Config:
    """``shapes_R_18_FPN`` with three cascade stages: the CPU-sized Cascade Mask R-CNN."""
    cfg = shapes_R_18_FPN()
    cfg.model.cascade.enabled = True
    cfg.model.box_head.class_agnostic = True
    cfg.train.output_dir = "outputs/shapes_cascade_R_18_FPN"
    return cfg


def _person_keypoints(cfg: Config) -> Config:
    """Keypoints instead of masks for COCO's one person class, trained at 640-800 px (both libraries)."""
    m = cfg.model
    m.mask_on, m.keypoint_on = False, True
    m.roi_heads.num_classes = 1
    m.input.min_size_train = (640, 672, 704, 736, 768, 800)
    return cfg


def keypoint_rcnn_R_50_FPN() -> Config:
    """Keypoint R-CNN R50-FPN (COCO person, 17 keypoints) with detectron2's keypoint recipe: multi-scale
    training 640-800, 1500 proposals per image in training, smooth-L1 beta 0.5 in the box head, images
    without labelled keypoints left out. Add ``model.mask_on=true`` for keypoints and masks together
    (the paper's Table 4)."""
    cfg = _person_keypoints(Config())
    m = cfg.model
    m.rpn.post_nms_topk_train = 1500
    m.box_head.smooth_l1_beta = 0.5
    cfg.data.min_keypoints_per_image = 1
    return cfg


def shapes_keypoint_R_18_FPN() -> Config:
    """The CPU-sized Keypoint R-CNN (with masks): ``shapes_R_18_FPN`` on the synthetic stars, whose five
    tips are the keypoints, with a four-conv-128 keypoint head."""
    cfg = shapes_R_18_FPN()
    m = cfg.model
    m.keypoint_on = True
    m.roi_heads.num_classes = 1
    m.keypoint_head.num_keypoints = 5
    m.keypoint_head.conv_dims = (128,) * 4
    m.keypoint_head.oks_sigmas = (0.05,) * 5
    cfg.data.shapes_keypoints = True
    cfg.data.shapes_dir = "outputs/shapes_keypoints"
    cfg.train.output_dir = "outputs/shapes_keypoint_R_18_FPN"
    return cfg


def torch_float32(v: float) -> float:
    """``v`` rounded to the nearest float32."""
    import struct

    return struct.unpack("f", struct.pack("f", v))[0]


def _detectron2_convention(cfg: Config) -> Config:
    """What detectron2's MSRA-initialised zoo models expect: BGR pixels in 0-255 minus the mean (std 1),
    stride in the 1x1 conv, detectron2's resize; the heads already follow detectron2 in our presets."""
    m = cfg.model
    m.input.channel_order, m.input.pixel_scale = "BGR", 255.0
    # detectron2's mean as its float32 buffer holds it (103.53 -> 103.52999877...): the same in float32,
    # and what a float64 detectron2 model subtracts
    m.input.pixel_mean = tuple(float(torch_float32(v)) for v in (103.53, 116.28, 123.675))
    m.input.pixel_std = (1.0, 1.0, 1.0)
    m.input.resize_style = "detectron2"
    m.input.min_size_train = (640, 672, 704, 736, 768, 800)
    m.backbone.stride_in_1x1 = True
    m.roi_heads.min_size, m.roi_heads.drop_empty_detections = -1.0, True
    m.box_decode_float32 = True
    m.keypoint_head.score = "softmax"
    m.keypoint_head.pixel_convention = "detectron2"
    return cfg


def detectron2_mask_rcnn_R_50_FPN_3x() -> Config:
    """detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x`` (zoo ``model_final_f10217.pkl``)."""
    return _detectron2_convention(Config())


def detectron2_mask_rcnn_R_101_FPN_3x() -> Config:
    cfg = detectron2_mask_rcnn_R_50_FPN_3x()
    cfg.model.backbone.depth = 101
    return cfg


def detectron2_mask_rcnn_X_101_32x8d_FPN_3x() -> Config:
    """X101-32x8d: FAIR's ImageNet trunk, so the stride sits in the 3x3 conv and the std is not 1."""
    cfg = detectron2_mask_rcnn_R_101_FPN_3x()
    b = cfg.model.backbone
    b.groups, b.width_per_group, b.stride_in_1x1 = 32, 8, False
    cfg.model.input.pixel_std = tuple(torch_float32(v) for v in (57.375, 57.12, 58.395))
    return cfg


def detectron2_faster_rcnn_R_50_FPN_3x() -> Config:
    cfg = detectron2_mask_rcnn_R_50_FPN_3x()
    cfg.model.mask_on = False
    return cfg


def detectron2_cascade_mask_rcnn_R_50_FPN_3x() -> Config:
    """detectron2's ``Misc/cascade_mask_rcnn_R_50_FPN_3x``: 2-FC box heads, class-agnostic, 3 stages."""
    cfg = detectron2_mask_rcnn_R_50_FPN_3x()
    m = cfg.model
    m.cascade.enabled = True
    m.box_head.class_agnostic = True
    m.rpn.post_nms_topk_train = 2000
    return cfg


def detectron2_keypoint_rcnn_R_50_FPN_3x() -> Config:
    """detectron2's ``COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x`` (person, 17 keypoints)."""
    return _detectron2_convention(keypoint_rcnn_R_50_FPN())


def faster_rcnn_R_50_FPN() -> Config:
    cfg = Config()
    cfg.model.mask_on = False
    return cfg


def torchvision_maskrcnn_resnet50_fpn() -> Config:
    """Exactly ``torchvision.models.detection.maskrcnn_resnet50_fpn`` (91 COCO category slots).

    Its COCO weights were trained with frozen BN eps 0: set ``model.backbone.norm_eps=0`` for them
    (``maskrcnn.interop.torchvision`` does when it converts those weights).
    """
    cfg = Config()
    m = cfg.model
    m.input.resize_style = "torchvision"
    m.backbone.stride_in_1x1 = False
    m.anchors.style = "torchvision"
    m.rpn = RPNConfig(post_nms_topk_train=2000, min_size=1e-3, nms_on_probability=True, smooth_l1_beta=1 / 9,
                      loss_normalizer="sampled")
    m.roi_heads.num_classes = 90
    m.roi_heads.min_size = 1e-2
    m.roi_heads.pooler_level_eps = 1e-6
    m.roi_heads.pooler_level_log_eps = 0.0
    m.box_head.pooler_sampling_ratio = 2
    m.box_head.pooler_aligned = False
    m.box_head.smooth_l1_beta = 1 / 9
    m.mask_head.pooler_sampling_ratio = 2
    m.mask_head.pooler_aligned = False
    m.mask_head.target_aligned = False
    m.mask_head.target_sampling_ratio = -1
    m.mask_head.target_binarize = False
    m.mask_head.paste_style = "torchvision"
    m.keypoint_head.pixel_convention = "torchvision"
    return cfg


def torchvision_maskrcnn_resnet50_fpn_v2() -> Config:
    """Exactly ``maskrcnn_resnet50_fpn_v2`` (Li et al. 2021 recipe): BN in the FPN and heads, a
    two-conv RPN head, a 4conv-1fc box head."""
    cfg = torchvision_maskrcnn_resnet50_fpn()
    m = cfg.model
    m.fpn.norm = "BN"
    m.rpn.num_convs = 2
    m.box_head.num_conv = 4
    m.box_head.num_fc = 1
    m.box_head.norm = "BN"
    m.mask_head.norm = "BN"
    return cfg


def torchvision_keypointrcnn_resnet50_fpn() -> Config:
    """Exactly ``torchvision.models.detection.keypointrcnn_resnet50_fpn`` (person + 17 keypoints);
    its COCO v1 weights want ``model.backbone.norm_eps=0``, as the Mask R-CNN ones."""
    cfg = _person_keypoints(torchvision_maskrcnn_resnet50_fpn())
    m = cfg.model
    m.keypoint_head.pooler_sampling_ratio = 2
    m.keypoint_head.pooler_aligned = False
    return cfg


def torchvision_fasterrcnn_resnet50_fpn() -> Config:
    cfg = torchvision_maskrcnn_resnet50_fpn()
    cfg.model.mask_on = False
    return cfg


def torchvision_fasterrcnn_resnet50_fpn_v2() -> Config:
    cfg = torchvision_maskrcnn_resnet50_fpn_v2()
    cfg.model.mask_on = False
    return cfg


PRESETS = {
    f.__name__: f
    for f in (mask_rcnn_R_50_FPN, mask_rcnn_R_101_FPN, mask_rcnn_X_101_32x8d_FPN, mask_rcnn_R_50_C4,
              faster_rcnn_R_50_FPN, shapes_R_18_FPN, cascade_mask_rcnn_R_50_FPN, cascade_mask_rcnn_R_101_FPN,
              cascade_mask_rcnn_X_101_32x8d_FPN, shapes_cascade_R_18_FPN, keypoint_rcnn_R_50_FPN,
              shapes_keypoint_R_18_FPN, torchvision_maskrcnn_resnet50_fpn, torchvision_maskrcnn_resnet50_fpn_v2,
              torchvision_keypointrcnn_resnet50_fpn, torchvision_fasterrcnn_resnet50_fpn,
              torchvision_fasterrcnn_resnet50_fpn_v2, detectron2_mask_rcnn_R_50_FPN_3x, detectron2_mask_rcnn_R_101_FPN_3x,
              detectron2_mask_rcnn_X_101_32x8d_FPN_3x, detectron2_faster_rcnn_R_50_FPN_3x,
              detectron2_cascade_mask_rcnn_R_50_FPN_3x, detectron2_keypoint_rcnn_R_50_FPN_3x)
}

