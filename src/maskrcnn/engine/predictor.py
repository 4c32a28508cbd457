"""``Predictor``: load a checkpoint once, then predict on image files, PIL images, arrays or tensors.

Outputs carry the dataset's own category ids and class names (from the checkpoint's class map)
next to the model's labels, so predictions can be written straight into COCO results.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from maskrcnn._malloc import keep_freed_memory
from maskrcnn.config import Config, merge
from maskrcnn.data.coco import ClassMap
from maskrcnn.data.transforms import load_image, rgb_array
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.device import resolve_device
from maskrcnn.interop.checkpoint import CheckpointError
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.detector import MaskRCNN
from maskrcnn.modeling.inference import prepare_for_inference
from maskrcnn.structures.precision import fast_precision

ImageLike = str | Path | Image.Image | np.ndarray | Tensor


def config_of(state: dict) -> Config:
    """The full config stored in a checkpoint (unknown keys are errors, as everywhere)."""
    return merge(Config(), state["config"])


def to_image_tensor(image: ImageLike) -> Tensor:
    """Any supported image -> ``(3, H, W)`` RGB: uint8 from files and PIL images (EXIF orientation
    honoured in both, so that a file gives the same detections opened or named) and uint8/uint16
    arrays (16 bits scaled to 8, as for files); float arrays stay float and must be in 0-1 (the model
    refuses other ranges); tensors pass through."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):  # 16-bit and float modes scaled as in files, not saturated
        # (a turned image has lost its orientation tag: turning it again is a no-op)
        return torch.from_numpy(rgb_array(ImageOps.exif_transpose(image))).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"an image array must be (H, W, 3) RGB, got shape {image.shape}")
        arr = image[:, :, :3]
        if arr.dtype == np.uint16:  # 16-bit pixels scaled to 8 bits, as 16-bit image files are read
            arr = np.round(arr.astype(np.float32) * (255 / 65535)).astype(np.uint8)
        elif arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"an image array must be uint8 (0-255), uint16 (0-65535) or float (0-1), got {arr.dtype}")
        # a copy unless writable and contiguous: torch warns about read-only arrays (np.asarray of a PIL image)
        arr = arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)
        t = torch.from_numpy(arr).permute(2, 0, 1)
        return t if arr.dtype == np.uint8 else t.float()  # a float outside 0-1 is the model's to refuse
    if isinstance(image, Tensor):
        return image
    raise TypeError(f"cannot read an image from {type(image).__name__}")


