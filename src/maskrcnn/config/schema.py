"""The config's schema: nested dataclasses, one per part of the model/data/solver/run, each field
typed, with its default and (in its metadata) its allowed values or range."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maskrcnn.config.choices import (
    AMP_MODES,
    ANCHOR_STYLES,
    ARCHITECTURES,
    BAD_SAMPLE_POLICIES,
    BEST_METRICS,
    CASCADE_MASK_MODES,
    CHANNEL_ORDERS,
    KEYPOINT_CONVENTIONS,
    KEYPOINT_LOSS_NORMALIZERS,
    KEYPOINT_SCORES,
    LOSS_NORMALIZERS,
    MASK_FORMATS,
    NORMS,
    PASTE_STYLES,
    MASK_HEADS,
    MASK_LOSSES,
    POOLER_TYPES,
    PRECISIONS,
    RESIZE_STYLES,
    RESNET_DEPTHS,
    SCHEDULES,
    TENSORBOARD_MODES,
    TRAIN_PROCEDURES,
    OPTIMIZE_PARTS,
)


def _choice(default: Any, choices: tuple, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def _at_least(default: Any, low: float, doc: str = "") -> Any:
    """A number that must be >= ``low``."""
    return field(default=default, metadata={"min": low, "doc": doc})


def _above(default: Any, low: float, doc: str = "") -> Any:
    """A number that must be > ``low``."""
    return field(default=default, metadata={"above": low, "doc": doc})


def _between(default: Any, low: float, high: float, doc: str = "", *, high_open: bool = False) -> Any:
    """A number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    return field(default=default, metadata={"min": low, ("below" if high_open else "max"): high, "doc": doc})


def _positive(default: Any, doc: str = "") -> Any:
    """Numbers (a number, or every number of a list or nested lists) that must be > 0."""
    return _above(default, 0, doc)


@dataclass
class InputConfig:
    """What the network sees. Users always pass RGB images, float 0-1 or uint8 0-255."""

    channel_order: str = _choice("RGB", CHANNEL_ORDERS, "channel order the first conv expects")
    pixel_scale: float = _positive(1.0)  # 1.0: pixels in 0-1 (torchvision weights); 255.0: 0-255 (detectron2 weights)
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # in pixel_scale units, network order
    pixel_std: tuple[float, float, float] = _positive((0.229, 0.224, 0.225))
    min_size_train: tuple[int, ...] = _positive((800,))  # shortest side; one drawn per image (multi-scale training)
    max_size_train: int = _positive(1333)
    min_size_test: int = _positive(800)
    max_size_test: int = _positive(1333)
    size_divisibility: int = _at_least(32, 0)
    resize_style: str = _choice("torchvision", RESIZE_STYLES, "size rounding and filter of the resize")


@dataclass
class BackboneConfig:
    depth: int = _choice(50, RESNET_DEPTHS, "ResNet depth")
    groups: int = _at_least(1, 1)  # ResNeXt cardinality (32 for X-101-32x8d)
    width_per_group: int = _at_least(64, 1)  # ResNeXt bottleneck width per group (8 for X-101-32x8d)
    # thinner trunks for CPU: e.g. 32 with res2_channels 32 (a half-width ResNet-18)
    stem_channels: int = _at_least(64, 1)
    # output channels of res2, doubling per stage; 0: standard (256, or 64 for R18/34)
    res2_channels: int = _at_least(0, 0)
    norm: str = _choice("FrozenBN", NORMS, "normalisation in the trunk")
    norm_eps: float = _at_least(1e-5, 0.0)  # 0.0 for torchvision's v1 COCO weights
    stride_in_1x1: bool = False  # True for MSRA/detectron2 weights, False for torchvision's ImageNet weights
    freeze_at: int = _between(2, 0, 5)  # 0: train all; 1: freeze the stem; k >= 2: stem and res2..res{k}
    weights: str = ""  # optional torchvision ImageNet classification checkpoint to initialise the trunk


