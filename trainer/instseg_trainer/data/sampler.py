"""Per-epoch shuffling and flips decided in the main process, so a resume is exact."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Yields `(index, flip)` (or plain indices when not training) for this rank.

    Order and flips are a function of (seed, epoch) alone, and the first `skip` samples of
    an epoch can be skipped, so a run resumed mid-epoch sees exactly the remaining batches.
    Sharding pads like DistributedSampler so every rank runs the same number of steps.
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
    ) -> None:
        self.size = size
        self.train = train
        self.seed = seed
        self.flip_probability = flip_probability
        self.num_replicas = num_replicas
        self.rank = rank
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
        mine = order[self.rank : total : self.num_replicas][self.skip :]
        for index in mine:
            yield index, flips[index]
