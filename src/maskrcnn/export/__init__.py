"""Export of a detector to ONNX, ExportedProgram and TorchScript-free deployment runtimes.

Importing this package registers the ``maskrcnn::nms`` and ``maskrcnn::roi_align`` ops that an
exported program contains (``ops.py``).
"""

from maskrcnn.export import ops  # noqa: F401  (registers the custom ops)