@dataclass
class FPNConfig:
    out_channels: int = _at_least(256, 1)
    norm: str = _choice("", NORMS, "normalisation in lateral/output convs")
    norm_eps: float = _at_least(1e-5, 0.0)


@dataclass
class AnchorConfig:
    sizes: tuple[tuple[float, ...], ...] = _positive(((32,), (64,), (128,), (256,), (512,)))  # per level
    aspect_ratios: tuple[tuple[float, ...], ...] = _positive(((0.5, 1.0, 2.0),))  # height/width; one tuple = all levels
    style: str = _choice("detectron2", ANCHOR_STYLES, "see maskrcnn.modeling.anchors")
    offset: float = 0.0


@dataclass
class RPNConfig:
    num_convs: int = _at_least(1, 0)
    fg_iou_thresh: float = _between(0.7, 0.0, 1.0)
    bg_iou_thresh: float = _between(0.3, 0.0, 1.0)
    batch_size_per_image: int = _at_least(256, 1)
    positive_fraction: float = _between(0.5, 0.0, 1.0)
    pre_nms_topk_train: int = _at_least(2000, 1)  # per FPN level
    pre_nms_topk_test: int = _at_least(1000, 1)
    post_nms_topk_train: int = _at_least(1000, 1)  # per image
    post_nms_topk_test: int = _at_least(1000, 1)
    nms_thresh: float = _between(0.7, 0.0, 1.0)
    min_size: float = _at_least(0.0, 0.0)  # proposals must be wider and taller than this
    score_thresh: float = _between(0.0, 0.0, 1.0)
    nms_on_probability: bool = False
    bbox_reg_weights: tuple[float, float, float, float] = _positive((1.0, 1.0, 1.0, 1.0))
    smooth_l1_beta: float = _at_least(0.0, 0.0)
    loss_normalizer: str = _choice("batch", LOSS_NORMALIZERS, "divide losses by batch_size*images or by #sampled")
    objectness_loss_weight: float = _at_least(1.0, 0.0)
    box_loss_weight: float = _at_least(1.0, 0.0)
    crowd_ioa_thresh: float = _between(0.7, 0.0, 1.0)  # negative anchors this much inside an iscrowd region are ignored


@dataclass
class ROIHeadsConfig:
    num_classes: int = _at_least(80, 1)  # foreground classes
    fg_iou_thresh: float = _between(0.5, 0.0, 1.0)
    bg_iou_thresh: float = _between(0.5, 0.0, 1.0)
    batch_size_per_image: int = _at_least(512, 1)
    positive_fraction: float = _between(0.25, 0.0, 1.0)
    append_gt: bool = True
    score_thresh: float = _between(0.05, 0.0, 1.0)
    nms_thresh: float = _between(0.5, 0.0, 1.0)
    detections_per_image: int = _at_least(100, 1)
    min_size: float = 0.0  # detections narrower or shorter than this are dropped (< 0: keep all)
    drop_empty_detections: bool = False  # detectron2: after NMS and top-k, drop zero-width/height boxes
    pooler_canonical_scale: float = _positive(224.0)  # FPN level assignment, Eqn. 1 of the FPN paper
    pooler_canonical_level: int = 4
    pooler_level_eps: float = _at_least(0.0, 0.0)  # torchvision: 1e-6 added to the level
    pooler_level_log_eps: float = _at_least(1e-8, 0.0)  # detectron2: 1e-8 added inside the log
    # background proposals this much inside an iscrowd region are not sampled
    crowd_ioa_thresh: float = _between(0.7, 0.0, 1.0)


@dataclass
class BoxHeadConfig:
    pooler_resolution: int = _at_least(7, 1)
    pooler_sampling_ratio: int = 0  # <= 0: adaptive
    pooler_aligned: bool = True
    pooler_type: str = _choice("ROIAlign", POOLER_TYPES, "RoI feature extractor")
    num_conv: int = _at_least(0, 0)
    conv_dim: int = _at_least(256, 1)
    num_fc: int = _at_least(2, 0)
    fc_dim: int = _at_least(1024, 1)
    norm: str = _choice("", NORMS, "normalisation in the head's convs")
    class_agnostic: bool = False
    bbox_reg_weights: tuple[float, float, float, float] = _positive((10.0, 10.0, 5.0, 5.0))
    smooth_l1_beta: float = _at_least(0.0, 0.0)


