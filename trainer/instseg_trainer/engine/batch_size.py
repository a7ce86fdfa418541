"""The batch size GPU memory allows (OTX's automatic batch size) and the halving after an
out-of-memory error.

`--auto-batch-size` searches, on the GPU, the largest batch whose training step on the
train set's largest images keeps the peak memory under MEMORY_SHARE of the GPU's: the batch
doubles while it fits, then bisects. The learning rate follows the batch as OTX scales it,
by the square root of the ratio. An out-of-memory error during a single-process training
halves the batch (the learning rate by √½ with it) and resumes from last.pt, down to 1.
The adapted batch is saved in the checkpoints, so a resumed training keeps it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from instseg_trainer.data.coco import CocoSubset
from instseg_trainer.data.dataset import InstanceSegDataset
from instseg_trainer.data.transforms import fitted_size
from instseg_trainer.engine.distributed import Distributed, amp_dtype
from instseg_trainer.errors import InstsegError
from instseg_trainer.models.mask_rcnn import to_model_input
from instseg_trainer.reporting.events import BatchSize

if TYPE_CHECKING:
    from instseg_trainer.engine.run import TrainConfig, TrainingRun

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.85  # of the GPU's memory: room for larger images and more instances
MAX_BATCH = 64


def scaled_learning_rate(learning_rate: float, old_batch: int, new_batch: int) -> float:
    """OTX's scaling of the learning rate with the batch size: by √(new / old)."""
    return learning_rate * math.sqrt(new_batch / old_batch)


def find_batch_size(fits: Callable[[int], bool], start: int, limit: int = MAX_BATCH) -> int:
    """The largest batch in [1, limit] for which `fits` holds, searching from `start`:
    doubling while it fits, then bisecting between the last fit and the first failure; the
    batch below `start` when `start` itself does not fit."""
    if not fits(start):
        low, high = 0, start  # low fits (0: nothing tried yet), high does not
    else:
        low, high = start, None
        while high is None and low < limit:
            candidate = min(low * 2, limit)
            if fits(candidate):
                low = candidate
            else:
                high = candidate
        if high is None:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return max(low, 1)


def gpu_step_fits(model: torch.nn.Module, dataset: InstanceSegDataset, indices: list[int],
                  device: torch.device, dtype: torch.dtype | None):  # fmt: skip
    """A `fits(batch)` for find_batch_size: one forward and backward pass of a batch of the
    given images (repeated to the batch size) on the GPU, within MEMORY_SHARE of its memory.
    The model's weights are not changed (no optimizer step)."""
    total = torch.cuda.get_device_properties(device).total_memory
    samples = [dataset[i] for i in indices]

    def fits(batch: int) -> bool:
        chosen = [samples[i % len(samples)] for i in range(batch)]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            images = to_model_input(tuple(s[0] for s in chosen), device)
            targets = [{k: v.to(device) for k, v in s[1].items()} for s in chosen]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                losses = model(images, targets)
            sum(losses.values()).backward()
            peak = torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            peak = total
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        ok = peak <= MEMORY_SHARE * total
        log.info("batch size %d: peak %.1f GiB of %.1f GiB: %s", batch, peak / 2**30,
                 total / 2**30, "fits" if ok else "too large")  # fmt: skip
        return ok

    return fits


def largest_images(dataset: InstanceSegDataset, count: int = 4) -> list[int]:
    """Indices of the images with the most pixels once resized to the input size, then the
    most instances (their mask targets): the batch that needs the most memory."""
    records = dataset.records

    def need(i: int) -> tuple[int, int]:
        height, width = fitted_size(records[i].height, records[i].width, dataset.input_size)
        return height * width, len(records[i].instances)

    return sorted(range(len(records)), key=need, reverse=True)[:count]


