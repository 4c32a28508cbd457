"""COCO evaluation through pycocotools (or faster-coco-eval, the same numbers faster, when it is
installed): the standard 12-number summary and per-class AP.

Predictions (labels 1..K, boxes in original image pixels, masks bool) are converted to COCO's
results format with the dataset's own category ids (through the :class:`ClassMap`), optionally
gathered from all processes, written to ``<output_dir>/coco_<type>_results.json`` and scored by
``COCOeval``; the numbers are pycocotools' own (faster-coco-eval's equal them: tested).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from maskrcnn.data.coco import ClassMap, DatasetError, keypoint_offset

SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_SUMMARY = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def instances_to_coco(output: dict[str, Tensor], image_id: int, class_map: ClassMap,
                      keypoint_convention: str = "torchvision") -> list[dict]:
    """One image's predictions -> COCO result dicts (``bbox`` XYWH, ``segmentation`` RLE, ``keypoints``).

    Keypoints go back to the file's pixel indices: the inverse of the dataset's ``keypoint_convention``
    (detectron2's ``instances_to_coco_json`` subtracts the 0.5 its loader added)."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rles = None
    if "masks" in output and len(labels):
        from pycocotools import mask as mask_utils

        masks = output["masks"][:, 0] if output["masks"].dim() == 4 else output["masks"]
        masks = masks >= 0.5 if masks.is_floating_point() else masks.bool()
        arr = np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
        rles = mask_utils.encode(arr)
    keypoints = None
    if "keypoints" in output:
        kp = output["keypoints"].detach().float().cpu().clone()
        kp[..., :2] -= keypoint_offset(keypoint_convention)
        keypoints = kp.flatten(1).tolist()
    results = []
    for k in range(len(labels)):
        r = {"image_id": int(image_id), "category_id": class_map.category_id(labels[k]), "bbox": xywh[k],
             "score": scores[k]}
        if rles is not None:
            r["segmentation"] = {"size": [int(v) for v in rles[k]["size"]], "counts": rles[k]["counts"].decode("ascii")}
        if keypoints is not None:
            r["keypoints"] = keypoints[k]
        results.append(r)
    return results


def instances_to_detections(output: dict[str, Tensor], class_map: ClassMap) -> list[dict]:
    """One image's predictions as COCO results without ``image_id`` and with each ``class_name``:
    the detections of a video frame's JSON line and of the server's answer."""
    results = instances_to_coco(output, 0, class_map)
    for r, label in zip(results, output["labels"].tolist()):
        del r["image_id"]
        r["class_name"] = class_map.name(label)
    return results


BACKENDS = ("auto", "pycocotools", "faster-coco-eval")


def coco_api(backend: str = "auto"):
    """``(COCO, COCOeval)`` classes: pycocotools', or faster-coco-eval's (a compiled reimplementation of
    the same computation, several times faster on large sets: ``benchmarks/coco_eval.py``; tests check
    that its numbers equal pycocotools'). ``auto``: faster-coco-eval when it is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"evaluation backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "pycocotools":
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster
        except ImportError:
            if backend == "faster-coco-eval":
                from maskrcnn._extras import MissingExtra

                raise MissingExtra("the faster-coco-eval backend needs the 'faster-coco-eval' package, which is not "
                                   "installed: pip install faster-coco-eval") from None
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


# beside the results files: the ids of the images an evaluation scored (a limit or unreadable images
# leave some out)
EVALUATED_IMAGES = "evaluated_image_ids.json"


def coco_ground_truth(COCO, ground_truth: str | Path | dict):
    """A ``COCO`` index of an annotation file, or of its contents already read (and cleaned:
    ``CocoDataset.evaluation_ground_truth``), for pycocotools' class or faster-coco-eval's."""
    if not isinstance(ground_truth, dict):
        return COCO(str(ground_truth))
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    return coco


def _per_class_ap(coco_eval, class_map: ClassMap) -> dict[str, float]:
    precision = coco_eval.eval["precision"]  # (iou thresholds, recall points, classes, areas, max dets)
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = class_map.names[class_map.ids.index(cat_id)] if cat_id in class_map else str(cat_id)
        out[name] = float(p.mean()) if p.size else float("nan")
    return out


class COCOEvaluator:
    """Accumulate predictions with :meth:`process`, then :meth:`evaluate` (rank 0 returns the numbers).

    ``ground_truth``: the annotation file's contents to score against instead of ``json_path``'s
    (``CocoDataset.evaluation_ground_truth``: without what the dataset left out).
    ``keypoint_convention``: the one the dataset was read with (``CocoDataset.keypoint_convention``),
    so that predicted keypoints are written in the file's coordinates.
    """

    def __init__(self, json_path: str | Path, class_map: ClassMap, iou_types: Sequence[str] = ("bbox", "segm"),
                 output_dir: str | Path | None = None, oks_sigmas: Sequence[float] = (),
                 keypoint_convention: str = "torchvision", backend: str = "auto",
                 ground_truth: dict | None = None) -> None:
        COCO, self._cocoeval = coco_api(backend)
        keypoint_offset(keypoint_convention)  # a bad name fails here, not after the whole inference
        self.keypoint_convention = keypoint_convention
        self.json_path = Path(json_path)
        with _quiet():
            self.coco = coco_ground_truth(COCO, ground_truth if ground_truth is not None else self.json_path)
        self.oks_sigmas = np.asarray(oks_sigmas, dtype=np.float64) if len(oks_sigmas) else None
        if "keypoints" in iou_types:
            k = len(class_map.keypoint_names)
            if self.oks_sigmas is None and k != 17:
                raise ValueError(f"{json_path}: OKS needs one sigma per keypoint; pycocotools' defaults are COCO "
                                 f"person's 17, this dataset has {k}: set model.keypoint_head.oks_sigmas")
            if self.oks_sigmas is not None and len(self.oks_sigmas) != k:
                raise ValueError(f"{len(self.oks_sigmas)} OKS sigmas for {k} keypoints")
            # pycocotools reads every ground truth's keypoints and num_keypoints (an instance without
            # labelled keypoints is ignored); files often omit both: filled in memory, the file untouched
            for ann in self.coco.anns.values():
                if ann.get("keypoints") is None:
                    ann["keypoints"] = [0] * (3 * k)
                if "num_keypoints" not in ann:
                    ann["num_keypoints"] = int(np.count_nonzero(np.asarray(ann["keypoints"][2::3]) > 0))
        self.class_map = class_map
        self.iou_types = tuple(iou_types)
        self.output_dir = Path(output_dir) if output_dir else None
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.skipped: list[int] = []

    def reset(self) -> None:
        self.results, self.image_ids, self.skipped = [], [], []

    def process(self, outputs: Sequence[dict[str, Tensor]], image_ids: Sequence[int]) -> None:
        for out, image_id in zip(outputs, image_ids):
            self.results.extend(instances_to_coco(out, image_id, self.class_map, self.keypoint_convention))
            self.image_ids.append(int(image_id))

    def skip(self, image_id: int) -> None:
        """An image that could not be evaluated: left out of the scoring (not counted as all misses)."""
        self.skipped.append(int(image_id))

    def _gather(self) -> tuple[list[dict], list[int], list[int]]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.results, self.image_ids, self.skipped
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.results, self.image_ids, self.skipped))
        return ([r for res, _, _ in gathered for r in res], [i for _, ids, _ in gathered for i in ids],
                [i for _, _, ids in gathered for i in ids])

    def evaluate(self) -> dict[str, dict]:
        """``{"bbox": {"AP": ..., (12 numbers), "per_class": {name: AP}}, "segm": {...},
        "images": {"evaluated": n, "skipped": m}}`` (empty on ranks > 0). Only the images given to
        :meth:`process` are scored, so a partial run (a limit, a shard, skipped images) is not
        penalised for the images it never saw."""
        import torch.distributed as dist

        results, image_ids, skipped = self._gather()
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return {}
        if skipped and not image_ids:
            raise DatasetError(f"{self.json_path}: none of the {len(skipped)} images could be read")
        metrics: dict[str, dict] = {}
        if self.output_dir is not None:  # which images were scored: the error analysis looks at those alone
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / EVALUATED_IMAGES).write_text(json.dumps(sorted(set(image_ids))))
        for iou_type in self.iou_types:
            res = [r for r in results if iou_type != "segm" or "segmentation" in r]
            res = [r for r in res if iou_type != "keypoints" or "keypoints" in r]
            if self.output_dir is not None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / f"coco_{iou_type}_results.json").write_text(json.dumps(res))
            names = KEYPOINT_SUMMARY if iou_type == "keypoints" else SUMMARY
            if not res:  # pycocotools cannot load an empty result list: nothing detected is AP 0
                metrics[iou_type] = {n: 0.0 for n in names} | {"per_class": {n: 0.0 for n in self.class_map.names}}
                continue
            with _quiet():
                # loadRes adds id/area/iscrowd to the dicts it is given: copies keep them out of the
                # results files written for the next IoU type
                dt = self.coco.loadRes([dict(r) for r in res])
                ev = self._cocoeval(self.coco, dt, iou_type)
                ev.params.imgIds = sorted(set(image_ids))
                if iou_type == "keypoints" and self.oks_sigmas is not None:
                    ev.params.kpt_oks_sigmas = self.oks_sigmas
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            metrics[iou_type] = {n: float(v) for n, v in zip(names, ev.stats)}
            metrics[iou_type]["per_class"] = _per_class_ap(ev, self.class_map)
        metrics["images"] = {"evaluated": len(set(image_ids)), "skipped": len(set(skipped))}
        return metrics


def format_metrics(metrics: dict[str, dict]) -> str:
    """A plain-text table of the summaries and per-class AP (values in %)."""
    lines = []
    for iou_type, m in metrics.items():
        if iou_type == "images":
            lines.append(f"images: {m['evaluated']} evaluated" + (f", {m['skipped']} skipped (unreadable, see the "
                                                                  f"warnings)" if m["skipped"] else ""))
            continue
        names = [n for n in m if n != "per_class"]
        lines.append(f"{iou_type}: " + "  ".join(f"{n} {100 * m[n]:.1f}" for n in names))
        if m.get("per_class"):
            # nan: a class without ground truth among the scored images has no AP (COCO leaves it out of the mean)
            lines.append("  per class AP: " + ", ".join(f"{k} {100 * v:.1f}" if v == v else f"{k} n/a (no instances)"
                                                         for k, v in m["per_class"].items()))
    return "\n".join(lines)