@dataclass
class MaskHeadConfig:
    pooler_resolution: int = _at_least(14, 1)
    pooler_sampling_ratio: int = 0
    pooler_aligned: bool = True
    pooler_type: str = _choice("ROIAlign", POOLER_TYPES, "RoI feature extractor")
    head: str = _choice("fcn", MASK_HEADS, "the paper's FCN (convs + deconv) or its MLP ablation (Table 2e)")
    num_conv: int = _at_least(4, 0)
    conv_dim: int = _at_least(256, 1)
    mlp_dims: tuple[int, ...] = _positive((1024, 1024))  # head=mlp: hidden fully connected layers
    norm: str = _choice("", NORMS, "normalisation in the head's convs")
    class_agnostic: bool = False
    loss: str = _choice("sigmoid", MASK_LOSSES, "per-class sigmoids (the paper) or a softmax over classes (Table 2b)")
    target_aligned: bool = True  # how bitmap ground truth is cropped into 28x28 targets
    target_sampling_ratio: int = 0
    target_binarize: bool = True
    paste_style: str = _choice("detectron2", PASTE_STYLES, "how masks are pasted into the image")
    # output masks are mask_prob >= threshold; < 0 returns probabilities
    mask_threshold: float = _between(0.5, float("-inf"), 1.0)


@dataclass
class KeypointHeadConfig:
    """The keypoint branch (``model.keypoint_on``): K heatmaps of (pooler * 2 * up_scale)^2 bins per RoI.

    ``pixel_convention``: how the integer pixel indices of COCO's keypoint annotations relate to the
    model's continuous coordinates (pixel i spans [i, i+1)). The two zoos were trained differently,
    and each scores its best only under its own rule:

    - ``"detectron2"``: ``data/datasets/coco.py`` ``load_coco_json`` adds 0.5 to every keypoint x and y
      on load (index -> pixel centre); the flip (fvcore ``HFlipTransform.apply_coords``, used by
      ``data/detection_utils.py`` ``transform_keypoint_annotations``) maps x -> W - x on those shifted
      values; ``evaluation/coco_evaluation.py`` ``instances_to_coco_json`` subtracts 0.5 from x and y
      before writing the results JSON.
    - ``"torchvision"``: ``references/detection/coco_utils.py`` ``ConvertCocoPolysToMask`` keeps the
      values of the file; ``references/detection/transforms.py`` ``_flip_coco_person_keypoints`` maps
      x -> W - x (not W - 1 - x); ``references/detection/coco_eval.py`` ``prepare_for_coco_keypoint``
      writes the predictions unchanged.

    Both libraries' predictors return the model's coordinates unshifted, and so does ours: the
    offset applies only between the annotation/results files and the model. The default is
    torchvision's (no shift), what checkpoints saved before this option were trained with.
    """

    num_keypoints: int = _at_least(17, 1)  # COCO person; the dataset's categories decide (checked at training start)
    pooler_resolution: int = _at_least(14, 1)
    pooler_sampling_ratio: int = 0
    pooler_aligned: bool = True
    pooler_type: str = _choice("ROIAlign", POOLER_TYPES, "RoI feature extractor")
    conv_dims: tuple[int, ...] = _positive((512,) * 8)  # the paper's eight 3x3 conv-512 layers
    up_scale: int = _at_least(2, 1)  # bilinear upsampling after the stride-2 deconv: 14 -> 28 -> 56
    loss_weight: float = _at_least(1.0, 0.0)
    loss_normalizer: str = _choice("visible", KEYPOINT_LOSS_NORMALIZERS, "mean over labelled keypoints, or a fixed count")
    score: str = _choice("logit", KEYPOINT_SCORES, "keypoints_scores: peak logit (torchvision) or probability")
    oks_sigmas: tuple[float, ...] = _positive(())  # per keypoint, for OKS AP; () = COCO person's (needs 17 keypoints)
    pixel_convention: str = _choice("torchvision", KEYPOINT_CONVENTIONS,
                                    "keypoint file coordinates vs the model's: detectron2 shifts by half a pixel")