def scale_optimizer_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiplies the learning rate where the optimizer and torch's schedulers keep it
    (`lr`, and `initial_lr`, from which LinearLR's warmup counts)."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


def _with_batch(cfg: TrainConfig, batch: int, learning_rate: float) -> TrainConfig:
    """`cfg` at another batch size; the search is not repeated once memory chose."""
    template = cfg.template.with_overrides(batch_size=batch, learning_rate=learning_rate)
    original = cfg.batch_adapted_from or cfg.template.hyperparameters["batch_size"]
    return replace(cfg, template=template, batch_adapted_from=original, auto_batch_size=False)


def choose_batch_size(
    cfg: TrainConfig, model: torch.nn.Module, train_set: CocoSubset, dist: Distributed
) -> TrainConfig | None:
    """With --auto-batch-size on a GPU, the config with the largest batch that fits (every
    rank's smallest), or None when it is the template's; a no-op elsewhere."""
    if not cfg.auto_batch_size:
        return None
    start, lr = (cfg.template.hyperparameters[k] for k in ("batch_size", "learning_rate"))
    if dist.device.type != "cuda":
        log.info("--auto-batch-size: a no-op on %s (memory is not what limits the batch there); "
                 "the batch size stays %d", dist.device.type, start)  # fmt: skip
        return None
    dataset = InstanceSegDataset(train_set.records, cfg.template.input_size)
    limit = max(1, min(MAX_BATCH, len(train_set.records) // dist.world_size))
    saved = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fits = gpu_step_fits(model.train(), dataset, largest_images(dataset), dist.device,
                         amp_dtype(dist.device))  # fmt: skip
    found = min(dist.gather_to_all(find_batch_size(fits, start, limit)))
    model.load_state_dict(saved)  # the trial passes moved batch-norm statistics
    log.info("--auto-batch-size: batch size %d (template: %d)", found, start)
    if found == start:
        return None
    return _with_batch(cfg, found, scaled_learning_rate(lr, start, found))


def halved_after_oom(cfg: TrainConfig, dist: Distributed, message: str) -> TrainConfig:
    """The config to resume with after the GPU ran out of memory: half the batch, the
    learning rate scaled with it. An error when it cannot be halved (batch 1) or when
    several processes train (they cannot agree on it mid-step)."""
    batch, lr = (cfg.template.hyperparameters[k] for k in ("batch_size", "learning_rate"))
    if dist.enabled:
        raise InstsegError(
            f"the GPU ran out of memory at batch size {batch} ({message}) in a training of "
            f"{dist.world_size} processes; set a smaller batch size or use --auto-batch-size"
        )
    if batch == 1:
        raise InstsegError(
            f"the GPU ran out of memory at batch size 1 ({message}); lower --input-size or "
            f"train on a GPU with more memory"
        )
    new = batch // 2
    log.warning("out of GPU memory at batch size %d: resuming from last.pt with batch size "
                "%d", batch, new)  # fmt: skip
    return _with_batch(cfg, new, scaled_learning_rate(lr, batch, new))


def adapted_event(cfg: TrainConfig, reason: str, previous: TrainConfig | None) -> BatchSize:
    """The event of a change to `cfg`'s batch from `previous`'s (None: the template's)."""
    hyper = cfg.template.hyperparameters
    before = previous.template.hyperparameters["batch_size"] if previous else None
    return BatchSize(batch_size=hyper["batch_size"],
                     previous_batch_size=before or cfg.batch_adapted_from,
                     learning_rate=hyper["learning_rate"], reason=reason)  # fmt: skip


def keep_adapted_batch(cfg: TrainConfig, state: dict | None) -> TrainConfig:
    """A resumed training keeps the batch size memory chose (saved in last.pt)."""
    if not state or not state.get("batch_adapted_from") or cfg.batch_adapted_from:
        return cfg
    if cfg.template.hyperparameters["batch_size"] != state["batch_adapted_from"]:
        return cfg  # another --batch-size than the one memory adapted: the resume check says
    log.info("resuming with batch size %d, which memory chose (the template's is %d)",
             state["batch_size"], state["batch_adapted_from"])  # fmt: skip
    template = cfg.template.with_overrides(
        batch_size=state["batch_size"], learning_rate=state["hyperparameters"]["learning_rate"]
    )
    return replace(cfg, template=template, batch_adapted_from=state["batch_adapted_from"])


def smaller_batch_after_oom(cfg: TrainConfig, state: dict) -> bool:
    """Whether `state` (last.pt) ran at a larger batch than the one memory just chose."""
    return cfg.batch_adapted_from is not None and (
        state.get("batch_size", 0) > cfg.template.hyperparameters["batch_size"]
    )


def resume_with_smaller_batch(run: TrainingRun, state: dict) -> None:
    """After restoring last.pt of a larger batch: the same images of the epoch count as
    done, and the restored learning rate (warmup and plateau included) scales with the batch."""
    old, new = state["batch_size"], run.batch_size
    images_done = min(run.pos.epoch_step * old, run.sampler.per_rank())
    run.pos.epoch_step = min(math.ceil(images_done / new), run.iterations_per_epoch)
    scale_optimizer_learning_rate(run.optimizer, math.sqrt(new / old))
