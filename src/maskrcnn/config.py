"""Typed configuration: nested dataclasses, presets as plain functions, YAML in and out.

Every field has a type and a default; loading a dict/YAML or applying ``key=value`` overrides
checks each key and value against them, so a typo or a wrong type fails at load time with the
dotted name of the key (and a suggestion), never later inside the model.

``get_config(name)`` returns a preset (see :data:`PRESETS`) or loads a YAML file. A YAML file may
start from a preset or another file with ``_base_: <preset or path>`` and list only what differs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NORMS = ("", "FrozenBN", "BN", "SyncBN", "GN")


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

    channel_order: str = _choice("RGB", ("RGB", "BGR"), "channel order the first conv expects")
    pixel_scale: float = _positive(1.0)  # 1.0: pixels in 0-1 (torchvision weights); 255.0: 0-255 (detectron2 weights)
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # in pixel_scale units, network order
    pixel_std: tuple[float, float, float] = _positive((0.229, 0.224, 0.225))
    min_size_train: tuple[int, ...] = _positive((800,))  # shortest side; one drawn per image (multi-scale training)
    max_size_train: int = _positive(1333)
    min_size_test: int = _positive(800)
    max_size_test: int = _positive(1333)
    size_divisibility: int = _at_least(32, 0)
    resize_style: str = _choice("torchvision", ("torchvision", "detectron2"), "size rounding and filter of the resize")


@dataclass
class BackboneConfig:
    depth: int = _choice(50, (18, 34, 50, 101, 152), "ResNet depth")
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
    style: str = _choice("detectron2", ("torchvision", "detectron2"), "see maskrcnn.modeling.anchors")
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
    loss_normalizer: str = _choice("batch", ("batch", "sampled"), "divide losses by batch_size*images or by #sampled")
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
    pooler_type: str = _choice("ROIAlign", ("ROIAlign", "ROIPool"), "RoI feature extractor")
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
    pooler_type: str = _choice("ROIAlign", ("ROIAlign", "ROIPool"), "RoI feature extractor")
    num_conv: int = _at_least(4, 0)
    conv_dim: int = _at_least(256, 1)
    norm: str = _choice("", NORMS, "normalisation in the head's convs")
    class_agnostic: bool = False
    target_aligned: bool = True  # how bitmap ground truth is cropped into 28x28 targets
    target_sampling_ratio: int = 0
    target_binarize: bool = True
    paste_style: str = _choice("detectron2", ("torchvision", "detectron2"), "how masks are pasted into the image")
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
    pooler_type: str = _choice("ROIAlign", ("ROIAlign", "ROIPool"), "RoI feature extractor")
    conv_dims: tuple[int, ...] = _positive((512,) * 8)  # the paper's eight 3x3 conv-512 layers
    up_scale: int = _at_least(2, 1)  # bilinear upsampling after the stride-2 deconv: 14 -> 28 -> 56
    loss_weight: float = _at_least(1.0, 0.0)
    loss_normalizer: str = _choice("visible", ("visible", "fixed"), "mean over labelled keypoints, or a fixed count")
    score: str = _choice("logit", ("logit", "softmax"), "keypoints_scores: peak logit (torchvision) or probability")
    oks_sigmas: tuple[float, ...] = _positive(())  # per keypoint, for OKS AP; () = COCO person's (needs 17 keypoints)
    pixel_convention: str = _choice("torchvision", ("torchvision", "detectron2"),
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
    mask_mode: str = _choice("last", ("last", "per_stage"), "one mask head (detectron2) or one per stage, averaged")


@dataclass
class ModelConfig:
    architecture: str = _choice("FPN", ("FPN", "C4"), "FPN (P2-P6) or the paper's res4/res5 C4 model")
    mask_on: bool = True
    keypoint_on: bool = False
    box_decode_float32: bool = False  # detectron2 decodes boxes in float32 even in float64 (matters only there)
    channels_last: bool = True  # NHWC feature maps: ~25% faster convolutions on CPU (oneDNN) and tensor cores
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
    on_bad_sample: str = _choice("skip", ("skip", "error"), "skip (and report) or stop at a bad image/annotation")
    mask_format: str = _choice("polygon", ("polygon", "bitmap"), "keep polygons as polygons, or rasterise")
    flip_prob: float = _between(0.5, 0.0, 1.0)  # horizontal flip in training (keypoints swap left/right by their names)
    # keypoint models: train only on images with this many labelled keypoints
    min_keypoints_per_image: int = _at_least(0, 0)
    num_workers: int = _at_least(2, 0)
    aspect_ratio_grouping: bool = True
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
    schedule: str = _choice("step", ("step", "cosine"), "learning rate decay after warm-up")
    steps: tuple[int, ...] = _at_least((60000, 80000), 1)  # "step": multiply by gamma at each (increasing)
    gamma: float = _positive(0.1)
    warmup_iters: int = _at_least(1000, 0)
    warmup_factor: float = _between(0.001, 0.0, 1.0)  # lr starts at base_lr * warmup_factor, grows linearly
    clip_grad_norm: float = _at_least(0.0, 0.0)  # 0 disables
    amp: str = _choice("", ("", "bf16", "fp16"), "mixed precision: bf16 (CPU or GPU) or fp16 (GPU)")


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


# -- conversion ------------------------------------------------------------------------------------
def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            if alt is type(None) and value is None:
                return None
            try:
                return _coerce(value, alt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"config key '{key}': bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _numbers(value: Any) -> list:
    """The numbers of a value: itself, or those of a (nested) list."""
    return [v for item in value for v in _numbers(item)] if isinstance(value, tuple) else [value]


def _check_choice(f: dataclasses.Field, value: Any, key: str) -> None:
    """The allowed values or range a field declares (``_choice``, ``_at_least``, ``_above``, ``_between``);
    a range applies to every number of a list (anchor sizes, per-stage IoUs ...)."""
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
    m = f.metadata
    # `not x >= low` rather than `x < low`: NaN fails every comparison and so every bound
    for v in _numbers(value):
        name, got = (f"'{key}' values", f"got {v!r} in {_to_plain(value)!r}") if isinstance(value, tuple) \
            else (f"'{key}'", f"got {v!r}")
        if "max" in m and not m["min"] <= v <= m["max"]:
            low = "" if m["min"] == float("-inf") else f"at least {m['min']} and "
            raise ConfigError(f"config key {name} must be {low}at most {m['max']}, {got}")
        if "below" in m and not m["min"] <= v < m["below"]:
            raise ConfigError(f"config key {name} must be at least {m['min']} and below {m['below']}, {got}")
        if "min" in m and not v >= m["min"]:
            raise ConfigError(f"config key {name} must be at least {m['min']}, {got}")
        if "above" in m and not v > m["above"]:
            raise ConfigError(f"config key {name} must be greater than {m['above']}, {got}")


def check_config(cfg: Config) -> Config:
    """The checks that involve several keys (each key's own range is checked when it is set): run on
    a finished config, since overrides arrive one at a time and may pass through inconsistent states."""
    s, i, m, d = cfg.solver, cfg.model.input, cfg.model, cfg.data
    if any(b <= a for a, b in zip(s.steps, s.steps[1:])):
        raise ConfigError(f"config key 'solver.steps' must be increasing, got {list(s.steps)}")
    if s.schedule == "step" and s.steps and s.steps[-1] > s.max_iter:
        # legitimate (a short run of a long recipe, as detectron2 allows), but rarely meant: say so
        warnings.warn(f"config key 'solver.steps' {list(s.steps)} goes beyond solver.max_iter={s.max_iter}: the "
                      f"learning rate will not decay at those steps (scale them with max_iter, or set "
                      f"solver.schedule=cosine)", stacklevel=2)
    for phase in ("train", "test"):
        low = max(_numbers(getattr(i, f"min_size_{phase}")))
        if getattr(i, f"max_size_{phase}") < low:
            raise ConfigError(f"config key 'model.input.max_size_{phase}' ({getattr(i, f'max_size_{phase}')}) must "
                              f"be at least model.input.min_size_{phase} ({low})")
    for head in ("rpn", "roi_heads"):
        h = getattr(m, head)
        if h.bg_iou_thresh > h.fg_iou_thresh:
            raise ConfigError(f"config key 'model.{head}.bg_iou_thresh' ({h.bg_iou_thresh}) must not exceed "
                              f"model.{head}.fg_iou_thresh ({h.fg_iou_thresh})")
    if d.shapes_max_radius < d.shapes_min_radius:
        raise ConfigError(f"config key 'data.shapes_max_radius' ({d.shapes_max_radius}) must be at least "
                          f"data.shapes_min_radius ({d.shapes_min_radius})")
    return cfg


def _from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {sorted(fields)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            value = _from_dict(tp, v, key, base=getattr(obj, k))
        else:
            value = _coerce(v, tp, key)
        _check_choice(fields[k], value, key)
        setattr(obj, k, value)
    return obj


def merge(cfg: Config, data: dict) -> Config:
    """A copy of ``cfg`` with the (nested) values of ``data`` applied, each checked."""
    import copy

    return _from_dict(Config, data, "", base=copy.deepcopy(cfg))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``["model.roi_heads.score_thresh=0.3", ...]`` (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(raw)
        cfg = merge(cfg, nested)
    return cfg


def load_yaml(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    base_name = data.pop("_base_", None)
    if base_name is None:
        base = Config()
    elif str(base_name) in PRESETS:
        base = PRESETS[str(base_name)]()
    else:
        base = load_yaml((path.parent / str(base_name)) if not Path(str(base_name)).is_absolute() else base_name)
    try:
        return merge(base, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# -- presets ---------------------------------------------------------------------------------------
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


def get_config(name: str, overrides: list[str] | None = None) -> Config:
    """A preset by name (``list(PRESETS)``) or a YAML file path, with optional ``key=value`` overrides."""
    if name in PRESETS:
        cfg = PRESETS[name]()
    elif name.endswith((".yaml", ".yml")) or Path(name).is_file():
        cfg = load_yaml(name)
    else:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        raise ConfigError(f"unknown config {name!r}: not a preset or a YAML file"
                          + (f"; did you mean {close}?" if close else f"; presets: {sorted(PRESETS)}"))
    return check_config(apply_overrides(cfg, overrides or []))
