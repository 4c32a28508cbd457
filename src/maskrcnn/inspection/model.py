"""What a trained model sees in one image, stage by stage: the RPN's best proposals, the detections
before and after the box head's NMS, the 28x28 mask of each detection before it is pasted, and, for
an image of a dataset, the 28x28 mask targets its ground truth gives the mask head in training.

Nothing here changes the model: the stages are read with forward hooks, and "before NMS" is the same
model run once more with the NMS threshold above 1 (nothing suppressed) and no cap on detections.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from maskrcnn._pyplot import pyplot
from maskrcnn.visualize import draw_instances


def _to_original(boxes: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    sy, sx = original[0] / resized[0], original[1] / resized[1]
    return boxes.float() * boxes.new_tensor([sx, sy, sx, sy]).float()


@torch.no_grad()
def model_stages(model, image: Tensor) -> dict:
    """Proposals (original pixels, best first), final detections with their 28x28 ``mask_probs``,
    and the detections above the score threshold before NMS."""
    seen: dict = {}

    def rpn_hook(module, args, output):
        seen["proposals"], seen["resized"] = output[0][0], tuple(int(v) for v in args[2][0])

    def heads_hook(module, args, output):
        seen["heads"] = output[0][0]

    hooks = [model.rpn.register_forward_hook(rpn_hook), model.roi_heads.register_forward_hook(heads_hook)]
    try:
        final = model([image])[0]
        stages = {"resized": seen["resized"], "detections": final,
                  "mask_probs": seen["heads"].get("mask_probs")}
        original = (int(image.shape[-2]), int(image.shape[-1]))
        stages["proposals"] = _to_original(seen["proposals"], seen["resized"], original)
        heads = model.roi_heads
        saved = heads.nms_thresh, heads.detections_per_image
        heads.nms_thresh, heads.detections_per_image = 1.01, 100_000  # an IoU never exceeds 1: nothing suppressed
        try:
            model([image])
        finally:
            heads.nms_thresh, heads.detections_per_image = saved
        before = seen["heads"]
        stages["before_nms"] = {"boxes": _to_original(before["boxes"], seen["resized"], original),
                                "scores": before["scores"], "labels": before["labels"]}
    finally:
        for h in hooks:
            h.remove()
    return stages


def _mask_grid(masks: Tensor, titles: list[str], path: Path, title: str, limit: int = 36) -> None:
    plt = pyplot()
    n = min(len(titles), limit)
    cols = min(6, max(n, 1))
    rows = max(1, -(-n // cols))
    # at least 8 inches wide, so that the title of a few tiles is not cut
    fig, axes = plt.subplots(rows, cols, figsize=(max(8.0, 2 * cols), 2.2 * rows + 0.5), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(masks[k].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(titles[k], fontsize=8)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title + (f" (first {limit} of {len(titles)})" if len(titles) > limit else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inspect_model(model, image: Tensor, class_map, out_dir: Path, top_proposals: int = 50,
                  target: dict | None = None, mask_target_fn=None) -> str:
    """Write the pictures of ``model_stages`` for ``image`` (``(3, H, W)`` uint8) into ``out_dir``;
    with ``target`` (a dataset sample's) and ``mask_target_fn(target, M) -> (G, M, M)``, also the mask
    targets. Returns a short report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = model_stages(model, image)
    name = class_map.name
    # boxes are many: outlines only, on the image enlarged so that small images stay readable
    zoom = max(1, 640 // max(image.shape[-2:]))
    big = torch.nn.functional.interpolate(image[None].float(), scale_factor=zoom, mode="nearest")[0].to(torch.uint8)
    proposals = stages["proposals"][:top_proposals]
    draw_instances(big, proposals * zoom, [0] * len(proposals), [""] * len(proposals), text=False,
                   width=1).save(out_dir / "proposals.png")
    before = stages["before_nms"]
    labels = before["labels"].tolist()
    draw_instances(big, before["boxes"] * zoom, labels, [name(v) for v in labels], text=False, width=1).save(
        out_dir / "detections_before_nms.png")
    final = stages["detections"]
    labels = final["labels"].tolist()
    titles = [f"{name(v)} {s:.2f}" for v, s in zip(labels, final["scores"].tolist())]
    masks = final.get("masks")
    if masks is not None and zoom > 1:
        masks = torch.nn.functional.interpolate(masks.float(), scale_factor=zoom, mode="nearest") > 0.5
    keypoints = final.get("keypoints")
    if keypoints is not None:
        keypoints = torch.cat([keypoints[..., :2] * zoom, keypoints[..., 2:]], dim=-1)
    draw_instances(big, final["boxes"] * zoom, labels, [name(v) for v in labels], final["scores"].tolist(), masks,
                   keypoints=keypoints, skeleton=class_map.skeleton).save(out_dir / "detections.png")
    lines = [f"resized to {stages['resized'][1]}x{stages['resized'][0]} (WxH) for the network",
             f"RPN: {len(stages['proposals'])} proposals (the best {len(proposals)} in proposals.png)",
             f"box head: {len(before['boxes'])} detections above the score threshold before NMS "
             f"(detections_before_nms.png, coloured by class), {len(final['labels'])} after (detections.png)"]
    if stages["mask_probs"] is not None:
        _mask_grid(stages["mask_probs"], titles, out_dir / "masks_28x28.png",
                   "each detection's mask in its box, before pasting")
        lines.append("masks_28x28.png: the mask head's output per detection, before it is pasted into the image")
    if target is not None and mask_target_fn is not None and len(target["labels"]):
        tgt_labels = target["labels"].tolist()
        size = stages["mask_probs"].shape[-1] if stages["mask_probs"] is not None else 28
        _mask_grid(mask_target_fn(target, size), [name(v) for v in tgt_labels], out_dir / "mask_targets.png",
                   "what the mask head learns for each ground-truth box")
        lines.append("mask_targets.png: the 28x28 training targets of the image's ground truth")
    report = "\n".join(lines)
    (out_dir / "model_report.txt").write_text(report + "\n")
    return report
