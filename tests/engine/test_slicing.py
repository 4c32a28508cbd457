"""Sliced inference: windows, and the merging of detections across window borders, with an oracle
model that reports exactly the part of each object a window shows."""

from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.engine.slicing import predict_sliced, tile_starts


class Oracle:
    """Finds every object of a known scene in a window: its visible pixels as mask and box."""

    def __init__(self, masks: list[np.ndarray], labels: list[int], width: int) -> None:
        self.masks, self.labels, self.width = masks, labels, width
        self.calls = 0

    def __call__(self, crops):
        self.calls += 1
        outs = []
        for crop in crops:  # a view of the (3, H, W) image: its offset says where the window is
            y, x = divmod(crop.storage_offset(), self.width)
            h, w = crop.shape[-2:]
            boxes, masks, labels = [], [], []
            for m, label in zip(self.masks, self.labels):
                part = m[y:y + h, x:x + w]
                if part.any():
                    ys, xs = np.nonzero(part)
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    masks.append(torch.from_numpy(part.copy()))
                    labels.append(label)
            outs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                         "scores": torch.full((len(boxes),), 0.9), "labels": torch.tensor(labels, dtype=torch.int64),
                         "masks": torch.stack(masks)[:, None] if masks else torch.zeros((0, 1, h, w), dtype=torch.bool)})
        return outs


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def test_window_starts_cover_the_image_and_end_at_its_border():
    assert tile_starts(100, 640, 0.2) == [0]
    assert tile_starts(1000, 400, 0.25) == [0, 300, 600]  # step 300; the last window ends at 1000
    assert tile_starts(1000, 400, 0.0) == [0, 400, 600]
    with pytest.raises(ValueError, match="overlap in"):
        tile_starts(1000, 400, 1.0)


def test_objects_cut_by_window_borders_come_back_whole():
    h, w = 500, 700
    masks = [_disc(h, w, 250, 350, 140),   # larger than any window's overlap: cut into several pieces
             _disc(h, w, 60, 60, 30),      # inside the first window, and partly in the next ones
             _disc(h, w, 400, 150, 35), _disc(h, w, 400, 221, 35)]  # two of one class side by side, touching
    labels = [1, 2, 3, 3]
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    model = Oracle(masks, labels, w)
    out = predict_sliced(model, image, tile=200, overlap=0.25, batch_size=4)
    assert len(out) == 4 and sorted(out.labels.tolist()) == [1, 2, 3, 3]
    for k in range(len(out)):
        want = [m for m, label in zip(masks, labels) if label == int(out.labels[k])]
        got = out.full_mask(k)
        assert any(np.array_equal(got, m) for m in want), f"detection {k} is not one whole object"
        ys, xs = np.nonzero(got)
        assert out.boxes[k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    windows = len(tile_starts(h, 200, 0.25)) * len(tile_starts(w, 200, 0.25))
    assert model.calls == -(-windows // 4)  # in batches of 4


def test_rle_of_a_merged_mask_is_the_whole_object():
    from pycocotools import mask as mask_utils

    h, w = 300, 300
    disc = _disc(h, w, 150, 150, 100)
    out = predict_sliced(Oracle([disc], [1], w), torch.zeros((3, h, w), dtype=torch.uint8), tile=128, overlap=0.2)
    assert len(out) == 1 and np.array_equal(mask_utils.decode(out.rle(0)).astype(bool), disc)


def test_rle_from_a_crop_equals_pycocotools_encoding_of_the_full_mask():
    from pycocotools import mask as mask_utils

    from maskrcnn.engine.slicing import crop_rle

    rng = np.random.default_rng(0)
    for _ in range(500):  # empty crops, full crops, crops at every border
        h, w = (int(v) for v in rng.integers(1, 25, 2))
        ch, cw = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = rng.random((ch, cw)) < rng.random()
        full = np.zeros((h, w), np.uint8)
        full[y0:y0 + ch, x0:x0 + cw] = crop
        want = mask_utils.encode(np.asfortranarray(full))
        got = crop_rle(x0, y0, crop, h, w)
        assert got["counts"] == want["counts"] and list(got["size"]) == [h, w]


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


class Blobs:
    """Five 300-px discs in every window: many detections, each with a window-sized mask."""

    def __call__(self, crops):
        outs = []
        for crop in crops:
            h, w = crop.shape[-2:]
            masks = torch.zeros((5, 1, h, w), dtype=torch.bool)
            boxes = []
            for k in range(5):
                x, y = 100 + 350 * k, 100 + 300 * k
                masks[k, 0, y:y + 300, x:x + 300] = True
                boxes.append([x, y, x + 300, y + 300])
            outs.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.full((5,), 0.9),
                         "labels": torch.ones(5, dtype=torch.int64), "masks": masks})
        return outs


