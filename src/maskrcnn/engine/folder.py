"""Predict on many image files with decoding, inference and drawing overlapped.

``predict_files`` decodes images in a thread pool ahead of the model (a bounded window), runs them
through the predictor ``batch_size`` at a time, and draws and saves the overlays in a second pool
while the model works on the next batch. PIL's decoding and PNG encoding and torch's kernels release
the GIL, so the stages run at the same time; the windows keep memory bounded for any number of files.
Results keep the order of ``paths``; unreadable files are reported and skipped.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from maskrcnn.data.transforms import BadImageError
from maskrcnn.engine.predictor import to_image_tensor
from maskrcnn.evaluation.coco_eval import instances_to_coco
from maskrcnn.visualize import draw_detections

KEYS = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")


@dataclass
class FilesResult:
    """What ``predict_files`` did: the JSON it wrote, how many images it predicted, which it skipped
    (one line each, with the reason) and the wall time."""
    json_path: Path
    predicted: int
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0


def overlay_names(paths: Sequence[Path]) -> list[str]:
    """A PNG name per path: the file's stem, with the parent folders prefixed where stems collide
    (``a/0001.jpg`` and ``b/0001.jpg`` -> ``a_0001.png``, ``b_0001.png``), then a counter."""
    stems = Counter(p.stem for p in paths)
    names = [p.stem if stems[p.stem] == 1 else f"{p.parent.name}_{p.stem}".lstrip("_") for p in paths]
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return [f"{n}.png" for n in out]


def _decode(path: Path):
    try:
        return to_image_tensor(path)
    except BadImageError as e:  # reported and skipped; anything else is a bug and propagates
        return e


def _sliced_to_coco(out: dict, keep: list[bool], image_id: int, file_name: str, class_map) -> list[dict]:
    """COCO results of a ``Predictor.predict_sliced`` output (masks: its whole-image RLEs)."""
    results = []
    rles = out.get("masks_rle")
    for k, kept in enumerate(keep):
        if not kept:
            continue
        x1, y1, x2, y2 = out["boxes"][k].tolist()
        r = {"image_id": image_id, "category_id": class_map.category_id(int(out["labels"][k])),
             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(out["scores"][k]), "file_name": file_name}
        if rles is not None:
            r["segmentation"] = {"size": [int(v) for v in rles[k]["size"]], "counts": rles[k]["counts"].decode("ascii")}
        results.append(r)
    return results


def predict_files(predictor, paths: Sequence[Path], out_dir: Path, score_thresh: float = 0.5, batch_size: int = 1,
                  workers: int = 2, progress: bool = True, slice_tile: int = 0, slice_overlap: float = 0.2
                  ) -> FilesResult:
    """Overlay PNGs and a COCO-results ``predictions.json`` (``image_id`` = position in ``paths`` + 1,
    ``file_name`` = the path) for ``paths`` in ``out_dir``.

    ``batch_size`` images go through the model together: faster on a GPU, but a batch pads its
    images to a common size, so results can differ slightly from one image at a time (as in
    torchvision and detectron2). 1 (the default) gives each image's own results.

    ``slice_tile`` > 0: each image window by window (``Predictor.predict_sliced``; ``batch_size``
    windows per model call), for images much larger than the model's input size.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be at least 1, got {batch_size} and {workers}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = overlay_names(paths)
    class_map = predictor.class_map
    results: list[dict] = []
    skipped: list[str] = []
    predicted = 0
    start = time.perf_counter()

    def draw(image, sel: dict, name: str) -> None:
        draw_detections(image, sel, class_map).save(out_dir / name)

    ahead = batch_size + 2 * workers  # decoded images waiting for the model
    no_bar = not progress or not sys.stderr.isatty()
    with ThreadPoolExecutor(workers) as decoders, ThreadPoolExecutor(workers) as drawers, \
            tqdm(total=len(paths), desc="predicting", unit="img", disable=no_bar, leave=False) as bar:
        pending: deque[tuple[int, Future]] = deque()
        drawing: deque[Future] = deque()
        queued = 0

        def fill() -> None:
            nonlocal queued
            while queued < len(paths) and len(pending) < ahead:
                pending.append((queued, decoders.submit(_decode, paths[queued])))
                queued += 1

        fill()
        while pending:
            batch: list[tuple[int, object]] = []
            while pending and len(batch) < batch_size:
                k, future = pending.popleft()
                image = future.result()
                fill()
                if isinstance(image, BadImageError):
                    skipped.append(str(image))
                    bar.update(1)
                else:
                    batch.append((k, image))
            if not batch:
                continue
            if slice_tile:
                outputs = [predictor.predict_sliced(image, slice_tile, slice_overlap, batch_size) for _, image in batch]
            else:
                outputs = predictor.predict([image for _, image in batch])
            for (k, image), out in zip(batch, outputs):
                keep = out["scores"] >= score_thresh
                sel = {key: out[key][keep] for key in KEYS if key in out}
                if slice_tile:
                    results += _sliced_to_coco(out, keep.tolist(), k + 1, str(paths[k]), class_map)
                    sel["mask_crops"] = [c for c, kept in zip(out.get("mask_crops", []), keep.tolist()) if kept]
                else:
                    for r in instances_to_coco(sel, k + 1, class_map):
                        r["file_name"] = str(paths[k])
                        results.append(r)
                drawing.append(drawers.submit(draw, image, sel, names[k]))
                predicted += 1
                bar.update(1)
            while len(drawing) > 2 * workers:  # bounded: overlays do not pile up in memory
                drawing.popleft().result()
        for future in drawing:
            future.result()
    json_path = out_dir / "predictions.json"
    json_path.write_text(json.dumps(results))
    return FilesResult(json_path, predicted, skipped, time.perf_counter() - start)