@dataclass
class CascadeConfig:
    """Cascade R-CNN box stages (``enabled``); one entry per stage in the tuples."""

    enabled: bool = False
    ious: tuple[float, ...] = _between((0.5, 0.6, 0.7), 0.0, 1.0)  # foreground IoU threshold of each stage
    bbox_reg_weights: tuple[tuple[float, float, float, float], ...] = _positive((
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)))
    # Cascade R-CNN paper / mmdetection: 1, 0.5, 0.25
    stage_loss_weights: tuple[float, ...] = _at_least((1.0, 1.0, 1.0), 0.0)
    scale_gradients: bool = True  # detectron2: 1/num_stages on the pooled features shared by all stages
    resample: bool = False  # mmdetection: a new balanced sample each stage; detectron2: the same RoIs, re-labelled
    mask_mode: str = _choice("last", CASCADE_MASK_MODES, "one mask head (detectron2) or one per stage, averaged")


@dataclass
class ModelConfig:
    architecture: str = _choice("FPN", ARCHITECTURES, "FPN (P2-P6) or the paper's res4/res5 C4 model")
    mask_on: bool = True
    keypoint_on: bool = False
    box_decode_float32: bool = False  # detectron2 decodes boxes in float32 even in float64 (matters only there)
    channels_last: bool = True  # NHWC feature maps: ~25% faster convolutions on CPU (oneDNN) and tensor cores
    # inference: the network's layers in bf16 (CPU with bf16 units, or GPU) or fp16 (GPU); box geometry,
    # NMS and mask pasting stay float32. Training's precision is solver.amp.
    precision: str = _choice("float32", PRECISIONS, "precision of the network's layers at inference")
    input: InputConfig = field(default_factory=InputConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint_head: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)


@dataclass
class DataConfig:
    """COCO-format datasets. With no train/val paths, ``maskrcnn demo``/``train`` use the built-in
    synthetic shapes (written to ``shapes_dir``)."""

    train_json: str = ""  # instances JSON
    train_images: str = ""  # folder the JSON's file_name values are relative to
    val_json: str = ""
    val_images: str = ""
    keep_empty_images: bool = True  # train on images without annotations as negatives
    on_bad_sample: str = _choice("skip", BAD_SAMPLE_POLICIES, "skip (and report) or stop at a bad image/annotation")
    mask_format: str = _choice("polygon", MASK_FORMATS, "keep polygons as polygons, or rasterise")
    flip_prob: float = _between(0.5, 0.0, 1.0)  # horizontal flip in training (keypoints swap left/right by their names)
    # keypoint models: train only on images with this many labelled keypoints
    min_keypoints_per_image: int = _at_least(0, 0)
    num_workers: int = _at_least(2, 0)
    aspect_ratio_grouping: bool = True
    # LVIS's repeat-factor sampling: images with classes in fewer than this fraction of the images are
    # repeated within an epoch, sqrt(threshold / fraction) times (LVIS used 0.001); 0: off
    repeat_factor_threshold: float = _between(0.0, 0.0, 1.0, "repeat images of classes rarer than this fraction "
                                              "of the training images (LVIS: 0.001); 0: off")
    shapes_dir: str = "outputs/shapes"
    shapes_train: int = _at_least(400, 1)
    shapes_val: int = _at_least(50, 1)
    shapes_size: int = _at_least(192, 32)
    shapes_min_radius: float = _positive(16.0)
    shapes_max_radius: float = _positive(44.0)
    shapes_seed: int = 0
    shapes_keypoints: bool = False  # stars with their five tips as keypoints (plus unlabelled distractor shapes)


