"""The allowed values of the config's string (and choice) fields: one home, imported by the config's
schema and by the modules that implement each choice."""

NORMS = ("", "FrozenBN", "BN", "SyncBN", "GN")
CHANNEL_ORDERS = ("RGB", "BGR")
RESIZE_STYLES = ("torchvision", "detectron2")
RESNET_DEPTHS = (18, 34, 50, 101, 152)
ANCHOR_STYLES = ("torchvision", "detectron2")
LOSS_NORMALIZERS = ("batch", "sampled")
POOLER_TYPES = ("ROIAlign", "ROIPool")
PASTE_STYLES = ("torchvision", "detectron2")
KEYPOINT_LOSS_NORMALIZERS = ("visible", "fixed")
KEYPOINT_SCORES = ("logit", "softmax")
KEYPOINT_CONVENTIONS = ("torchvision", "detectron2")
CASCADE_MASK_MODES = ("last", "per_stage")
ARCHITECTURES = ("FPN", "C4")
BAD_SAMPLE_POLICIES = ("skip", "error")
MASK_FORMATS = ("polygon", "bitmap")
SCHEDULES = ("step", "cosine")
AMP_MODES = ("", "bf16", "fp16")
PRECISIONS = ("float32", "bf16", "fp16")
BEST_METRICS = ("auto", "segm/AP", "bbox/AP", "keypoints/AP", "val_loss", "none")
TENSORBOARD_MODES = ("auto", "always", "never")  # not on/off: YAML reads those as booleans
