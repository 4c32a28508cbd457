"""torchvision checkpoint conversion: every model variant and key layout, ImageNet trunks, errors."""

import re

import pytest
import torch

import maskrcnn
from maskrcnn.interop.torchvision import convert_detection_state_dict, load_imagenet_backbone, load_torchvision_detection

STATES = """
import torchvision
from torchvision.models import detection, resnet50, resnext50_32x4d
torch.manual_seed(0)
half = lambda m: {k: (v.half() if v.is_floating_point() else v) for k, v in m.state_dict().items()}
outputs["faster_v1"] = half(detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
outputs["faster_v2"] = half(detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None))
outputs["mask_v1"] = half(detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5))
x = inputs["x"]
for name, ctor in [("resnet50", resnet50), ("resnext50_32x4d", resnext50_32x4d)]:
    net = ctor().eval()
    randomize_norms(net, 1)
    with torch.no_grad():
        feats, y = [], net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = layer(y)
            feats.append(y)
    outputs[name] = {"state": net.state_dict(), "feats": feats}
"""


@pytest.fixture(scope="module")
def states(reference):
    return reference(STATES, {"x": torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))}, timeout=600)


def _check_all_loaded(model, converted):
    ours = model.state_dict()
    for k, v in converted.items():
        if k.endswith("num_batches_tracked") and k not in ours:
            continue  # a BatchNorm2d counter the frozen trunk has no use for
        torch.testing.assert_close(ours[k], v.to(ours[k].dtype), msg=lambda m: f"{k}: {m}")
    everything = {k for k in ours if not k.endswith("num_batches_tracked")}
    assert everything <= set(converted), f"not loaded: {sorted(everything - set(converted))[:5]}"


@pytest.mark.reference
@pytest.mark.parametrize("variant,preset", [("faster_v1", "torchvision_fasterrcnn_resnet50_fpn"),
                                            ("faster_v2", "torchvision_fasterrcnn_resnet50_fpn_v2")])
def test_faster_rcnn_checkpoints_load(states, variant, preset):
    model = maskrcnn.build_model(maskrcnn.get_config(preset))
    load_torchvision_detection(model, states[variant])
    _check_all_loaded(model, convert_detection_state_dict(states[variant]))


@pytest.mark.reference
def test_old_and_new_key_names_load_the_same(states, tmp_path):
    new = states["mask_v1"]
    # the layout of torchvision < 0.8 (before Conv2dNormActivation): bare convs, mask_fcn{i}
    old = {}
    for k, v in new.items():
        k = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", k)
        k = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", k)
        k = re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.", k)
        old[k] = v
    assert "rpn.head.conv.weight" in old and "roi_heads.mask_head.mask_fcn4.weight" in old
    cfg = maskrcnn.get_config("torchvision_maskrcnn_resnet50_fpn", ["model.roi_heads.num_classes=4"])
    a = load_torchvision_detection(maskrcnn.build_model(cfg), new)
    path = tmp_path / "old.pth"
    torch.save(old, path)
    b = load_torchvision_detection(maskrcnn.build_model(cfg), str(path))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.reference
def test_mismatches_are_listed(states, tmp_path):
    model = maskrcnn.build_model(maskrcnn.get_config("torchvision_maskrcnn_resnet50_fpn"))  # 90 classes
    with pytest.raises(ValueError, match=r"shape mismatches.*cls_score[\s\S]*set model.roi_heads.num_classes"):
        load_torchvision_detection(model, states["mask_v1"])  # a 4-class checkpoint
    with pytest.raises(ValueError, match=r"missing keys: .*mask_head"):
        load_torchvision_detection(model, states["faster_v1"])  # no mask head
    with pytest.raises(KeyError, match="unknown keys"):
        load_torchvision_detection(model, {**states["faster_v1"], "roi_heads.extra.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_torchvision_detection(model, str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_torchvision_detection(model, str(corrupt))


@pytest.mark.reference
@pytest.mark.parametrize("name,overrides", [
    ("resnet50", []),
    ("resnext50_32x4d", ["model.backbone.groups=32", "model.backbone.width_per_group=4"]),
])
def test_imagenet_trunk_initialisation_reproduces_torchvision_features(states, name, overrides):
    cfg = maskrcnn.get_config("mask_rcnn_R_50_FPN", overrides + ["model.backbone.freeze_at=0", "model.channels_last=false"])
    model = maskrcnn.build_model(cfg)
    load_imagenet_backbone(model, states[name]["state"])
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = model.backbone.body(x)
    for ours, ref in zip(feats, states[name]["feats"]):
        # float32 through 50 layers: relative to the scale of the features (a wrong stride or weight
        # mapping is off by the order of the features themselves)
        torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    # from a file, and into the C4 model (layer4 -> the res5 box head)
    path = __import__("tempfile").mkdtemp() + "/trunk.pth"
    torch.save(states[name]["state"], path)
    c4 = load_imagenet_backbone(maskrcnn.build_model(maskrcnn.get_config("mask_rcnn_R_50_C4", overrides)), path)
    torch.testing.assert_close(c4.roi_heads.box_head[0].conv1.weight, states[name]["state"]["layer4.0.conv1.weight"])
    with pytest.raises(KeyError, match="not a torchvision ResNet"):
        load_imagenet_backbone(model, {**states[name]["state"], "layer5.0.conv1.weight": torch.zeros(1)})
