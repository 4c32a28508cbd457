"""The detector end to end on small models: output format, training (losses fall), bad input."""

import pytest
import torch

import maskrcnn
from maskrcnn.modeling.matching import BalancedSampler
from maskrcnn.structures.boxes import box_iou
from tiny import shapes_sample, tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return maskrcnn.build_model(tiny_config())


def test_inference_output_format(model):
    model.eval()
    images = [torch.rand(3, 100, 140), (torch.rand(3, 90, 60) * 255).to(torch.uint8)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        d = o["boxes"].shape[0]
        assert set(o) == {"boxes", "labels", "scores", "masks"}
        assert o["masks"].shape == (d, 1, im.shape[1], im.shape[2]) and o["masks"].dtype == torch.bool
        assert o["labels"].dtype == torch.int64 and ((o["labels"] >= 1) & (o["labels"] <= 3)).all()
        assert (o["boxes"][:, 2] <= im.shape[2]).all() and (o["boxes"][:, 3] <= im.shape[1]).all()
        assert (o["boxes"] >= 0).all() and (o["scores"][:-1] >= o["scores"][1:]).all()
    # a batch tensor is accepted too, and probabilities are returned with a negative threshold
    model.mask_threshold = -1
    with torch.no_grad():
        probs = model(torch.rand(2, 3, 64, 64))
    model.mask_threshold = 0.5
    assert probs[0]["masks"].is_floating_point()


def test_training_step_with_images_without_objects(model):
    model.train()
    img, tgt = shapes_sample(0)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 128, 160, dtype=torch.uint8)}
    for targets in ([tgt, empty], [empty, empty]):
        losses = model([img, img], targets)
        assert set(losses) == {"loss_rpn_objectness", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_mask"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
    assert losses["loss_mask"] == 0 and losses["loss_box_reg"] == 0 and losses["loss_rpn_box"] == 0


def _jittered_proposals(targets, generator, copies=8):
    """Proposals around the ground truth (scale/shift jitter of 15%) plus random background boxes."""
    out = []
    for t in targets:
        gt = t["boxes"].repeat(copies, 1)
        boxes = gt + torch.randn(gt.shape, generator=generator) * 0.15 * (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        xy = torch.rand(16, 2, generator=generator) * 100
        boxes = torch.cat([boxes, torch.cat([xy, xy + 8 + torch.rand(16, 2, generator=generator) * 40], 1)])
        boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        out.append(boxes.clamp(0, 128))
    return out


def _losses(model, images, targets, proposals, fixed_samples=False):
    """Training losses with the RoI heads fed ``proposals`` (the RPN still trains on its own losses).

    With ``fixed_samples`` the anchor and RoI samples are seeded, so two moments of training are
    compared on exactly the same terms.
    """
    rpn_proposals = model.rpn._proposals
    model.rpn._proposals = lambda *args, **kwargs: proposals
    if fixed_samples:
        model.rpn.sampler = BalancedSampler(64, 0.5, torch.Generator().manual_seed(0))
        model.roi_heads.sampler = BalancedSampler(64, 0.25, torch.Generator().manual_seed(0))
    try:
        return model(images, targets)
    finally:
        model.rpn._proposals = rpn_proposals
        model.rpn.sampler = BalancedSampler(64, 0.5)
        model.roi_heads.sampler = BalancedSampler(64, 0.25)


@pytest.mark.numerics
@pytest.mark.parametrize("polygons", [False, True])
def test_short_training_run_drives_every_loss_down(polygons):
    # Train on a fixed batch: two images, fixed proposals for the RoI heads (as with precomputed
    # proposals) and seeded samples, so the objective is the same at every step and each loss is
    # compared with itself. (With the RPN's own proposals, more sampled RoIs become foreground as
    # it learns, so the summed box loss over a fixed-size sample first grows by design.)
    _assert_losses_fall(tiny_config(), polygons)


# the paper's ablations (maskrcnn ablate): each variant must train
@pytest.mark.parametrize("extra", [
    ["model.box_head.pooler_type=ROIPool", "model.mask_head.pooler_type=ROIPool"],
    ["model.box_head.pooler_type=ROIWarp", "model.mask_head.pooler_type=ROIWarp"],
    ["model.mask_head.loss=softmax"],
    ["model.mask_head.class_agnostic=true"],
    ["model.mask_head.head=mlp", "model.mask_head.mlp_dims=[128, 128]"],
    ["model.mask_on=false"],
], ids=["roipool", "roiwarp", "softmax", "agnostic", "mlp", "no_mask"])
def test_ablation_variants_train(extra):
    _assert_losses_fall(tiny_config(extra=extra), polygons=False)


def _assert_losses_fall(cfg, polygons: bool) -> None:
    torch.manual_seed(0)
    model = maskrcnn.build_model(cfg)
    model.train()
    data = [shapes_sample(i, polygons=polygons) for i in range(2)]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    proposals = _jittered_proposals(targets, torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.003, momentum=0.9)
    history = []
    for it in range(60):
        losses = _losses(model, images, targets, proposals, fixed_samples=True)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    for name in history[0]:
        first, last = history[0][name], sum(h[name] for h in history[-3:]) / 3
        assert last < 0.6 * first, f"{name} did not fall: {first:.4f} -> {last:.4f}"


def _missed_objects(model, data, top: int = 5) -> list[str]:
    """Objects without a detection of their class among their image's ``top`` best that overlaps
    them at box IoU > 0.5 and whose mask covers theirs at mask IoU > 0.7."""
    model.eval()
    with torch.no_grad():
        out = model([d[0] for d in data])
    missed = []
    for i, ((_, tgt), o) in enumerate(zip(data, out)):
        boxes, labels, masks = o["boxes"][:top], o["labels"][:top], o["masks"][:top, 0]
        if not len(boxes):
            missed += [f"image {i}: no detections"]
            continue
        box_iou_same_class = box_iou(tgt["boxes"], boxes) * (tgt["labels"][:, None] == labels[None])
        best, match = box_iou_same_class.max(1)
        gt, pred = tgt["masks"].bool(), masks[match]
        mask_iou = (gt & pred).flatten(1).sum(1) / (gt | pred).flatten(1).sum(1).clamp(min=1)
        missed += [f"image {i} object {j}: box IoU {b:.2f}, mask IoU {m:.2f}"
                   for j, (b, m) in enumerate(zip(best.tolist(), mask_iou.tolist())) if b <= 0.5 or m <= 0.7]
    return missed


@pytest.mark.numerics
def test_end_to_end_training_finds_the_objects():
    # The full pipeline, RPN proposals included: after training on four images (seven objects, two
    # partly hidden), every object is detected with its class among its image's five best, with its
    # box and its mask. From-scratch SGD at this test's former budget ended anywhere between best
    # box IoUs of 0.06 and 0.9 depending on the CPU's float32 rounding (issue 17). AdamW with warmup
    # and a decay step: lowest box IoU 0.79-0.94 over 12 seeds and two instruction sets, lowest
    # mask IoU 0.86-0.92, while lr 0 or switching off loss_cls, loss_rpn_objectness, loss_rpn_box
    # or loss_mask fails (loss_box_reg alone is caught by the loss-by-loss test above).
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config())
    data = [shapes_sample(i) for i in range(4)]
    # the criterion can fail: the untrained model misses objects
    assert _missed_objects(model, data), "an untrained model already finds every object"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(1.0, (it + 1) / 10) * (0.1 if it >= 120 else 1.0))
    model.train()
    for it in range(150):
        batch = [data[(2 * it) % 4], data[(2 * it + 1) % 4]]
        losses = model([b[0] for b in batch], [b[1] for b in batch])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        sched.step()
    missed = _missed_objects(model, data)
    assert not missed, f"objects missed after training: {missed}"


