"""What a model gets wrong: a confusion matrix, precision-recall curves, and an error breakdown in
the manner of TIDE (Bolya et al., ECCV 2020), for boxes or masks, from COCO ground truth and COCO
results (what ``maskrcnn eval`` writes).

Matching, per image and class, is COCO's: detections by descending score each take the unmatched
ground truth of their class with the highest IoU >= ``fg_iou`` (0.5); a detection on a crowd region
is ignored, neither right nor wrong. Every other detection is a false positive of one kind, in this
order of precedence, from its IoUs with all ground truth of the image:

- **duplicate**: IoU >= fg with a ground truth of its class that a higher-scored detection matched;
- **classification**: IoU >= fg with a ground truth of another class;
- **localisation**: its class, ``bg_iou`` (0.1) <= IoU < fg;
- **both**: another class, bg <= IoU < fg;
- **background**: IoU < bg with every ground truth.

A ground truth that no detection matched is **missed** unless a classification, localisation or
both error points at it (its best-overlapping false positive). As in TIDE, each kind is weighed by
how much AP50 would rise if it were fixed by an oracle: duplicates and background and both errors
removed, classification errors given their ground truth's class, localisation errors its geometry,
missed objects removed from the ground truth. AP50 here is the mean over classes of COCO's
101-point interpolated precision at IoU 0.5, all areas, up to ``max_dets`` per image: pycocotools'
AP50 on the same data (a test checks it).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

ERROR_KINDS = ("classification", "localisation", "both", "duplicate", "background", "missed")
RECALL_POINTS = np.linspace(0, 1, 101)


@dataclass
class Instance:
    label: int  # category id
    geometry: object  # [x, y, w, h] or an RLE dict
    score: float = 1.0
    crowd: bool = False


@dataclass
class ImageMatches:
    """One image: ground truth, detections, and what became of each."""
    gts: list[Instance]
    dets: list[Instance]
    det_gt: list[int] = field(default_factory=list)  # per detection: the ground truth it matched, or -1
    det_kind: list[str] = field(default_factory=list)  # "tp", "ignored", or an error kind
    det_target: list[int] = field(default_factory=list)  # the ground truth an error points at, or -1
    gt_missed: list[bool] = field(default_factory=list)


def _iou(dets: list[Instance], gts: list[Instance]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou([d.geometry for d in dets], [g.geometry for g in gts],
                                     [int(g.crowd) for g in gts]), dtype=np.float64).reshape(len(dets), len(gts))


def match_image(gts: list[Instance], dets: list[Instance], fg_iou: float = 0.5, bg_iou: float = 0.1) -> ImageMatches:
    """COCO's matching of one image, then the kind of every false positive and the missed objects."""
    order = sorted(range(len(dets)), key=lambda k: -dets[k].score)
    dets = [dets[k] for k in order]
    iou = _iou(dets, gts)
    m = ImageMatches(gts, dets, [-1] * len(dets), ["tp"] * len(dets), [-1] * len(dets), [False] * len(gts))
    taken = [False] * len(gts)
    by_crowd = sorted(range(len(gts)), key=lambda g: gts[g].crowd)  # crowd regions last, as in pycocotools
    for d, det in enumerate(dets):
        best, threshold = -1, min(fg_iou, 1 - 1e-10)
        for g in by_crowd:
            if gts[g].label != det.label or (taken[g] and not gts[g].crowd):
                continue
            if best >= 0 and not gts[best].crowd and gts[g].crowd:
                break  # a real object matched: crowd regions are only a fallback
            if iou[d, g] < threshold:
                continue
            best, threshold = g, iou[d, g]
        if best >= 0:
            m.det_gt[d] = best
            if gts[best].crowd:
                m.det_kind[d] = "ignored"
            else:
                taken[best] = True
    real = [g for g, gt in enumerate(gts) if not gt.crowd]
    for d, det in enumerate(dets):
        if m.det_gt[d] >= 0:
            continue
        same = [g for g in real if gts[g].label == det.label]
        other = [g for g in real if gts[g].label != det.label]
        best_same = max(same, key=lambda g: iou[d, g], default=-1)
        best_other = max(other, key=lambda g: iou[d, g], default=-1)
        iou_same = iou[d, best_same] if best_same >= 0 else 0.0
        iou_other = iou[d, best_other] if best_other >= 0 else 0.0
        if iou_same >= fg_iou:
            m.det_kind[d], m.det_target[d] = "duplicate", best_same
        elif iou_other >= fg_iou:
            m.det_kind[d], m.det_target[d] = "classification", best_other
        elif iou_same >= bg_iou:
            m.det_kind[d], m.det_target[d] = "localisation", best_same
        elif iou_other >= bg_iou:
            m.det_kind[d], m.det_target[d] = "both", best_other
        else:
            m.det_kind[d] = "background"
    pointed = {m.det_target[d] for d in range(len(dets)) if m.det_kind[d] in ("classification", "localisation", "both")}
    m.gt_missed = [not gt.crowd and not taken[g] and g not in pointed for g, gt in enumerate(gts)]
    return m


def top_per_class(dets: list[Instance], max_dets: int) -> list[Instance]:
    """The ``max_dets`` best-scored detections of each class (pycocotools' maxDets is per image and class)."""
    kept: dict[int, list[Instance]] = defaultdict(list)
    for det in sorted(dets, key=lambda d: -d.score):
        if len(kept[det.label]) < max_dets:
            kept[det.label].append(det)
    return [d for ds in kept.values() for d in ds]