class Predictor:
    """Predict with a trained checkpoint.

    Args:
        checkpoint: a file written by ``maskrcnn train`` or ``maskrcnn convert``.
        device: "auto", "cpu", "cuda", ...
        overrides: dotted config overrides for inference, e.g. ``["model.roi_heads.score_thresh=0.5"]``.
        config: a preset or YAML describing the model of ``checkpoint`` when that is a detectron2
            (``.pkl``, or ``.pth`` with a ``detectron2_*`` preset) or torchvision file: it is
            converted on the fly, with COCO's class map (or ``classes``).
        classes: the class names and ids to report instead of the checkpoint's: a :class:`ClassMap`
            or a file (see :meth:`ClassMap.from_file`), with as many classes as the model.
        runtime: ``"torch"`` (the default) runs a checkpoint, or an ExportedProgram (``.pt2``);
            ``"onnxruntime"`` or ``"openvino"`` (CPU) runs an ONNX file written by
            ``maskrcnn export`` (``maskrcnn.export.runtime``), with the same outputs.
        fast: run the network's layers in bf16 (``model.precision=bf16``; fp16 on a GPU without
            bf16): several times faster on a CPU with bf16 units (AMX, avx512_bf16) and on GPUs;
            geometry stays float32. A CPU without bf16 units would emulate it, up to hundreds of times
            slower, so there the layers stay float32, with a warning that says so.
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", overrides: Sequence[str] = (),
                 config: str | None = None, classes: str | Path | ClassMap | None = None,
                 runtime: str | None = None, fast: bool = False) -> None:
        from maskrcnn.config import apply_overrides, get_config

        self.device = resolve_device(device)
        if fast:
            if Path(checkpoint).suffix in (".onnx", ".pt2"):
                raise ValueError(f"fast mode runs a checkpoint in bf16; {checkpoint} is an exported float32 graph")
            precision, why_not = fast_precision(self.device)
            if why_not:
                warnings.warn(why_not, stacklevel=2)
            overrides = [*overrides, f"model.precision={precision}"]

        if classes is not None and not isinstance(classes, ClassMap):
            classes = ClassMap.from_file(classes)
        keep_freed_memory()  # no page faults for each new tensor (maskrcnn/_malloc.py)
        if Path(checkpoint).suffix in (".onnx", ".pt2"):
            self._load_exported(checkpoint, runtime, overrides, config, classes)
            return
        if runtime not in (None, "torch"):
            raise ValueError(f"--runtime {runtime} runs an exported model (.onnx); export {checkpoint} first: "
                             f"maskrcnn export --weights {checkpoint} --format onnx --output model.onnx")
        if config:
            from maskrcnn.interop.external import load_external

            self.cfg = get_config(config, list(overrides))
            self.model: MaskRCNN = build_model(self.cfg)
            self.class_map = load_external(self.model, checkpoint, self.cfg, config, classes=classes)
        else:
            state = load_checkpoint(checkpoint)
            self.cfg = apply_overrides(config_of(state), list(overrides))
            self.class_map = ClassMap.from_dict(state["classes"])
            if self.cfg.model.roi_heads.num_classes != self.class_map.num_classes:
                raise ValueError(f"{checkpoint}: config has {self.cfg.model.roi_heads.num_classes} classes but the "
                                 f"class map {self.class_map.num_classes}")
            if classes is not None:
                given = classes.fit(self.class_map.num_classes, "--classes")
                # names and ids are replaced; the keypoints stay the model's unless the file names them
                self.class_map = given if given.keypoint_names else ClassMap(
                    given.ids, given.names, self.class_map.keypoint_names, self.class_map.skeleton)
            self.model = build_model(self.cfg)
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError as e:  # a --set that changes the architecture (depth, head convs, ...)
                mismatch = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
                raise CheckpointError(
                    f"{checkpoint}: its weights do not fit the model its config describes"
                    + (f" with --set {' '.join(overrides)}" if overrides else "") + f" ({mismatch}); --set may "
                    "change inference settings, not the architecture") from None
        prepare_for_inference(self.model.to(self.device))

    def _load_exported(self, path: str | Path, runtime: str | None, overrides: Sequence[str], config: str | None,
                       classes: ClassMap | None) -> None:
        from maskrcnn.export.runtime import ExportedModel

        if overrides or config:
            raise ValueError(f"{path} is an exported model: its settings are fixed in the graph (export again "
                             "with --set to change them); --set and --config do not apply")
        self.model = ExportedModel(path, runtime, str(self.device))  # type: ignore[assignment]
        meta = self.model.metadata
        # the config the graph was exported from (settings only: the graph holds the weights), read
        # where this version knows every key; eval then finds the data as for a checkpoint
        try:
            self.cfg = config_of(meta) if "config" in meta else None
        except ValueError:
            self.cfg = None
        if "classes" not in meta:
            raise ValueError(f"{path} holds no class map; export it with 'maskrcnn export'")
        self.class_map = ClassMap.from_dict(meta["classes"])
        if classes is not None:
            self.class_map = classes.fit(self.class_map.num_classes, "--classes")

    def __call__(self, image: ImageLike) -> dict:
        return self.predict([image])[0]

    @torch.no_grad()
    def predict_sliced(self, image: ImageLike, tile: int = 640, overlap: float = 0.2, batch_size: int = 4) -> dict:
        """A large image window by window (``engine.slicing``): ``boxes, scores, labels`` as
        :meth:`predict`, the masks as ``mask_crops`` (per detection ``(x0, y0, bool array)``) and
        ``masks_rle`` (COCO RLE of the whole image, built from the crops), ``category_ids`` and
        ``class_names``. Memory grows with the objects found, not with the image."""
        from maskrcnn.engine.slicing import predict_sliced

        tensor = to_image_tensor(image).to(self.device)
        det = predict_sliced(self.model, tensor, tile, overlap, batch_size)
        labels = det.labels.tolist()
        out = {"boxes": det.boxes, "scores": det.scores, "labels": det.labels, "image_size": det.image_size,
               "category_ids": [self.class_map.category_id(v) for v in labels],
               "class_names": [self.class_map.name(v) for v in labels]}
        if det.masks is not None:
            out["mask_crops"] = det.masks
            out["masks_rle"] = [det.rle(k) for k in range(len(det))]
        return out

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike]) -> list[dict]:
        """Per image: ``boxes, scores, labels, masks`` as the model returns them, plus
        ``category_ids`` (the dataset's ids) and ``class_names``."""
        tensors = [to_image_tensor(im).to(self.device) for im in images]
        outputs = self.model(tensors)
        for out in outputs:
            labels = out["labels"].tolist()
            out["category_ids"] = [self.class_map.category_id(v) for v in labels]
            out["class_names"] = [self.class_map.name(v) for v in labels]
        return outputs