def test_c4_and_faster_rcnn_variants():
    torch.manual_seed(0)
    img, tgt = shapes_sample(1)
    extra = ["model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=20", "model.rpn.pre_nms_topk_train=200",
             "model.rpn.post_nms_topk_train=40", "model.anchors.sizes=[[16, 32, 64, 128]]"]
    c4 = maskrcnn.build_model(tiny_config("mask_rcnn_R_50_C4", extra)).train()
    losses = c4([img], [tgt])
    assert torch.isfinite(sum(losses.values())) and "loss_mask" in losses
    c4.eval()
    with torch.no_grad():
        out = c4([img])[0]
    assert out["masks"].shape[1:] == (1, 128, 160)
    faster = maskrcnn.build_model(tiny_config("faster_rcnn_R_50_FPN")).eval()
    with torch.no_grad():
        out = faster([img])[0]
    assert "masks" not in out and out["boxes"].shape[1] == 4


@pytest.mark.parametrize("images,match", [
    (lambda: [torch.rand(100, 140)], r"images\[0\] must have shape \(3, H, W\)"),
    (lambda: [torch.rand(4, 100, 140)], r"images\[0\] must have shape \(3, H, W\)"),
    (lambda: [torch.rand(3, 0, 140)], r"images\[0\] is empty"),
    (lambda: [torch.rand(3, 10, 10), torch.randint(0, 9, (3, 10, 10), dtype=torch.int32)],
     r"images\[1\] must be float \(0-1\) or uint8"),
    (lambda: [torch.full((3, 10, 10), float("nan"))], r"images\[0\] contains NaN"),
    (lambda: [], "non-empty list"),
    (lambda: "image.jpg", "non-empty list"),
])
def test_bad_images_are_named(model, images, match):
    model.eval()
    with pytest.raises((ValueError, TypeError), match=match):
        model(images())


def _target(**kw):
    t = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
         "masks": torch.zeros(1, 128, 160, dtype=torch.uint8)}
    t.update(kw)
    return t


