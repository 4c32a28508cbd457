"""Training batches: deterministic, sharded across processes exactly, grouped by orientation, resumable."""

import itertools

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
    for b in batches:
        assert len({wide[i] for i, _ in b}) == 1
    assert _take(TrainingBatchSampler(wide, 4, seed=1, start_iter=17), 13) == batches[17:]
    assert _take(TrainingBatchSampler(wide, 4, seed=2), 30) != batches
    tiny = _take(TrainingBatchSampler([True, True], 4, seed=0, grouping=False), 2)
    assert all(len(b) == 4 for b in tiny)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        TrainingBatchSampler(wide, 6, world_size=4)
    with pytest.raises(ValueError, match="empty dataset"):
        TrainingBatchSampler([], 4)
