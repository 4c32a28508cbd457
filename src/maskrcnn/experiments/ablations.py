"""The paper's ablations as data: each table's variants (config overrides) and the numbers the
papers report for them, so that ``maskrcnn ablate`` can train ours and print both side by side.

Sources (read from the papers' text): Mask R-CNN (He et al., arXiv 1703.06870v3) Table 2 (COCO
minival mask AP) and Table 3 (test-dev box AP), and its section 4.2 for class-agnostic masks;
Cascade Mask R-CNN vs Mask R-CNN with ResNet-50-FPN from the Cascade authors' Detectron port
(zhaoweicai/Detectron-Cascade-RCNN, 1x schedule, minival); Faster R-CNN (Ren et al., arXiv
1506.01497) section 3.2, which reports no number for end-to-end ("approximate joint") training,
only that it gave "close results" in 25-50% less time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()
    # the paper's (AP, AP50, AP75) for this variant in the table's metric; None where it gives none
    paper: tuple[float, float | None, float | None] | None = None


@dataclass(frozen=True)
class Ablation:
    key: str
    title: str
    source: str  # where the paper numbers come from, and on what
    metric: str  # "segm" or "bbox": the AP the table compares
    reference: str  # the variant the others are compared with (the paper's choice)
    variants: tuple[Variant, ...]
    note: str = ""  # what to expect on the synthetic data, and why
    base: tuple[str, ...] = field(default=())  # overrides shared by the table's variants


C4 = ("model.architecture=C4", "model.anchors.sizes=[[16, 32, 64, 128, 256]]", "model.mask_head.num_conv=0",
      "model.box_head.pooler_resolution=14", "model.rpn.pre_nms_topk_train=2000", "model.rpn.pre_nms_topk_test=1000")

ABLATIONS: tuple[Ablation, ...] = (
    Ablation(
        "roi_pooling", "RoI feature extraction: RoIAlign vs RoIWarp vs RoIPool",
        "Mask R-CNN Table 2c, ResNet-50-C4, COCO minival mask AP (RoIWarp and RoIAlign: their average-pooled rows; "
        "RoIPool: max, its only row)", "segm", "RoIAlign",
        (Variant("RoIAlign", (), (30.3, 51.2, 31.5)),
         Variant("RoIWarp", ("model.box_head.pooler_type=ROIWarp", "model.mask_head.pooler_type=ROIWarp"),
                 (27.1, 48.9, 27.1)),
         Variant("RoIPool", ("model.box_head.pooler_type=ROIPool", "model.mask_head.pooler_type=ROIPool"),
                 (26.9, 48.8, 26.4))),
        "the paper's gain grows with the IoU threshold (AP75 +5.1 over RoIPool, AP50 +2.4) and with the stride "
        "(C5, stride 32: +7.3 AP); on FPN most of our objects pool from P2 (stride 4), where rounding to a cell "
        "moves a box by at most 2 pixels, so expect a smaller gap than the paper's C4 (stride 16): --arch c4"),
    Ablation(
        "mask_loss", "Mask loss: per-class sigmoid vs softmax over classes",
        "Mask R-CNN Table 2b, ResNet-50-C4, COCO minival mask AP", "segm", "sigmoid",
        (Variant("sigmoid", (), (30.3, 51.2, 31.5)),
         Variant("softmax", ("model.mask_head.loss=softmax",), (24.8, 44.1, 25.1))),
        "the softmax makes the mask head classify every pixel as well as segment it, so masks suffer wherever "
        "the classes are confused (early in training, or alike); the sigmoid leaves classes to the box head"),
    Ablation(
        "mask_class", "Masks: class-specific vs class-agnostic",
        "Mask R-CNN section 4.2, ResNet-50-C4, COCO minival mask AP (AP only)", "segm", "class-specific",
        (Variant("class-specific", (), (30.3, None, None)),
         Variant("class-agnostic", ("model.mask_head.class_agnostic=true",), (29.7, None, None))),
        "the paper finds them nearly equal (-0.6); a class-agnostic mask does not depend on the class being "
        "right, which helps while the classifier still confuses the classes (short budgets)"),
    Ablation(
        "mask_head", "Mask branch: FCN vs MLP",
        "Mask R-CNN Table 2e, ResNet-50-FPN, COCO minival mask AP", "segm", "FCN",
        (Variant("FCN", (), (33.6, 55.2, 35.3)),
         Variant("MLP", ("model.mask_head.head=mlp", "model.mask_head.mlp_dims=[256, 256]"), (31.5, 53.7, 32.8))),
        "the MLP must learn every pixel's place from scratch; widths scaled like the rest of the CPU model "
        "(fc 256-256 for the paper's 1024-1024)"),
    Ablation(
        "backbone", "Backbone: FPN vs C4",
        "Mask R-CNN Table 2a, ResNet-50, COCO minival mask AP", "segm", "FPN",
        (Variant("FPN", (), (33.6, 55.2, 35.3)),
         Variant("C4", C4, (30.3, 51.2, 31.5))),
        "C4 pools every RoI from res4 (stride 16) and runs res5 on each: more head per RoI; FPN's gain on COCO is "
        "largest on small objects, which the shapes (32-88 px in 192-px images) do not have"),
    Ablation(
        "multitask", "Multi-task training: does the mask branch help the boxes?",
        "Mask R-CNN Table 3, ResNet-101-FPN, COCO test-dev box AP (Faster R-CNN with RoIAlign vs Mask R-CNN)",
        "bbox", "with masks",
        (Variant("with masks", (), (38.2, 60.3, 41.7)),
         Variant("boxes only", ("model.mask_on=false",), (37.3, 59.6, 40.3))),
        "the paper's gain is +0.9 box AP, about one run's noise on a few hundred synthetic images: compare with "
        "--seeds"),
    Ablation(
        "cascade", "Cascade Mask R-CNN vs Mask R-CNN",
        "Cascade authors' Detectron port, ResNet-50-FPN 1x, COCO minival mask AP (box AP 41.3 vs 37.7)", "segm",
        "Cascade",
        (Variant("Cascade", ("model.cascade.enabled=true", "model.box_head.class_agnostic=true"), (35.4, 56.2, 37.8)),
         Variant("Mask R-CNN", (), (33.9, 55.8, 35.8))),
        "the cascade's gain is at high IoU (AP75 +2.0, AP50 +0.4); its three box heads also train the shared "
        "backbone three times as hard, which shows most at short budgets; they cost training time"),
    Ablation(
        "alternating", "Training: end-to-end vs Faster R-CNN's 4-step alternating",
        "Faster R-CNN section 3.2: no number for end-to-end; the paper reports it 'close' to alternating", "segm",
        "end-to-end",
        (Variant("end-to-end", (), None),
         Variant("alternating", ("train.procedure=alternating",), None)),
        "the same total iterations; each alternating step sees a quarter to a third of them, and the backbone "
        "trains only in the first two"),
)

BY_KEY = {a.key: a for a in ABLATIONS}
