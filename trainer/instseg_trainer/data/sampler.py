"""Per-epoch shuffling and flips decided in the main process, so a resume is exact."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def aspect_groups(sizes_hw: Sequence[tuple[int, int]]) -> list[int]:
    """0 for a wide (or square) image, 1 for a tall one: batches of one group pad less."""
    return [int(h > w) for h, w in sizes_hw]


class EpochSampler(Sampler):
    """Yields `(index, flip)` (or plain indices when not training) for this rank.

    Order and flips are a function of (seed, epoch) alone, and the first `skip` samples of
    an epoch can be skipped, so a run resumed mid-epoch sees exactly the remaining batches.
    Sharding pads like DistributedSampler so every rank runs the same number of steps.

    With `groups` (one id per index, e.g. `aspect_groups`) and `batch_size`, each run of
    `batch_size` samples a rank yields (each DataLoader batch) comes from one group, as
    torchvision's GroupedBatchSampler does. Only the leftovers (fewer than `batch_size` per
    group) mix: with two groups, at most one full batch an epoch, and each rank's short
    last batch.
    """

    def __init__(
        self,
        size: int,
        *,
        train: bool,
        seed: int = 0,
        flip_probability: float = 0.5,
        num_replicas: int = 1,
        rank: int = 0,
        groups: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        if groups is not None and len(groups) != size:
            raise ValueError(f"groups has {len(groups)} entries for {size} samples")
        self.size = size
        self.train = train
        self.seed = seed
        self.flip_probability = flip_probability
        self.num_replicas = num_replicas
        self.rank = rank
        self.groups = groups
        self.batch_size = batch_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def per_rank(self) -> int:
        """Samples per rank in a full epoch."""
        if self.train:
            return math.ceil(self.size / self.num_replicas)
        # evaluation: no padding, so nothing is scored twice
        return len(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.skip)

    def __iter__(self) -> Iterator:
        if not self.train:
            yield from range(self.rank, self.size, self.num_replicas)
            return
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        flips = (torch.rand(self.size, generator=g) < self.flip_probability).tolist()
        total = self.per_rank() * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]
        if self.groups is None or self.batch_size == 1:
            mine = order[self.rank : total : self.num_replicas]
        else:
            mine = self._grouped_share(order)
        for index in mine[self.skip :]:
            yield index, flips[index]

    def _grouped_share(self, order: list[int]) -> list[int]:
        """This rank's samples: whole batches of one group, dealt to ranks in turn."""
        batch, ranks = self.batch_size, self.num_replicas
        # as GroupedBatchSampler: a batch is cut when its group has `batch` samples waiting
        pending: dict[int, list[int]] = {}
        grouped: list[int] = []
        for index in order:
            waiting = pending.setdefault(self.groups[index], [])
            waiting.append(index)
            if len(waiting) == batch:
                grouped.extend(waiting)
                waiting.clear()
        for group in sorted(pending):  # the leftovers, fewer than `batch` per group
            grouped.extend(pending[group])
        full = self.per_rank() // batch  # full batches per rank; then one short batch each
        cut = full * batch * ranks
        batches = [grouped[i : i + batch] for i in range(0, cut, batch)]
        short = (len(grouped) - cut) // ranks
        mine = [i for b in batches[self.rank :: ranks] for i in b]
        return mine + grouped[cut + self.rank * short : cut + (self.rank + 1) * short]
