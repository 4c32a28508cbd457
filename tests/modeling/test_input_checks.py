"""The model's checks of images and training targets read the device back once per batch (issue 11,
defect 11), and still name the image and the problem."""

import pytest
import torch

from host_reads import HostReads
from maskrcnn._checks import Checks
from maskrcnn.modeling.preprocess import ImagePreprocessor
from tiny import shapes_sample


def _batch(n=4):
    data = [shapes_sample(i, polygons=i % 2 == 0) for i in range(n)]
    images = [d[0] for d in data]
    targets = [dict(d[1], crowd_boxes=torch.tensor([[1.0, 1.0, 20.0, 20.0]]),
                    keypoints=torch.ones(len(d[1]["boxes"]), 2, 3)) for d in data]
    return images, targets


def _check(images, targets):
    checks = Checks()
    images = ImagePreprocessor.check_images(images, checks)
    ImagePreprocessor.check_targets(targets, images, 3, True, 2, checks)
    checks.run()


def test_a_batch_is_checked_with_one_host_read():
    images, targets = _batch()
    with HostReads() as mode:
        _check(images, targets)
    assert len(mode.calls) == 1, mode.calls


@pytest.mark.parametrize("spoil, message", [
    (lambda im, t: im[2].__setitem__((0, 0, 0), float("nan")), r"images\[2\] contains NaN or inf"),
    (lambda im, t: t[1]["boxes"].__setitem__((0, 0), float("inf")), r"targets\[1\]\['boxes'\] contains NaN or inf"),
    (lambda im, t: t[3]["boxes"].__setitem__((0, 2), t[3]["boxes"][0, 0]),
     r"targets\[3\]\['boxes'\] rows \[0\] have zero or negative width/height"),
    (lambda im, t: t[0]["labels"].__setitem__(0, 7), r"targets\[0\]\['labels'\] must be in 1..3 .* got values in"),
    (lambda im, t: t[2]["crowd_boxes"].__setitem__((0, 1), float("nan")), r"targets\[2\]\['crowd_boxes'\] must be a finite"),
    (lambda im, t: t[1]["keypoints"].__setitem__((0, 0, 0), float("nan")), r"targets\[1\]\['keypoints'\] contains NaN"),
])
def test_each_bad_value_is_named(spoil, message):
    images, targets = _batch()
    spoil(images, targets)
    with pytest.raises(ValueError, match=message):
        _check(images, targets)
    with pytest.raises(ValueError, match=message):  # without a shared Checks: read back at once
        ImagePreprocessor.check_targets(targets, ImagePreprocessor.check_images(images), 3, True, 2)


@pytest.mark.parametrize("spoil, message", [
    # 0-255 floats (detectron2's and OpenCV's habit) and mean/std-normalised pixels: another scale
    (lambda im: im.__setitem__(1, im[1] * 255), r"images\[1\] is float with values from 0 to 255: float images "
                                                r"must be in 0-1"),
    (lambda im: im.__setitem__(0, (im[0] - 0.45) / 0.225), r"images\[0\] is float with values from -[12][.0-9]* to 2"),
])
def test_float_images_in_another_scale_are_named(spoil, message):
    images, targets = _batch()
    images[1][0, 0, 0] = 1.0  # a white pixel, so that the 0-255 image reaches 255
    images[1][0, 0, 1] = 0.0
    spoil(images)
    with pytest.raises(ValueError, match=message):
        _check(images, targets)


def test_resampling_overshoot_is_not_taken_for_another_scale():
    images, targets = _batch()
    # bicubic resizing rings a little past 0 and 1 at sharp edges; such images are still 0-1 images
    images[0][0, 0, 0], images[0][0, 0, 1] = 1.3, -0.2
    _check(images, targets)
