"""Training batches: deterministic, sharded across processes exactly, grouped by orientation, resumable."""

import itertools
import math

import pytest

from maskrcnn.data.loader import TrainingBatchSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_shards_concatenate_to_the_single_process_batches():
    wide = [i % 3 != 0 for i in range(37)]
    single = _take(TrainingBatchSampler(wide, 8, seed=5), 20)
    shards = [_take(TrainingBatchSampler(wide, 8, seed=5, rank=r, world_size=4), 20) for r in range(4)]
    for it in range(20):
        assert sum((shards[r][it] for r in range(4)), []) == single[it]
    assert len({s for b in single for s in b}) == 20 * 8  # every sample has its own seed


def test_grouping_resume_and_errors():
    wide = [i % 3 != 0 for i in range(37)]
    batches = _take(TrainingBatchSampler(wide, 4, seed=1), 30)
    # only the leftovers of each epoch (under a batch per orientation) go into mixed batches
    assert sum(len({wide[i] for i, _ in b}) == 1 for b in batches) >= 0.8 * len(batches)
    assert _take(TrainingBatchSampler(wide, 4, seed=1, start_iter=17), 13) == batches[17:]
    assert _take(TrainingBatchSampler(wide, 4, seed=2), 30) != batches
    tiny = _take(TrainingBatchSampler([True, True], 4, seed=0, grouping=False), 2)
    assert all(len(b) == 4 for b in tiny)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        TrainingBatchSampler(wide, 6, world_size=4)
    with pytest.raises(ValueError, match="empty dataset"):
        TrainingBatchSampler([], 4)
    with pytest.raises(ValueError, match="ims_per_batch must be at least 1"):
        TrainingBatchSampler(wide, 0)


@pytest.mark.parametrize("tall,wide,batch,grouping", [
    (10, 10, 16, True),  # each orientation under a batch, together over one: used to hang forever
    (5, 40, 16, True),   # the portrait images were never trained on
    (1, 16, 16, True), (5, 32, 16, True),  # an epoch leaves only a few images over
    (3, 0, 8, True),     # a dataset smaller than a batch
    (1, 1, 4, True), (7, 9, 4, True), (7, 9, 4, False), (1, 30, 4, False),
])
def test_every_image_is_trained_on_every_epoch(tall, wide, batch, grouping):
    flags = [False] * tall + [True] * wide
    n = len(flags)
    batches = _take(TrainingBatchSampler(flags, batch, seed=3, grouping=grouping), math.ceil(12 * n / batch) + 2)
    assert all(len(b) == batch for b in batches)
    if n >= batch:
        assert all(len({i for i, _ in b}) == batch for b in batches), "an image repeats within a batch"
    stream = [i for b in batches for i, _ in b]
    # an epoch is n to n + batch - 1 consecutive images of the stream holding every image, so any
    # 2 (n + batch) consecutive images hold a whole epoch
    window = 2 * (n + batch)
    for start in range(0, len(stream) - window + 1, max(1, n // 2)):
        assert set(stream[start:start + window]) == set(range(n)), f"images missing from stream[{start}:]"
    # an image is used once per epoch, twice when it completes the epoch's last batch
    counts = [stream.count(i) for i in range(n)]
    assert max(counts) <= 2 * min(counts) + 2, counts


def test_repeat_factors_follow_lvis_rule_on_a_hand_computed_case():
    from maskrcnn.data.repeat_factors import repeat_factors

    # 5 images (one without objects): f(1) = 4/5, f(2) = 1/5 (twice in one image counts once), f(3) = 2/5;
    # t = 0.5: r(1) = max(1, sqrt(0.5 / 0.8)) = 1, r(2) = sqrt(2.5), r(3) = sqrt(1.25); an image takes its
    # largest r, an image without objects 1
    labels = [[1], [1, 2, 2], [1, 3], [1, 3], []]
    got = repeat_factors(labels, 0.5)
    assert got == pytest.approx([1.0, math.sqrt(0.5 / 0.2), math.sqrt(0.5 / 0.4), math.sqrt(0.5 / 0.4), 1.0])
    assert repeat_factors(labels, 0.0) == [1.0] * 5  # off


def test_repeated_images_appear_as_often_as_their_factor():
    from maskrcnn.data.repeat_factors import repeat_factors

    labels = [[1]] * 18 + [[1, 2]] * 2  # class 2 in a tenth of the images
    factors = repeat_factors(labels, 0.4)  # r = sqrt(0.4 / 0.1) = 2 for the two rare images
    assert factors[-2:] == pytest.approx([2.0, 2.0]) and factors[0] == 1.0
    fractional = repeat_factors(labels, 0.25)  # sqrt(2.5) = 1.58...: 1 or 2 times an epoch
    for rf, expect in ((factors, 2.0), (fractional, math.sqrt(2.5))):
        sampler = TrainingBatchSampler([True] * 20, 4, seed=7, grouping=False, repeat=rf)
        stream = [i for b in _take(sampler, 3000) for i, _ in b]  # 12,000 samples, ~500 epochs
        common = sum(stream.count(i) for i in range(18)) / 18
        rare = (stream.count(18) + stream.count(19)) / 2
        assert rare / common == pytest.approx(expect, rel=0.05)
    # still deterministic and resumable
    sampler = TrainingBatchSampler([True] * 20, 4, seed=7, grouping=False, repeat=fractional)
    resumed = TrainingBatchSampler([True] * 20, 4, seed=7, grouping=False, repeat=fractional, start_iter=11)
    assert _take(resumed, 9) == _take(sampler, 20)[11:]


WORKERS_SCRIPT = """
import sys, torch
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import training_loader
from maskrcnn.data.shapes import write_shapes_dataset

paths = write_shapes_dataset(sys.argv[1], num_train=10, num_val=1, size=(64, 80), max_objects=2, min_radius=8,
                             max_radius=16)
data = CocoDataset(*paths["train"], train=True)

def batches(workers):
    loader = training_loader(data, data.aspect_wide(), 3, seed=5, grouping=True, num_workers=workers)
    it = iter(loader)
    return [next(it) for _ in range(7)]  # past one epoch of 10 images

n = 0
for (im0, t0), (im2, t2) in zip(batches(0), batches(2)):
    assert all(torch.equal(a, b) for a, b in zip(im0, im2))
    assert [t["image_id"] for t in t0] == [t["image_id"] for t in t2]
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(t0, t2))
    n += 1
print("batches compared:", n)
"""


def test_worker_processes_give_the_batches_of_the_main_process(tmp_path):
    # the default data.num_workers=2 (loading and augmenting in other processes, the flips drawn
    # from each sample's own seed) must give exactly what the demo's in-process loader gives.
    # In a fresh interpreter: after loader workers had run in the test process, it segfaulted ~180
    # tests later, while a reference subprocess was exiting (CI, 2026-12-07). Not with the test
    # removed, nor with the SIGCHLD handler that torch's loader installs (and never removes) reset
    # after it; still with the workers shut down explicitly. The mechanism is not known.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches compared: 7" in proc.stdout, proc.stdout
