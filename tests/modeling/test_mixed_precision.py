"""Mixed precision (issue 11, defect 2): under ``torch.autocast`` only the network's layers run in
bf16/fp16. Anchors, IoUs, matching, box encoding/decoding, proposals, NMS, the pooler's RoIs and
level assignment, mask/keypoint targets, decoding and pasting stay float32.

Two checks, on CPU autocast in both low-precision dtypes (fp16 autocast runs on the CPU too):
- every geometry function of the model sees and returns float32 tensors;
- given the *same* network outputs (heads replaced by fixed tables rounded to the low dtype), the
  proposals, detections, masks, keypoints and losses under autocast equal those of a float32 run
  exactly: any geometry that followed the feature dtype would round coordinates above 512 px to
  4-px steps (bf16) or overflow areas above 65504 px^2 (fp16) and break the equality.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maskrcnn
import maskrcnn.modeling.poolers as poolers
import maskrcnn.modeling.preprocess as preprocess
import maskrcnn.modeling.roi_heads.box_head as box_head
import maskrcnn.modeling.roi_heads.keypoint_head as keypoint_head
import maskrcnn.modeling.roi_heads.standard as standard
import maskrcnn.modeling.rpn as rpn
from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.structures.boxes import BoxCoder, box_area
from tiny import shapes_sample, tiny_config

KP = ["model.keypoint_on=true", "model.keypoint_head.num_keypoints=3", "model.keypoint_head.conv_dims=[32, 32]"]
# a large non-square input, so that coordinates exceed 512 px (bf16 steps of 4 px) and box areas 65504 px^2
LARGE = ["model.input.min_size_test=560", "model.input.max_size_test=840", "model.input.min_size_train=[560]",
         "model.input.max_size_train=840", "model.rpn.pre_nms_topk_test=1000", "model.rpn.post_nms_topk_test=300"]
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _model(extra: list[str]) -> nn.Module:
    torch.manual_seed(0)
    return maskrcnn.build_model(tiny_config(extra=KP + LARGE + extra))


def _data(n: int = 2):
    """Two scenes, one landscape and one portrait, objects scaled up to cover large areas."""
    out = []
    for i, size in enumerate([(560, 840), (700, 480)]):
        image, target = shapes_sample(i, size=(size[0] // 5, size[1] // 5))
        image = torch.nn.functional.interpolate(image[None], size=size, mode="nearest")[0]
        masks = torch.nn.functional.interpolate(target["masks"][:, None].float(), size=size, mode="nearest")[:, 0]
        b = target["boxes"] * 5
        kp = torch.stack([b[:, 0], b[:, 1], torch.full_like(b[:, 0], 2), (b[:, 0] + b[:, 2]) / 2,
                          (b[:, 1] + b[:, 3]) / 2, torch.full_like(b[:, 0], 2), b[:, 2] - 1, b[:, 3] - 1,
                          torch.full_like(b[:, 0], 1)], 1).reshape(-1, 3, 3)
        out.append((image, {"boxes": b, "labels": target["labels"], "masks": masks.to(torch.uint8),
                            "keypoints": kp, "seed": 10 + i}))
    return out[:n]


# -- 1: dtypes seen by the geometry -------------------------------------------------------------------
# (owner, attribute, the positional args that are geometry, whether the result is): the inputs that
# come straight from the network (head logits and deltas) are cast by the function itself
GEOMETRY = [
    (rpn, "pairwise_iou", (0, 1), True), (rpn, "batched_nms_unchecked", (0, 1), False),
    (standard, "pairwise_iou", (0, 1), True), (standard, "mask_targets", (1,), True),
    (standard, "heatmaps_to_keypoints", (1,), True), (keypoint_head, "keypoints_to_heatmap", (0, 1), False),
    (box_head, "batched_nms_unchecked", (0, 1), False), (poolers, "roi_align_unchecked", (1,), False),
    (poolers, "assign_boxes_to_levels", (0,), False), (preprocess, "paste_masks_in_image", (0, 1), True),
    (BoxCoder, "encode", (1, 2), True), (BoxCoder, "decode", (2,), True), (AnchorGenerator, "forward", (), True),
]


def _floats(x):
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _floats(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _floats(v)]
    return []


@pytest.fixture
def geometry_dtypes(monkeypatch):
    seen: dict[str, set] = {}

    def wrap(name, fn, which, result):
        def recorder(*args, **kwargs):
            out = fn(*args, **kwargs)
            tensors = _floats([args[i] for i in which]) + (_floats(out) if result else [])
            seen.setdefault(name, set()).update(str(t.dtype) for t in tensors)
            return out
        return recorder

    for owner, attr, which, result in GEOMETRY:  # methods: args[0] is self
        monkeypatch.setattr(owner, attr, wrap(f"{owner.__name__}.{attr}", getattr(owner, attr), which, result))
    return seen


@pytest.mark.parametrize("low, cascade", [("bf16", True), ("fp16", False)])
def test_geometry_is_float32_under_autocast(geometry_dtypes, low, cascade):
    model = _model(["model.cascade.enabled=true"] if cascade else [])
    data = _data()
    with torch.autocast("cpu", dtype=LOW[low]):
        losses = model.train()([d[0] for d in data], [d[1] for d in data])
        with torch.no_grad():
            model.eval()
            model.roi_heads.score_thresh = 0.0  # an untrained model: keep detections so masks/keypoints run
            out = model([d[0] for d in data])
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert sum(o["boxes"].shape[0] for o in out) > 0
    for o in out:
        assert o["boxes"].dtype == o["scores"].dtype == o["keypoints"].dtype == torch.float32
    called = {name for name in geometry_dtypes}
    expected = {f"{owner.__name__}.{attr}" for owner, attr, _, _ in GEOMETRY}
    assert called == expected, expected - called  # every geometry step was exercised
    wrong = {name: dtypes for name, dtypes in geometry_dtypes.items() if dtypes != {"torch.float32"}}
    assert not wrong, wrong


# -- 2: same network outputs -> same geometry ---------------------------------------------------------
class _Table(nn.Module):
    """Stands in for a head: returns rows of fixed random tables, as many as it gets inputs, in the
    dtype of the run (the low dtype under autocast, otherwise the same values in float32)."""

    def __init__(self, shapes: list[tuple[int, ...]], rows: int, seed: int, dtype: torch.dtype, scale: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tables = [(torch.randn((rows, *s), generator=g) * scale).to(torch.bfloat16).float() for s in shapes]
        self.dtype = dtype
        self.anchor = nn.Parameter(torch.zeros(()))  # a graph for backward, like a real head

    def forward(self, x):
        outs = [(t[:x.shape[0]] + self.anchor).to(self.dtype) for t in self.tables]
        return outs[0] if len(outs) == 1 else tuple(outs)


class _RPNTable(nn.Module):
    """Fixed objectness/deltas for every anchor of every level (rounded to bf16, shown as ``dtype``)."""

    def __init__(self, num_anchors: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_anchors, self.seed, self.dtype = num_anchors, seed, dtype
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, features):
        g = torch.Generator().manual_seed(self.seed)
        logits, deltas = [], []
        for f in features:
            n, _, h, w = f.shape
            a = h * w * self.num_anchors
            logits.append((torch.randn((n, a), generator=g) * 3 + self.anchor).to(torch.bfloat16).to(self.dtype))
            deltas.append((torch.randn((n, a, 4), generator=g) * 0.3 + self.anchor).to(torch.bfloat16).to(self.dtype))
        return logits, deltas


class _Maps(nn.Module):
    """Stands in for the backbone: zero maps of FPN's shapes (strides 4-64) in the run's dtype."""

    def __init__(self, channels: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.channels, self.dtype = channels, dtype

    def forward(self, x):
        n, _, h, w = x.shape
        return [x.new_zeros((n, self.channels, -(-h // s), -(-w // s)), dtype=self.dtype) for s in (4, 8, 16, 32, 64)]


def _stub_heads(model: nn.Module, dtype: torch.dtype) -> None:
    """Every network layer replaced by fixed outputs: only the geometry between them runs."""
    model.backbone = _Maps(32, dtype)
    rh = model.roi_heads
    k = rh.num_classes + 1
    model.rpn.head = _RPNTable(model.rpn.anchor_generator.num_anchors[0], 0, dtype)
    if isinstance(rh.box_predictor, nn.ModuleList):  # cascade: class-agnostic stages
        rh.box_head = nn.ModuleList([nn.Identity() for _ in rh.box_head])
        rh.box_predictor = nn.ModuleList([_Table([(k,), (4,)], 4000, 1 + s, dtype, 1.0) for s in range(len(rh.box_head))])
    else:
        rh.box_head = nn.Identity()
        rh.box_predictor = _Table([(k,), (4 * k,)], 4000, 1, dtype, 1.0)
    rh.mask_head = _Table([(k, 28, 28)], 4000, 7, dtype, 4.0)
    rh.keypoint_head = _Table([(3, 56, 56)], 4000, 8, dtype, 2.0)
    rh.keypoint_head.num_keypoints = 3


def _run(model: nn.Module, data, low: torch.dtype | None):
    images, targets = [d[0] for d in data], [d[1] for d in data]
    with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
        losses = model.train()(images, targets)
        with torch.no_grad():
            model.eval()
            out = model(images)
    return losses, out


@pytest.mark.parametrize("low", ["bf16", "fp16"])
@pytest.mark.parametrize("cascade", [False, True])
def test_autocast_geometry_equals_float32_given_the_same_network_outputs(low, cascade):
    extra = ["model.roi_heads.score_thresh=0.0"] + (["model.cascade.enabled=true"] if cascade else [])
    data = _data()
    assert any(bool((box_area(t["boxes"]) > 65504).any()) for _, t in data)  # fp16 would overflow these
    runs = []
    for dtype in (None, LOW[low]):
        model = _model(extra)
        _stub_heads(model, dtype or torch.float32)
        runs.append(_run(model, data, dtype))
    (ref_losses, ref_out), (losses, out) = runs
    assert ref_losses.keys() == losses.keys()
    for name in ref_losses:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=1e-6, atol=1e-7, msg=name)
    for r, o, (image, _) in zip(ref_out, out, data):
        assert r["boxes"].shape[0] > 10  # the comparison covers many detections
        assert float(r["boxes"].max()) > 512
        for key in ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores"):
            torch.testing.assert_close(o[key], r[key], rtol=0, atol=0, msg=key)


def test_float64_models_keep_float64_geometry():
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config()).double().eval()
    with torch.no_grad():
        model.roi_heads.score_thresh = 0.0
        out = model([torch.rand(3, 90, 120, dtype=torch.float64)])
    assert out[0]["boxes"].dtype == out[0]["scores"].dtype == torch.float64


# -- 3: inference precision (model.precision, the fast mode) -----------------------------------------
@pytest.mark.parametrize("cascade", [False, True])
def test_model_precision_bf16_geometry_equals_float32_given_the_same_network_outputs(cascade):
    """model.precision=bf16 runs the layers under autocast at inference and nothing else: with the
    network's outputs fixed, every output equals the float32 model's exactly."""
    extra = ["model.roi_heads.score_thresh=0.0"] + (["model.cascade.enabled=true"] if cascade else [])
    images = [d[0] for d in _data()]
    outs = []
    for precision in ("float32", "bf16"):
        model = _model(extra + [f"model.precision={precision}"]).eval()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        _stub_heads(model, dtype)
        seen = []
        model.rpn.head.register_forward_hook(lambda m, i, o: seen.append(torch.get_autocast_dtype("cpu")
                                                                         if torch.is_autocast_enabled("cpu") else None))
        with torch.no_grad():
            outs.append(model(images))
        assert seen == [torch.bfloat16 if precision == "bf16" else None]
    for r, o in zip(*outs):
        assert r["boxes"].shape[0] > 10 and float(r["boxes"].max()) > 512
        for key in ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores"):
            assert o[key].dtype == r[key].dtype, key
            torch.testing.assert_close(o[key], r[key], rtol=0, atol=0, msg=key)


def test_model_precision_bf16_runs_the_real_layers_in_bf16_and_keeps_geometry_float32(geometry_dtypes):
    model = _model(["model.precision=bf16", "model.roi_heads.score_thresh=0.0"]).eval()
    layer_dtypes = set()
    model.backbone.register_forward_hook(lambda m, i, o: layer_dtypes.update(str(f.dtype) for f in o))
    with torch.no_grad():
        out = model([d[0] for d in _data()])
    assert layer_dtypes == {"torch.bfloat16"}
    assert sum(o["boxes"].shape[0] for o in out) > 0
    for o in out:
        assert o["boxes"].dtype == o["scores"].dtype == o["keypoints"].dtype == torch.float32
    inference_steps = {"rpn.batched_nms_unchecked", "box_head.batched_nms_unchecked", "poolers.roi_align_unchecked",
                       "poolers.assign_boxes_to_levels", "preprocess.paste_masks_in_image", "BoxCoder.decode",
                       "AnchorGenerator.forward", "standard.heatmaps_to_keypoints"}
    called = {name.replace("maskrcnn.modeling.", "").replace("roi_heads.", "") for name in geometry_dtypes}
    assert inference_steps <= called, inference_steps - called
    wrong = {name: dtypes for name, dtypes in geometry_dtypes.items() if dtypes != {"torch.float32"}}
    assert not wrong, wrong


def test_model_precision_does_not_change_training():
    """Training's precision is solver.amp (the trainer's autocast): model.precision is inference only."""
    data = _data(1)
    losses = []
    for precision in ("float32", "bf16"):
        model = _model([f"model.precision={precision}"]).train()
        losses.append(model([d[0] for d in data], [d[1] for d in data]))
    assert losses[0].keys() == losses[1].keys()
    for name in losses[0]:
        torch.testing.assert_close(losses[1][name], losses[0][name], rtol=0, atol=0, msg=name)


def test_model_precision_fp16_on_the_cpu_is_refused_with_the_alternative():
    model = _model(["model.precision=fp16"]).eval()
    with pytest.raises(ValueError, match=r"model.precision=fp16 needs a CUDA device; use bf16 on the CPU"):
        model([_data(1)[0][0]])


def test_bf16_on_a_cpu_without_bf16_units_warns_once(monkeypatch):
    import maskrcnn.structures.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    precision._warn_emulated_bf16.cache_clear()
    model = _model(["model.precision=bf16"]).eval()
    image = torch.rand(3, 64, 80)
    with pytest.warns(UserWarning, match=r"no bf16 instructions \(avx512_bf16 or AMX\).*slower than float32"):
        with torch.no_grad():
            model([image])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model([image])  # not again
    precision._warn_emulated_bf16.cache_clear()


def test_fast_mode_precision_is_what_the_hardware_runs(monkeypatch):
    """Fast mode is bf16 where bf16 is native; a CPU without bf16 units would emulate it (a 3x3 conv
    took 180-320x its float32 time on an AMD Zen 3), so there it stays float32 and says why; a GPU without
    bf16 gets fp16."""
    import maskrcnn.structures.precision as precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert precision.fast_precision(cpu) == ("bf16", None)
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    mode, why = precision.fast_precision(cpu)
    assert mode == "float32" and "no bf16 instructions (avx512_bf16 or AMX)" in why and "emulated" in why
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or supported)
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        assert precision.fast_precision(cuda) == (expected, None)
    assert asked == [False, False]  # emulated bf16 is no fast mode on a GPU either