@dataclass
class SolverConfig:
    """SGD with momentum, linear warm-up, then step or cosine decay.

    Linear scaling rule (Goyal et al. 2017): ``base_lr`` is for ``ims_per_batch`` images per step
    over all processes; if you change the batch, scale the learning rate by the same factor (and
    the iterations by its inverse). detectron2's 0.02 is for 16 images.
    """

    ims_per_batch: int = _at_least(16, 1, "global: split evenly over the processes")
    base_lr: float = _above(0.02, 0.0)
    momentum: float = _between(0.9, 0.0, 1.0, high_open=True)
    weight_decay: float = _at_least(1e-4, 0.0)
    weight_decay_norm: float = _at_least(0.0, 0.0)  # for norm layers' scales and shifts
    max_iter: int = _at_least(90000, 1)
    schedule: str = _choice("step", SCHEDULES, "learning rate decay after warm-up")
    steps: tuple[int, ...] = _at_least((60000, 80000), 1)  # "step": multiply by gamma at each (increasing)
    gamma: float = _positive(0.1)
    warmup_iters: int = _at_least(1000, 0)
    warmup_factor: float = _between(0.001, 0.0, 1.0)  # lr starts at base_lr * warmup_factor, grows linearly
    clip_grad_norm: float = _at_least(0.0, 0.0)  # 0 disables
    # ims_per_batch stays the batch of one optimizer step (and of the linear scaling rule): each step
    # runs its images in this many forward/backward passes and sums their gradients
    accumulate_steps: int = _at_least(1, 1, "passes per step over ims_per_batch images: the memory of a "
                                         "batch this many times smaller, the same training")
    amp: str = _choice("", AMP_MODES, "mixed precision: bf16 (CPU or GPU) or fp16 (GPU)")


@dataclass
class TrainConfig:
    output_dir: str = "outputs/train"
    checkpoint_period: int = _at_least(5000, 0)  # 0: only the final checkpoint
    eval_period: int = _at_least(0, 0)  # 0: only at the end
    log_period: int = _at_least(20, 1)
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    init_weights: str = ""  # a checkpoint of ours to start from (fine-tuning)
    init_weights_reset_heads: bool = False  # allow init_weights from other classes: new class predictors
    eval_max_images: int = _at_least(0, 0)  # 0: the whole validation set
    val_loss: bool = True  # also the training losses on the validation set at each evaluation
    best_metric: str = _choice("auto", BEST_METRICS, "kept in model_best.pth at each evaluation: auto (segm/AP "
                               "with masks, else keypoints/AP with keypoints, else bbox/AP), val_loss, or none")
    early_stop_patience: int = _at_least(0, 0, "stop after this many evaluations without a better best_metric "
                                         "(needs eval_period); 0: never")
    early_stop_min_delta: float = _at_least(0.0, 0.0, "how much better best_metric must be to count (AP in 0-1)")
    tensorboard: str = _choice("auto", TENSORBOARD_MODES, "TensorBoard event files in output_dir: auto (when the "
                               "tensorboard package is installed), always (required), never")
    tensorboard_images: int = _at_least(3, 0)  # validation images drawn with their detections at each evaluation
    analyze_at_end: bool = True  # the error analysis of the final evaluation (as eval --analyze) in output_dir/analysis
    procedure: str = _choice("end_to_end", TRAIN_PROCEDURES, "end_to_end (all losses together, the approximate joint "
                             "training of Faster R-CNN and Mask R-CNN) or alternating (Faster R-CNN's 4 steps)")
    # the parts of one training run (the alternating procedure sets them for each of its steps)
    optimize: str = _choice("all", OPTIMIZE_PARTS, "which losses train: all, rpn (the RPN alone), or detector (the "
                            "RoI heads, on the proposals of a frozen RPN)")
    freeze: tuple[str, ...] = ()  # of backbone, rpn, roi_heads: weights fixed, batch-norm statistics too
    proposals_from: str = ""  # optimize=detector: a checkpoint whose backbone and RPN propose (else the model's own)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""

