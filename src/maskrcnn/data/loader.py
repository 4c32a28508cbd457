"""Batching for training and evaluation, on one process or many.

Training draws an endless stream of *global* batches (``ims_per_batch`` images over all processes)
from a seeded shuffle per epoch, optionally grouping images of the same orientation (wide or
tall) so that padding wastes little; each process takes its slice of every global batch. Every
sample carries a seed derived from (run seed, iteration, position in the batch) that decides its
flip and the model's anchor/RoI sampling. So the run is a function of the config alone: the same
on 1 process or N, and resuming at iteration k replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from maskrcnn._seeding import derive_seed
from maskrcnn.data.repeat_factors import repeated_indices


class TrainingBatchSampler(Sampler):
    """Yields, per iteration from ``start_iter``, this rank's list of ``(index, seed)``."""

    def __init__(self, aspect_wide: Sequence[bool], ims_per_batch: int, seed: int = 0, grouping: bool = True,
                 rank: int = 0, world_size: int = 1, start_iter: int = 0,
                 repeat: Sequence[float] | None = None) -> None:
        if ims_per_batch < 1:
            raise ValueError(f"solver.ims_per_batch must be at least 1, got {ims_per_batch}")
        if ims_per_batch % world_size:
            raise ValueError(f"solver.ims_per_batch ({ims_per_batch}) must be divisible by the number of "
                             f"processes ({world_size})")
        if not aspect_wide:
            raise ValueError("cannot sample from an empty dataset")
        self.wide = list(aspect_wide)
        self.batch, self.seed, self.grouping = ims_per_batch, seed, grouping
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter
        # per image, how often it appears in an epoch on average (repeat_factors.py); None: once
        self.repeat = list(repeat) if repeat is not None and any(r != 1 for r in repeat) else None
        if self.repeat is not None and len(self.repeat) != len(self.wide):
            raise ValueError(f"{len(self.repeat)} repeat factors for {len(self.wide)} images")

    def _global_batches(self) -> Iterator[list[int]]:
        # Per epoch (a seeded shuffle): a batch of one orientation whenever that orientation has
        # gathered a full batch; what is left of both orientations then goes together, in batches of
        # mixed orientation, the last one completed with other images of the epoch. So every image
        # is trained on in every epoch, however few images an orientation has; an image repeats
        # within a batch only when the dataset is smaller than a batch.
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            if self.repeat is None:
                order = torch.randperm(len(self.wide), generator=g).tolist()
            else:  # an epoch of repeated images, shuffled
                pool = repeated_indices(self.repeat, g)
                order = [pool[k] for k in torch.randperm(len(pool), generator=g).tolist()]
            buckets: dict[bool, list[int]] = {True: [], False: []}
            for i in order:
                bucket = buckets[self.wide[i] if self.grouping else True]
                bucket.append(i)
                if len(bucket) == self.batch:
                    yield list(bucket)
                    bucket.clear()
            rest = buckets[True] + buckets[False]
            for k in range(0, len(rest), self.batch):
                chunk = rest[k:k + self.batch]
                if len(chunk) < self.batch:
                    inside = set(chunk)
                    pool = [i for i in order if i not in inside] or order
                    chunk += [pool[j % len(pool)] for j in range(self.batch - len(chunk))]
                yield chunk
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch // self.world_size
        for it, batch in enumerate(self._global_batches()):
            if it < self.start_iter:
                continue
            mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
            yield [(batch[p], derive_seed(self.seed, it, p)) for p in mine]

    def __len__(self) -> int:  # endless; DataLoader needs a number
        return 2**62


def collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


def training_loader(dataset: Dataset, aspect_wide: Sequence[bool], ims_per_batch: int, seed: int, grouping: bool,
                    num_workers: int, rank: int = 0, world_size: int = 1, start_iter: int = 0,
                    repeat: Sequence[float] | None = None, pin_memory: bool = False) -> DataLoader:
    """``pin_memory`` (for a CUDA device): batches in page-locked memory, so that the copies to the GPU
    are asynchronous and overlap the previous step."""
    sampler = TrainingBatchSampler(aspect_wide, ims_per_batch, seed, grouping, rank, world_size, start_iter, repeat)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None,
                      pin_memory=pin_memory)


def inference_loader(dataset: Dataset, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     limit: int = 0) -> DataLoader:
    """One image per batch, images ``rank, rank + world_size, ...`` (each rank a disjoint shard)."""
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    indices = list(range(rank, n, world_size))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, collate_fn=collate,
                      num_workers=num_workers)
