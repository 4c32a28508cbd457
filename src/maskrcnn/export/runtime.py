"""Run an exported detector (``.onnx`` or ``.pt2``) with the output dicts of the eager model.

``ExportedModel(path, runtime)`` takes a list of ``(3, H, W)`` images like ``MaskRCNN`` in eval mode
and returns, per image, ``boxes (D, 4)``, ``scores``, ``labels`` and, as present, ``masks (D, 1, H, W)``
(pasted here when the file holds the 28x28 ``mask_probs``), ``keypoints (D, K, 3)`` and
``keypoints_scores (D, K)``, as torch tensors. Runtimes: ``"torch"`` (an ExportedProgram),
``"onnxruntime"`` and ``"openvino"`` (an ONNX file; OpenVINO on the CPU only).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from maskrcnn.export.exporter import EXPORT_EXTRA, METADATA_KEY, require
from maskrcnn.modeling.preprocess import ImagePreprocessor
from maskrcnn.structures.masks import paste_masks_in_image

RUNTIMES = ("torch", "onnxruntime", "openvino")
EXPORTED_SUFFIXES = (".onnx", ".pt2")


def default_runtime(path: str | Path) -> str:
    return "torch" if Path(path).suffix == ".pt2" else "onnxruntime"


def batch_images(images: Sequence[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """``(3, H, W)`` uint8 (or 0-1 float) images -> ``(N, Hmax, Wmax, 3)`` uint8 and ``(N, 2)`` sizes.

    The eager model's input checks apply (``ImagePreprocessor.check_images``), so that an image it
    refuses (4 channels, uint16, float outside 0-1) is refused here too rather than answered.
    """
    arrays = []
    images = ImagePreprocessor.check_images(images)
    for im in images:
        if im.is_floating_point():  # the graph takes uint8, as images are stored
            im = (im.clamp(0, 1) * 255).round().to(torch.uint8)
        arrays.append(im.permute(1, 2, 0).cpu().numpy())
    sizes = np.array([a.shape[:2] for a in arrays], dtype=np.int64)
    batch = np.zeros((len(arrays), int(sizes[:, 0].max()), int(sizes[:, 1].max()), 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        batch[i, : a.shape[0], : a.shape[1]] = a
    return batch, sizes


@contextmanager
def unreadable(path: Path, what: str):
    """A runtime's failure to parse ``path`` (truncated, corrupt, a newer IR version, not a model)
    as a one-line ValueError that names the file; the runtime's own reason follows."""
    quiet = logging.getLogger("torch.export")  # torch.export.load logs a traceback before raising
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        yield
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not {what}: {_reason(e)}") from e
    except Exception as e:  # onnxruntime's own error classes (InvalidProtobuf, Fail, ...) derive from Exception
        if type(e).__module__.startswith("onnxruntime"):
            raise ValueError(f"{path} is not {what}: {_reason(e)}") from e
        raise
    finally:
        quiet.setLevel(level)


def _reason(e: BaseException) -> str:
    # the last line: OpenVINO's first lines name its own source files, its last one the reason
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


