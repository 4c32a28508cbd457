"""``export_model``: a detector to an ONNX file or a ``torch.export`` ExportedProgram (``.pt2``).

Both hold the whole ``DeployableDetector`` graph (``graph.py``): any batch size, any image size,
preprocessing and postprocessing included, with the class names, category ids and output layout
stored next to the graph (ONNX metadata ``maskrcnn``; the ``.pt2``'s extra file ``maskrcnn.json``),
so that a runtime needs nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from maskrcnn._extras import require as require_extra
from maskrcnn.export.graph import DeployableDetector, UnsupportedExport
from maskrcnn.modeling.detector import MaskRCNN

FORMATS = ("onnx", "exported-program")
EXPORT_EXTRA = "pip install 'maskrcnn[export]'"
METADATA_KEY = "maskrcnn"
FORMAT_VERSION = 1


# TorchScript is deliberately not written: torch.jit is deprecated (torch 2.13's trace warns "switch to
# torch.compile or torch.export"), and tracing cannot follow this graph, whose sizes (resize frame,
# detection count) are computed from the data: the trace fails, or would fix them as constants.
TORCHSCRIPT_REFUSAL = ("TorchScript is not offered: PyTorch deprecates it (torch.jit.trace says 'switch to "
                       "torch.compile or torch.export'), and a trace cannot follow the image sizes and detection "
                       "counts this graph computes from the data. Use --format exported-program (.pt2, "
                       "torch.export.load) or --format onnx (onnxruntime from Python, C++, C#, Java or JavaScript)")


def check_format(format: str) -> None:
    """An :class:`UnsupportedExport` naming the problem unless ``format`` is one of ``FORMATS``."""
    if format == "torchscript":
        raise UnsupportedExport(TORCHSCRIPT_REFUSAL)
    if format not in FORMATS:
        raise UnsupportedExport(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")


def require(module: str, purpose: str):
    """Import an optional dependency of the export extra or say which pip line installs it."""
    return require_extra(module, purpose, EXPORT_EXTRA)


def _example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes: a batch of 1 or a size that divides evenly would let the
    exporter specialise on it."""
    images = torch.zeros((2, 97, 131, 3), dtype=torch.uint8)
    images[:, 20:60, 30:90] = 200
    return images, torch.tensor([[97, 131], [83, 70]])


def export_program(model: MaskRCNN, masks: str = "pasted") -> torch.export.ExportedProgram:
    """The ``DeployableDetector`` of ``model`` recorded by ``torch.export`` with dynamic batch and size."""
    from torch.export import Dim

    if model.dtype != torch.float32:
        model = copy.deepcopy(model).float()
    graph = DeployableDetector(model, masks).eval()
    batch, height, width = Dim("batch", min=1, max=1024), Dim("height", min=1, max=32768), Dim("width", min=1, max=32768)
    with torch.no_grad():
        return torch.export.export(graph, _example_inputs(), strict=False,
                                   dynamic_shapes=({0: batch, 1: height, 2: width}, {0: batch}))


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give the file to write, e.g. {path / 'model.onnx'}")
    if not path.parent.exists():
        raise ValueError(f"--output {path}: the folder {path.parent} does not exist")
    if not path.parent.is_dir():
        raise ValueError(f"--output {path}: {path.parent} is a file, not a folder")
    # a file created and removed: os.access says yes to root even where writing fails (/sys, read-only mounts)
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--output {path}: cannot write in the folder {path.parent} ({e.strerror})") from None
    return path


def export_model(model: MaskRCNN, path: str | Path, format: str = "onnx", masks: str = "pasted",
                 metadata: dict | None = None) -> Path:
    """Write ``model`` (eval mode is used) to ``path`` as ``format`` (``FORMATS``); returns the path.

    ``metadata`` (class names, category ids, ...) is stored with the graph. The file is written
    atomically: an interrupted export leaves no partial file.
    """
    check_format(format)
    path = check_output_path(path)
    if format == "onnx":
        require("onnx", "ONNX export")
        require("onnxscript", "ONNX export")
    was_training = model.training
    model.eval()
    try:
        program = export_program(model, masks)
    finally:
        model.train(was_training)
    return save_program(program, path, format, graph_metadata(model, masks, metadata))


def graph_metadata(model: MaskRCNN, masks: str, metadata: dict | None = None) -> dict:
    """What a runtime needs besides the graph: output names and layout, and ``metadata`` (classes)."""
    outputs = DeployableDetector(model, masks).output_names
    return dict(metadata or {}, format_version=FORMAT_VERSION, inputs=["images", "image_sizes"], outputs=outputs,
                masks=masks if "masks" in outputs or "mask_probs" in outputs else None,
                paste_style=model.paste_style, mask_threshold=model.mask_threshold)


def save_program(program: torch.export.ExportedProgram, path: str | Path, format: str, meta: dict) -> Path:
    """Write an ``export_program`` result atomically as ``format`` with ``meta`` (``graph_metadata``)."""
    path = Path(path)
    # the temporary name keeps the suffix: torch.export.save warns about a file not named *.pt2
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        # torch's own deprecation notices and its note about weights not on the CPU (ours are) say
        # nothing to the user about the file written
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            if format == "exported-program":
                torch.export.save(program, tmp, extra_files={"maskrcnn.json": json.dumps(meta)})
            else:
                _write_onnx(program, tmp, meta["outputs"], meta)
        # mkstemp makes the file private (0600); give it the mode a plain open() would (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_onnx(program: torch.export.ExportedProgram, path: str, output_names: list[str], meta: dict) -> None:
    import logging

    import onnx

    from maskrcnn.export.onnx_ops import OPSET, translation_table

    # the exporter warns that torchvision's ops have no translation: we use our own
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=translation_table(),
                                     opset_version=OPSET, input_names=["images", "image_sizes"],
                                     output_names=output_names, verbose=False)
    proto = onnx_program.model_proto
    _name_dimensions(proto.graph)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, path)


def _name_dimensions(graph) -> None:
    """Rename the exporter's size symbols (``s34``, ``u8``) to what they are: ``batch``, ``height``,
    ``width`` (of ``images``) and ``detections`` (the outputs' second axis), so that tools showing
    the inputs and outputs (Netron, onnxruntime's ``get_inputs()``) say what to feed and expect.
    Every shape in the graph is renamed alike: intermediate shapes are expressions of the symbols."""
    import re

    def symbol(value, axis: int) -> str:
        dims = value.type.tensor_type.shape.dim
        return dims[axis].dim_param if axis < len(dims) else ""

    images, first_output = graph.input[0], graph.output[0]
    renames = {symbol(images, 0): "batch", symbol(images, 1): "height", symbol(images, 2): "width",
               symbol(first_output, 1): "detections"}
    renames = {old: new for old, new in renames.items() if re.fullmatch(r"[a-z]+\d+", old)}
    taken = {d.dim_param for v in (*graph.input, *graph.output, *graph.value_info)
             for d in v.type.tensor_type.shape.dim}
    if len(renames) != 4 or any(new in taken for new in renames.values()):
        return  # an exporter that names them otherwise: leave its names
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: renames[m.group(1)], dim.dim_param)
