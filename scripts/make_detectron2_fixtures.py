"""Write the detectron2 parity fixtures of ``tests/fixtures/detectron2`` (run by hand, not in CI).

Needs an environment where ``import detectron2`` works (install it yourself; this repository does
not build or ship it). For Mask R-CNN R50-FPN, Cascade Mask R-CNN R50-FPN and Keypoint R-CNN
R50-FPN it builds detectron2's model with small widths (so a checkpoint is a few hundred KB), gives
it seeded random weights (norm statistics and biases included, predictors spread so that classes,
masks and keypoints vary), saves them in detectron2's zoo ``.pkl`` layout, runs detectron2 in
float64 on one image (already at the test size: no resize on either side) with score threshold 0
so that many detections reach the heads, and saves its outputs.

    python scripts/make_detectron2_fixtures.py [--out tests/fixtures/detectron2]

Each fixture is ``<name>.pkl`` (weights), ``<name>.json`` (our preset and overrides describing the
same model) and ``<name>_outputs.pth`` (detectron2's boxes, scores, classes, masks as COCO RLE, keypoints).
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = (256, 320)  # (H, W): the short side equals MIN_SIZE_TEST, so neither library resizes

# our names for detectron2's small-width config keys
SMALL = {
    "MODEL.RESNETS.STEM_OUT_CHANNELS": (8, "model.backbone.stem_channels"),
    "MODEL.RESNETS.RES2_OUT_CHANNELS": (16, "model.backbone.res2_channels"),
    "MODEL.RESNETS.WIDTH_PER_GROUP": (4, "model.backbone.width_per_group"),
    "MODEL.FPN.OUT_CHANNELS": (16, "model.fpn.out_channels"),
    "MODEL.ROI_BOX_HEAD.FC_DIM": (32, "model.box_head.fc_dim"),
    "MODEL.ROI_MASK_HEAD.CONV_DIM": (16, "model.mask_head.conv_dim"),
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS": ((16,) * 8, "model.keypoint_head.conv_dims"),
}

FIXTURES = {
    # name: (detectron2 config file, our preset, number of classes)
    "mask_rcnn_R_50_FPN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "detectron2_mask_rcnn_R_50_FPN_3x", 5),
    "cascade_mask_rcnn_R_50_FPN": ("Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml", "detectron2_cascade_mask_rcnn_R_50_FPN_3x", 5),
    "keypoint_rcnn_R_50_FPN": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml", "detectron2_keypoint_rcnn_R_50_FPN_3x", 1),
}


def fixture_image(seed: int = 0) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB: smooth colour fields with bright rectangles and discs."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    low = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR)).astype(np.float64)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(8):
        cy, cx, r = rng.uniform(20, h - 20), rng.uniform(20, w - 20), rng.uniform(10, 60)
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2) if rng.random() < 0.5 else \
            ((abs(yy - cy) < r) & (abs(xx - cx) < r * rng.uniform(0.5, 1.5)))
        img[inside] = rng.uniform(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


def config_path(name: str) -> Path:
    """A zoo config file: in the installed package (pip) or next to it (a source checkout)."""
    import detectron2

    pkg = Path(detectron2.__file__).parent
    for root in (pkg / "model_zoo" / "configs", pkg.parent / "configs"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"detectron2 config {name} not found near {pkg}")


def build(config_file: str, num_classes: int, seed: int):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(config_path(config_file)))
    for key, (value, _) in SMALL.items():
        cfg.merge_from_list([key, value])
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = SIZE[0], 512
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "anchor" in name or "pixel_" in name:
                continue
            if name.endswith("running_var") or (t.dim() == 1 and ".norm." in name and name.endswith("weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif "cls_score" in name or "predictor" in name or "score_lowres" in name:
                # spread the predictions: several classes, masks neither empty nor full, peaked heatmaps
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return cfg, model


def calibrate_norms(model, image) -> None:
    """Set every frozen BN's statistics to those of its input on ``image`` (one forward pass, each
    layer normalised before the next sees it), so that random convolutions neither vanish nor
    explode through the 50 layers and the heads see well-scaled features."""
    from detectron2.layers import FrozenBatchNorm2d

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.backbone(model.preprocess_image([{"image": image}]).tensor)
    for h in hooks:
        h.remove()


def allow_float64() -> None:
    """detectron2 runs its NMS on ``boxes.float()`` with the scores as they come, which torchvision
    refuses in a float64 model; give it float32 scores too (the NMS decisions stay detectron2's:
    on float32 boxes). Nothing else is changed."""
    import torchvision
    from detectron2.modeling.proposal_generator import proposal_utils
    from detectron2.modeling.roi_heads import fast_rcnn

    def batched_nms(boxes, scores, idxs, iou_threshold):
        return torchvision.ops.batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)

    proposal_utils.batched_nms = fast_rcnn.batched_nms = batched_nms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/detectron2")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    allow_float64()
    rgb = fixture_image()
    Image.fromarray(rgb).save(out / "image.png")
    for i, (name, (config_file, preset, num_classes)) in enumerate(FIXTURES.items()):
        cfg, model = build(config_file, num_classes, seed=100 + i)
        bgr = torch.from_numpy(rgb[:, :, ::-1].copy()).permute(2, 0, 1)
        calibrate_norms(model, bgr)
        weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        with (out / f"{name}.pkl").open("wb") as f:
            pickle.dump({"model": weights, "__author__": "maskrcnn test fixture"}, f)
        model = model.double()
        with torch.no_grad():
            inst = model([{"image": bgr, "height": SIZE[0], "width": SIZE[1]}])[0]["instances"]
        result = {"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "classes": inst.pred_classes}
        if inst.has("pred_masks"):  # as COCO RLE: a few KB instead of megabytes of bitmaps
            from pycocotools import mask as mask_utils

            rles = mask_utils.encode(np.asfortranarray(inst.pred_masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
            result["masks_rle"] = [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
                                   for r in rles]
        if inst.has("pred_keypoints"):
            result["keypoints"] = inst.pred_keypoints
        torch.save(result, out / f"{name}_outputs.pth")
        overrides = [f"{ours}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for v, ours in SMALL.values()]
        overrides += [f"model.roi_heads.num_classes={num_classes}", "model.roi_heads.score_thresh=0.0",
                      f"model.input.min_size_test={SIZE[0]}", "model.input.max_size_test=512"]
        (out / f"{name}.json").write_text(json.dumps({"preset": preset, "overrides": overrides}, indent=1))
        print(f"{name}: {len(inst)} detections, {(out / f'{name}.pkl').stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
