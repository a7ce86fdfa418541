"""The fast paths keep what users rely on: every sample once, exact resumes, the same
logged losses, the same masks and RLEs, the same EMA as torch's reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from instseg_trainer.data.sampler import EpochSampler, aspect_groups
from instseg_trainer.engine.ema import build_ema, ema_decay
from instseg_trainer.engine.trainer import TrainConfig, train
from instseg_trainer.evaluation.coco_eval import encode_masks
from instseg_trainer.models.mask_rcnn import paste_binary_masks
from instseg_trainer.reporting.events import Iteration
from instseg_trainer.reporting.reporters import MemoryReporter
from instseg_trainer.sample_data import write_sample_dataset
from instseg_trainer.templates import get_template

# 23 images, 9 tall: neither the groups nor the ranks divide evenly
SIZES = [(60, 90) if i % 5 in (0, 2, 3) else (90, 60) for i in range(23)]


def _grouped(rank: int = 0, ranks: int = 1, batch: int = 4, seed: int = 3) -> EpochSampler:
    return EpochSampler(len(SIZES), train=True, seed=seed, num_replicas=ranks, rank=rank,
                        groups=aspect_groups(SIZES), batch_size=batch)  # fmt: skip


def _batches(samples: list, batch: int) -> list[list[int]]:
    indices = [i for i, _ in samples]
    return [indices[i : i + batch] for i in range(0, len(indices), batch)]


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_grouped_sampler_covers_every_image_in_aspect_homogeneous_batches(ranks: int) -> None:
    groups = aspect_groups(SIZES)
    shards = [_grouped(rank, ranks) for rank in range(ranks)]
    for epoch in (0, 1):
        per_rank = []
        for shard in shards:
            shard.set_epoch(epoch)
            per_rank.append(list(shard))
        assert all(len(s) == shards[0].per_rank() == len(shards[0]) for s in per_rank)
        seen = [i for s in per_rank for i, _ in s]
        assert set(seen) == set(range(len(SIZES)))  # every image, padded like DDP
        assert len(seen) - len(set(seen)) == len(seen) - len(SIZES)  # repeats only as padding
        full = [b for s in per_rank for b in _batches(s, 4) if len(b) == 4]
        mixed = [b for b in full if len({groups[i] for i in b}) > 1]
        assert len(full) == ranks * (shards[0].per_rank() // 4)
        assert len(mixed) <= 1, mixed  # only the two groups' leftovers can share a batch


def test_grouped_sampler_is_deterministic_and_resumes_mid_epoch() -> None:
    sampler = _grouped(rank=1, ranks=2)
    sampler.set_epoch(5)
    first = list(sampler)
    again = _grouped(rank=1, ranks=2)
    again.set_epoch(5, skip=8)  # two batches of 4 done before the interruption
    assert list(again) == first[8:]
    assert len(again) == len(first) - 8
    sampler.set_epoch(6)
    assert [i for i, _ in sampler] != [i for i, _ in first]  # reshuffled each epoch


def test_grouped_sampler_with_batch_one_keeps_the_plain_order() -> None:
    plain = EpochSampler(len(SIZES), train=True, seed=3, num_replicas=2, rank=1)
    grouped = _grouped(rank=1, ranks=2, batch=1)
    assert list(plain) == list(grouped)


def test_grouped_batches_pad_less_than_random_ones() -> None:
    groups = aspect_groups(SIZES)
    sampler = _grouped()
    plain = EpochSampler(len(SIZES), train=True, seed=3)
    grouped_mixed = sum(len({groups[i] for i in b}) > 1 for b in _batches(list(sampler), 4))
    plain_mixed = sum(len({groups[i] for i in b}) > 1 for b in _batches(list(plain), 4))
    assert grouped_mixed < plain_mixed


def _rect_masks(n: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, 1, 28, 28, generator=g)
    corner = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.9, height * 0.9]) - 3
    size = 1 + torch.rand(n, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
    end = (corner + size).clamp(max=torch.tensor([width, height], dtype=torch.float32))
    return probs, torch.cat([corner.clamp(min=0), end], 1)


@pytest.mark.parametrize("height,width", [(37, 53), (64, 41)])
def test_pasted_masks_equal_torchvisions_paste_then_threshold(height: int, width: int) -> None:
    probs, boxes = _rect_masks(30, height, width, seed=height)
    expected = paste_masks_in_image(probs, boxes, (height, width))[:, 0] > 0.5
    pasted = paste_binary_masks(probs, boxes, (height, width), 0.5)
    assert pasted.dtype == torch.bool and pasted.shape == expected.shape
    assert torch.equal(pasted, expected)
    empty = paste_binary_masks(probs[:0], boxes[:0], (height, width), 0.5)
    assert empty.shape == (0, height, width)


def test_rle_encoding_equals_pycocotools_per_mask() -> None:
    probs, boxes = _rect_masks(12, 45, 70, seed=1)
    pasted = paste_binary_masks(probs, boxes, (45, 70), 0.5).numpy()  # column-major strides
    for masks in (pasted, np.ascontiguousarray(pasted), pasted.astype(np.uint8)):
        expected = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
        for rle in expected:
            rle["counts"] = rle["counts"].decode("ascii")
        assert encode_masks(masks) == expected
    assert encode_masks(np.zeros((0, 45, 70), dtype=bool)) == []


def test_ema_equals_torchs_averaged_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    reference = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay(0.4, 3)), use_buffers=True
    )
    ema = build_ema(model, 0.4, 3)
    for _ in range(5):
        model.train()(torch.randn(2, 3, 8, 8)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        reference.update_parameters(model)
        ema.update_parameters(model)
    expected = reference.module.state_dict()
    for name, tensor in ema.module.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert ema.steps == int(reference.n_averaged) == 5


@pytest.mark.slow
def test_logged_loss_is_the_mean_of_the_steps_in_its_window(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_sample_dataset(root, num_train=4, num_val=2, seed=1, min_size=64, max_size=96)
    template = get_template("MaskRCNN-EfficientNetB2B").with_overrides(
        epochs=1, batch_size=2, input_size=64
    )

    def losses(log_interval: int) -> list[Iteration]:
        events = MemoryReporter()
        config = TrainConfig(template, root, root, tmp_path / f"run{log_interval}",
                             device="cpu", num_workers=0, backbone_weights="none",
                             stop_after_iterations=2, log_interval=log_interval)  # fmt: skip
        train(config, events)
        return [e for e in events.events if isinstance(e, Iteration)]

    per_step, window = losses(1), losses(2)
    assert [e.iteration for e in per_step] == [1, 2] and len(window) == 1
    assert window[0].loss == pytest.approx(np.mean([e.loss for e in per_step]), rel=1e-5)
    for name, value in window[0].losses.items():
        assert value == pytest.approx(np.mean([e.losses[name] for e in per_step]), rel=1e-5)