MEASURE = """
import sys, torch
sys.path.insert(0, {here!r})
from test_slicing import Blobs, _status_mb
from maskrcnn.engine.slicing import predict_sliced
image = torch.zeros((3, 10_000, 10_000), dtype=torch.uint8)  # 300 MB
before = _status_mb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) counts from here
out = predict_sliced(Blobs(), image, tile=2000, overlap=0.0, batch_size=2)
print(len(out), _status_mb("VmHWM:") - before, _status_mb("VmRSS:") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_memory_of_a_10000_px_image_grows_with_the_objects_not_the_image():
    import os
    import subprocess
    import sys

    # glibc raises its mmap threshold after the first large free and then keeps freed window masks in
    # its heap: RSS would measure the allocator's habit (+440 MB, run to run), not what is kept alive.
    # A fixed threshold returns freed blocks, so the peak is what the inference holds at once.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    run = subprocess.run([sys.executable, "-c", MEASURE.format(here=str(Path(__file__).parent))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    count, peak, kept = (float(v) for v in run.stdout.split())
    assert count == 25 * 5
    # 125 masks of the whole image would be 12.5 GB: the crops (300x300 each) are 11 MB, a batch of two
    # windows' masks 40 MB
    assert peak < 150 and kept < 40, f"peak {peak:.0f} MB, kept {kept:.0f} MB over the 300 MB image"


class Scripted:
    """Returns, for the window at (x, y), the detections ``script[(x, y)]``: (box, score, label) in
    window pixels, each with its box filled as mask."""

    def __init__(self, script: dict, width: int) -> None:
        self.script, self.width = script, width

    def __call__(self, crops):
        outs = []
        for crop in crops:
            y, x = divmod(crop.storage_offset(), self.width)
            h, w = crop.shape[-2:]
            dets = self.script.get((x, y), [])
            masks = torch.zeros((len(dets), 1, h, w), dtype=torch.bool)
            for k, (box, _, _) in enumerate(dets):
                masks[k, 0, box[1]:box[3], box[0]:box[2]] = True
            outs.append({"boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
                         "scores": torch.tensor([d[1] for d in dets]), "labels": torch.tensor([d[2] for d in dets],
                                                                                              dtype=torch.int64),
                         "masks": masks})
        return outs


def test_one_window_gives_the_models_detections_unmerged():
    # two overlapping detections of one class from one window (a confident one and a weak one that
    # covers more): the model kept both, so slicing keeps both, unchanged, as on the whole image
    dets = [([20, 20, 60, 60], 0.95, 1), ([15, 15, 65, 62], 0.11, 1)]  # mask IoU 0.68
    image = torch.zeros((3, 80, 100), dtype=torch.uint8)
    out = predict_sliced(Scripted({(0, 0): dets}, 100), image, tile=128, overlap=0.2)
    assert out.boxes.tolist() == [[20, 20, 60, 60], [15, 15, 65, 62]]
    assert out.full_mask(0).sum() == 40 * 40 and out.full_mask(1).sum() == 50 * 47


def test_a_blob_from_another_window_cannot_grow_an_object_over_its_neighbour():
    # window A = x 0..100 sees a large object (x 30..90) and its small neighbour (x 92..98) apart;
    # window B = x 60..160 reports one weak blob over both (x 60..98): it agrees with the large
    # object where both windows look (IoU 30/38), but all of it lies in A, which saw them apart
    width = 160
    script = {(0, 0): [([30, 20, 90, 60], 0.95, 1), ([92, 20, 98, 60], 0.9, 1)],
              (60, 0): [([0, 20, 38, 60], 0.2, 1)]}
    image = torch.zeros((3, 100, width), dtype=torch.uint8)
    out = predict_sliced(Scripted(script, width), image, tile=100, overlap=0.4)
    assert out.boxes.tolist()[:2] == [[30, 20, 90, 60], [92, 20, 98, 60]]
    assert out.full_mask(0).sum() == 60 * 40  # not grown
    # and an object that does continue past A's border still gets B's part
    script = {(0, 0): [([30, 20, 100, 60], 0.95, 1)], (60, 0): [([0, 20, 70, 60], 0.5, 1)]}
    out = predict_sliced(Scripted(script, width), image, tile=100, overlap=0.4)
    assert out.boxes.tolist() == [[30, 20, 130, 60]] and out.full_mask(0).sum() == 100 * 40


def test_bad_arguments():
    image = torch.zeros((3, 50, 50), dtype=torch.uint8)
    with pytest.raises(ValueError, match="batch_size"):
        predict_sliced(Scripted({}, 50), image, tile=32, batch_size=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\), got \(50, 50, 3\)"):
        predict_sliced(Scripted({}, 50), image.permute(1, 2, 0), tile=32)


def test_an_image_within_one_window_gets_the_plain_detections_of_a_real_model():
    # an untrained tiny model: many overlapping low-score detections of one class, the case where
    # merging within a window would show
    import maskrcnn
    from tiny import random_scene, tiny_config

    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_config()).eval()
    image = random_scene(120, 160, 3).float()
    with torch.no_grad():
        plain = model([image])[0]
    sliced = predict_sliced(model, image, tile=256)
    assert len(plain["boxes"]) > 5
    assert torch.equal(sliced.boxes, plain["boxes"]) and torch.equal(sliced.labels, plain["labels"])
    for k in range(len(sliced)):
        assert (sliced.full_mask(k) == plain["masks"][k, 0].numpy()).all()