class ExportedModel:
    """An exported detector behind the eager model's call signature (module docstring).

    Args:
        path: ``.onnx`` (onnxruntime or OpenVINO) or ``.pt2`` (torch).
        runtime: one of ``RUNTIMES``; ``None`` picks by the file's suffix.
        device: ``"cpu"`` or ``"cuda"`` (onnxruntime's CUDA provider, or torch).
        threads: intra-op threads for onnxruntime/OpenVINO (``None``: the runtime's default).
    """

    def __init__(self, path: str | Path, runtime: str | None = None, device: str = "cpu",
                 threads: int | None = None) -> None:
        path = Path(path)
        runtime = runtime or default_runtime(path)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if not path.is_file():
            raise FileNotFoundError(f"exported model not found: {path}")
        if path.suffix not in EXPORTED_SUFFIXES:
            raise ValueError(f"{path}: an exported model is a .onnx or .pt2 file written by 'maskrcnn export'")
        if runtime == "torch" and path.suffix != ".pt2":
            raise ValueError(f"{path}: the torch runtime runs an ExportedProgram (.pt2); run ONNX with "
                             "--runtime onnxruntime or openvino")
        if runtime != "torch" and path.suffix != ".onnx":
            raise ValueError(f"{path}: the {runtime} runtime runs an ONNX file; run a .pt2 with --runtime torch")
        self.path, self.runtime, self.device = path, runtime, torch.device(device)
        self._run = getattr(self, f"_load_{runtime}")(path, threads)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    # -- loading -------------------------------------------------------------------------------
    def _load_torch(self, path: Path, threads: int | None):
        import maskrcnn.export  # noqa: F401  (registers the custom ops the program calls)

        extra = {"maskrcnn.json": ""}
        with unreadable(path, "an ExportedProgram (.pt2) written by 'maskrcnn export'"):
            program = torch.export.load(str(path), extra_files=extra)
        if not extra["maskrcnn.json"]:
            raise ValueError(f"{path} is not an ExportedProgram written by 'maskrcnn export' (no maskrcnn.json)")
        self.metadata = json.loads(extra["maskrcnn.json"])
        module = program.module().to(self.device)

        def run(images: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                out = module(torch.from_numpy(images).to(self.device), torch.from_numpy(sizes).to(self.device))
            return [t.cpu().numpy() for t in out]
        return run

    def _load_onnxruntime(self, path: Path, threads: int | None):
        ort = require("onnxruntime", "The onnxruntime runtime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else \
            ["CPUExecutionProvider"]
        with unreadable(path, "an ONNX file that onnxruntime can load"):
            session = ort.InferenceSession(str(path), options, providers=providers)
        meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ValueError(f"{path} is an ONNX file but not one written by 'maskrcnn export' (no '{METADATA_KEY}' "
                             "metadata)")
        self.metadata = json.loads(meta)
        names = self.metadata["outputs"]
        return lambda images, sizes: session.run(names, {"images": images, "image_sizes": sizes})

    def _load_openvino(self, path: Path, threads: int | None):
        ov = require("openvino", "The openvino runtime")
        if self.device.type != "cpu":
            raise ValueError(f"the openvino runtime runs on the CPU here, not {self.device}; use --runtime "
                             "onnxruntime for CUDA")
        core = ov.Core()
        with unreadable(path, "an ONNX file that OpenVINO can read"):
            model = core.read_model(str(path))
        key = ["framework", METADATA_KEY]  # where OpenVINO keeps the ONNX file's metadata
        if not model.has_rt_info(key):
            raise ValueError(f"{path} is an ONNX file but not one written by 'maskrcnn export' (no '{METADATA_KEY}' "
                             "metadata)")
        self.metadata = json.loads(model.get_rt_info(key).astype(str))
        # float32 throughout: OpenVINO would otherwise run the network in bf16 on CPUs that have it
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(model, "CPU", config)
        names = self.metadata["outputs"]

        def run(images: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
            out = compiled({"images": images, "image_sizes": sizes})
            by_name = {port.any_name: value for port, value in out.items()}
            return [by_name[n] for n in names]
        return run

    # -- inference -------------------------------------------------------------------------------
    training = False

    def eval(self) -> ExportedModel:
        return self

    def train(self, mode: bool = True) -> ExportedModel:
        if mode:
            raise ValueError(f"{self.path} is an exported model: it cannot be trained")
        return self

    @property
    def coco_types(self) -> list[str]:
        """The COCO result types of the predictions, as ``MaskRCNN.coco_types``."""
        outputs = self.metadata["outputs"]
        return ["bbox"] + (["segm"] if "masks" in outputs or "mask_probs" in outputs else []) + \
            (["keypoints"] if "keypoints" in outputs else [])

    def to(self, device: torch.device | str) -> ExportedModel:
        if torch.device(device).type != self.device.type:
            raise ValueError(f"this exported model was loaded for {self.device}; load it again with device={device!r}")
        return self

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        batch, sizes = batch_images(images)
        outputs = dict(zip(self.metadata["outputs"], self._run(batch, sizes)))
        results = []
        for i, (h, w) in enumerate(sizes.tolist()):
            n = int(outputs["num_detections"][i])
            r = {k: torch.from_numpy(np.ascontiguousarray(outputs[k][i, :n])) for k in ("boxes", "scores", "labels")}
            r["labels"] = r["labels"].long()
            if "masks" in outputs:
                r["masks"] = torch.from_numpy(np.ascontiguousarray(outputs["masks"][i, :n, :h, :w]))[:, None]
            elif "mask_probs" in outputs:
                probs = torch.from_numpy(np.ascontiguousarray(outputs["mask_probs"][i, :n]))
                threshold = self.metadata["mask_threshold"]
                r["masks"] = paste_masks_in_image(probs, r["boxes"], (h, w), self.metadata["paste_style"],
                                                  threshold if threshold >= 0 else None)[:, None]
            if "keypoints" in outputs:
                r["keypoints"] = torch.from_numpy(np.ascontiguousarray(outputs["keypoints"][i, :n]))
                r["keypoints_scores"] = torch.from_numpy(np.ascontiguousarray(outputs["keypoints_scores"][i, :n]))
            results.append(r)
        return results


__all__ = ["ExportedModel", "RUNTIMES", "EXPORT_EXTRA", "default_runtime", "batch_images"]