@pytest.mark.parametrize("target,match", [
    (_target(boxes=torch.tensor([[10.0, 10.0, 10.0, 60.0]])), r"rows \[0\] have zero or negative width"),
    (_target(boxes=torch.tensor([[50.0, 10.0, 10.0, 60.0]])), "zero or negative width"),
    (_target(boxes=torch.tensor([[10.0, float("nan"), 20.0, 60.0]])), "contains NaN or inf"),
    (_target(boxes=torch.tensor([10.0, 10.0, 20.0, 60.0])), r"\['boxes'\] must be a float \(G, 4\)"),
    (_target(labels=torch.tensor([0])), r"must be in 1..3 \(0 is background\)"),
    (_target(labels=torch.tensor([4])), r"must be in 1..3"),
    (_target(labels=torch.tensor([1.0])), "must be an integer"),
    (_target(masks=torch.zeros(1, 100, 160, dtype=torch.uint8)), r"\['masks'\] must be \(1, 128, 160\)"),
    ({"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}, "needs 'masks'"),
])
def test_bad_targets_are_named(model, target, match):
    model.train()
    with pytest.raises(ValueError, match=match):
        model([torch.rand(3, 128, 160)], [target])
    with pytest.raises(ValueError, match="pass targets"):
        model([torch.rand(3, 128, 160)])


def test_class_agnostic_heads_and_4conv1fc_box_head():
    torch.manual_seed(0)
    cfg = tiny_config(extra=["model.box_head.class_agnostic=true", "model.mask_head.class_agnostic=true",
                             "model.box_head.num_conv=4", "model.box_head.num_fc=1", "model.box_head.norm=GN",
                             "model.box_head.conv_dim=32", "model.fpn.norm=GN"])
    model = maskrcnn.build_model(cfg)
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4
    assert model.roi_heads.mask_head.predictor.out_channels == 1
    img, tgt = shapes_sample(3)
    model.train()
    losses = model([img], [tgt])
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([img])[0]
    assert out["masks"].shape[1:] == (1, 128, 160)


@pytest.mark.parametrize("extra", [[], ["model.cascade.enabled=true"], ["model.keypoint_on=true", "model.keypoint_head.num_keypoints=3",
                                                                  "model.keypoint_head.conv_dims=[32, 32]"]],
                         ids=["mask", "cascade", "keypoint"])
def test_images_without_proposals_give_empty_detections(extra):
    # a diverged or degenerate model can leave an image without a single proposal: its detections are
    # empty (with their usual shapes), and the other image of the batch is unaffected
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config(extra=extra)).eval()
    images = [torch.rand(3, 100, 140), torch.rand(3, 90, 60)]
    rpn_forward = model.rpn.forward
    model.rpn.forward = lambda *a, **k: ([torch.zeros(0, 4), rpn_forward(*a, **k)[0][1]], {})
    with torch.no_grad():
        empty, other = model(images)
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,) and empty["masks"].shape == (0, 1, 100, 140)
    assert other["masks"].shape[1:] == (1, 90, 60)
    if "keypoint_on=true" in " ".join(extra):
        assert empty["keypoints"].shape == (0, 3, 3) and empty["keypoints_scores"].shape == (0, 3)


@pytest.mark.parametrize("style", ["torchvision", "detectron2"])
def test_images_of_extreme_aspect_ratio(style):
    # 4000x10 used to resize to a 0-px side and crash the whole batch
    model = maskrcnn.build_model(tiny_config(extra=[f"model.input.resize_style={style}"])).eval()
    images = [torch.rand(3, 10, 4000), torch.rand(3, 4000, 10), torch.rand(3, 100, 140)]
    with torch.no_grad():
        out = model(images)
    for o, im in zip(out, images):
        assert o["masks"].shape[1:] == (1, *im.shape[1:])
        assert (o["boxes"][:, 2] <= im.shape[2]).all() and (o["boxes"][:, 3] <= im.shape[1]).all()


def test_softmax_masks_are_where_the_class_wins_the_pixel():
    from maskrcnn.modeling.roi_heads.mask_head import mask_loss, mask_probabilities

    # one RoI of class 1, two pixels: class 1 wins the first with a softmax probability of only
    # 0.27 (four close channels), background wins the second
    logits = torch.tensor([[0.9, 2.0], [1.0, 0.5], [0.95, 0.1], [0.8, 0.0]]).reshape(1, 4, 1, 2)
    probs = mask_probabilities(logits, torch.tensor([1]), softmax=True)[0, 0]
    assert torch.softmax(logits, 1)[0, 1, 0, 0] < 0.3
    assert torch.allclose(probs, torch.sigmoid(torch.tensor([1.0 - 0.95, 0.5 - 2.0])))
    assert probs[0] > 0.5 > probs[1]
    # the loss: a per-pixel multinomial cross-entropy, target class 1 where the mask is, 0 elsewhere
    target = torch.tensor([[[1.0, 0.0]]])
    expected = -(torch.log_softmax(logits, 1)[0, 1, 0, 0] + torch.log_softmax(logits, 1)[0, 0, 0, 1]) / 2
    assert torch.allclose(mask_loss(logits, torch.tensor([1]), target, softmax=True), expected)