def average_precision(images: list[tuple[list[Instance], list[Instance]]], categories: list[int],
                      fg_iou: float = 0.5, max_dets: int = 100) -> dict[int, float]:
    """Per category id: COCO's 101-point interpolated AP at ``fg_iou`` (-1 without ground truth)."""
    scores: dict[int, list[float]] = defaultdict(list)
    hits: dict[int, list[bool]] = defaultdict(list)
    positives: dict[int, int] = defaultdict(int)
    for gts, dets in images:
        for g in gts:
            positives[g.label] += not g.crowd
        # matching is per class already (a detection only takes ground truth of its class)
        m = match_image(gts, top_per_class(dets, max_dets), fg_iou)
        for d, kind in zip(m.dets, m.det_kind):
            if kind != "ignored":
                scores[d.label].append(d.score)
                hits[d.label].append(kind == "tp")
    ap = {}
    for c in categories:
        if positives[c] == 0:
            ap[c] = -1.0
            continue
        order = np.argsort(-np.asarray(scores[c]), kind="mergesort")
        tp = np.asarray(hits[c], dtype=np.float64)[order]
        tps, fps = np.cumsum(tp), np.cumsum(1 - tp)
        recall = tps / positives[c]
        precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
        # precision made monotone from the right, then read at each recall point
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        at = np.searchsorted(recall, RECALL_POINTS, side="left")
        ap[c] = float(np.mean([precision[i] if i < len(precision) else 0.0 for i in at]))
    return ap


def mean_ap(ap: dict[int, float]) -> float:
    valid = [v for v in ap.values() if v >= 0]
    return float(np.mean(valid)) if valid else -1.0


def error_breakdown(images: list[tuple[list[Instance], list[Instance]]], categories: list[int],
                    fg_iou: float = 0.5, bg_iou: float = 0.1, max_dets: int = 100) -> dict:
    """Counts of each error kind and the AP50 gained by fixing each (``ERROR_KINDS``)."""
    matches = [match_image(gts, top_per_class(dets, max_dets), fg_iou, bg_iou) for gts, dets in images]
    counts = {k: 0 for k in ERROR_KINDS}
    for m in matches:
        for kind in m.det_kind:
            if kind in counts:
                counts[kind] += 1
        counts["missed"] += sum(m.gt_missed)
    base = mean_ap(average_precision([(m.gts, m.dets) for m in matches], categories, fg_iou, max_dets))
    gains = {}
    for kind in ERROR_KINDS:
        fixed = [_fix(m, kind) for m in matches]
        gains[kind] = mean_ap(average_precision(fixed, categories, fg_iou, max_dets)) - base
    return {"ap50": base, "counts": counts, "delta_ap50": gains}


def _fix(m: ImageMatches, kind: str) -> tuple[list[Instance], list[Instance]]:
    """The image with every error of ``kind`` corrected by an oracle. A corrected classification or
    localisation error whose object a hit already found (or a better-scored corrected error) would
    now be a duplicate: the oracle suppresses it, as TIDE does, so that a fix never lowers AP."""
    if kind == "missed":
        return [g for g, missed in zip(m.gts, m.gt_missed) if not missed], m.dets
    found = {m.det_gt[d] for d in range(len(m.dets)) if m.det_kind[d] == "tp"}
    dets = []
    for d, det in enumerate(m.dets):  # best score first
        if m.det_kind[d] != kind:
            dets.append(det)
        elif kind in ("classification", "localisation"):
            target = m.det_target[d]
            if target in found:
                continue
            found.add(target)
            gt = m.gts[target]
            dets.append(Instance(gt.label, det.geometry, det.score) if kind == "classification"
                        else Instance(det.label, copy.deepcopy(gt.geometry), det.score))
        # duplicate, both, background: removed
    return m.gts, dets


def confusion_matrix(images: list[tuple[list[Instance], list[Instance]]], categories: list[int],
                     fg_iou: float = 0.5, score_thresh: float = 0.5) -> np.ndarray:
    """``(K + 1, K + 1)`` counts: rows the true class (last: background), columns the predicted one
    (last: none). Detections with score >= ``score_thresh`` take, best score first, the unmatched
    non-crowd ground truth of any class with the highest IoU >= ``fg_iou``; those left over count as
    background predictions, the ground truth left over as missed; detections on crowd regions count
    nowhere."""
    index = {c: i for i, c in enumerate(categories)}
    k = len(categories)
    cm = np.zeros((k + 1, k + 1), dtype=np.int64)
    for gts, dets in images:
        dets = sorted([d for d in dets if d.score >= score_thresh], key=lambda d: -d.score)
        real = [g for g in gts if not g.crowd]
        crowd = [g for g in gts if g.crowd]
        iou, crowd_iou = _iou(dets, real), _iou(dets, crowd)
        taken = np.zeros(len(real), dtype=bool)
        for d, det in enumerate(dets):
            candidates = np.where(~taken & (iou[d] >= fg_iou))[0] if len(real) else np.array([], dtype=int)
            if len(candidates):
                g = candidates[np.argmax(iou[d, candidates])]
                taken[g] = True
                cm[index[real[g].label], index[det.label]] += 1
            elif not (len(crowd) and crowd_iou[d].max() >= fg_iou):
                cm[k, index[det.label]] += 1
        for g, gt in enumerate(real):
            if not taken[g]:
                cm[index[gt.label], k] += 1
    return cm


def pr_curves(coco_eval) -> dict[float, np.ndarray]:
    """From an evaluated pycocotools ``COCOeval``: ``{0.5: (K, 101), 0.75: (K, 101)}`` precision at
    COCO's recall points, all areas, the largest maxDets (-1 where a class has no ground truth)."""
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
    thresholds = list(np.round(coco_eval.params.iouThrs, 2))
    return {t: precision[thresholds.index(t), :, :, 0, -1].T.copy() for t in (0.5, 0.75)}
