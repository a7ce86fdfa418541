"""One training run: its configuration, and everything it holds once set up (model, EMA,
optimizer, schedule, loaders, position), fresh or resumed from `last.pt`.

`prepare_run` builds a `TrainingRun`; engine/trainer.py trains it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from instseg_trainer.data.coco import CocoSubset, ImageRecord
from instseg_trainer.data.dataset import InstanceSegDataset, collate
from instseg_trainer.data.roots import load_train_val
from instseg_trainer.data.sampler import EpochSampler, aspect_groups
from instseg_trainer.data.tiling import Tiling, choose_tiling, tile_records
from instseg_trainer.engine.batch_size import (
    adapted_event,
    choose_batch_size,
    keep_adapted_batch,
    resume_with_smaller_batch,
    smaller_batch_after_oom,
)
from instseg_trainer.engine.checkpoint import (
    BEST,
    LAST,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from instseg_trainer.engine.distributed import Distributed, amp_dtype, configure_device
from instseg_trainer.engine.early_stopping import EarlyStopping
from instseg_trainer.engine.ema import WeightEma, build_ema
from instseg_trainer.engine.schedule import WarmupPlateauSchedule
from instseg_trainer.errors import CheckpointError, DataError, InstsegError
from instseg_trainer.evaluation.tiled import TiledImages, collate_tiled
from instseg_trainer.models.mask_rcnn import build_model
from instseg_trainer.models.starts import COCO, load_start, read_start
from instseg_trainer.reporting.events import Event, Final
from instseg_trainer.reporting.reporters import MultiReporter, Reporter
from instseg_trainer.templates import Template

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    template: Template
    train_roots: list[Path] | Path  # one root, or several of the same classes (merged)
    val_roots: list[Path] | Path  # none: a fixed split of train (data.roots)
    output: Path
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    backbone_weights: str | None = None  # None: the template's default
    init_weights: str | Path | None = None  # --weights: a checkpoint, or "coco" (models.starts)
    resume: bool = False
    stop_after_iterations: int | None = None
    log_interval: int = 10
    auto_batch_size: bool = False  # --auto-batch-size (engine.batch_size)
    tiling: str = "off"  # --tiling off|on|auto (data.tiling)
    tile_size: int | None = None  # --tile-size: else from the objects' sizes
    # the template's batch size, when memory changed it (auto, or halved after running out)
    batch_adapted_from: int | None = None

    def __post_init__(self) -> None:
        for name in ("train_roots", "val_roots"):
            roots = getattr(self, name)
            setattr(self, name, [Path(roots)] if isinstance(roots, (str, Path)) else roots or [])


@dataclass
class Position:
    """Where the run is; saved in every checkpoint, so a resume continues exactly here."""

    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # batches done in the epoch in progress
    iteration: int = 0  # optimizer steps done in total
    finished: str | None = None  # "completed" / "early_stopped" once training has ended
    # the epoch `epoch` is trained and saved, its validation not yet done: a run stopped
    # during validation resumes with it
    validation_pending: bool = False


@dataclass
class Timing:
    """Seconds spent, for the speed and ETA of iteration events and the epoch summary."""

    train_seconds: float = 0.0
    train_iterations: int = 0
    val_seconds: float = 0.0
    epoch_start: float = 0.0
    epoch_loss: float = 0.0  # summed over the epoch's steps
    epoch_steps: int = 0

    def start_epoch(self) -> None:
        self.epoch_start, self.epoch_loss, self.epoch_steps = time.monotonic(), 0.0, 0


@dataclass
class TrainingRun:
    """Everything one run holds. Rank 0 alone has a reporter and writes files."""

    cfg: TrainConfig
    dist: Distributed
    reporter: Reporter | None
    output: Path
    train_set: CocoSubset
    val_set: CocoSubset
    backbone_weights: str
    model: torch.nn.Module
    ema: WeightEma
    optimizer: torch.optim.Optimizer
    schedule: WarmupPlateauSchedule
    early: EarlyStopping
    sampler: EpochSampler
    iterations_per_epoch: int
    tiling: Tiling | None = None  # train on tiles, validate on whole images through tiles
    pos: Position = field(default_factory=Position)
    best: dict = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)
    started: float = field(default_factory=time.monotonic)

    @cached_property
    def ground_truth(self) -> dict:
        """The val set as COCO ground truth, for scoring (rank 0)."""
        return self.val_set.ground_truth()

    @property
    def hyper(self) -> dict:
        return self.cfg.template.hyperparameters

    @property
    def total_epochs(self) -> int:
        return self.hyper["epochs"]

    @property
    def batch_size(self) -> int:
        return self.hyper["batch_size"]

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return amp_dtype(self.device)

    @property
    def last_path(self) -> Path:
        return Path(self.cfg.output) / LAST

    def settings(self) -> dict:
        """What an exact resume needs unchanged."""
        return {
            "seed": self.cfg.seed,
            "batch_size": self.batch_size,
            "world_size": self.dist.world_size,
            "input_size": self.cfg.template.input_size,
            "tiling": self.tiling.to_dict() if self.tiling else None,
        }

    def model_card(self) -> dict:
        """What eval and predict need to rebuild the model without the template file."""
        template = self.cfg.template
        return {
            "template": template.name,
            "backbone_weights": self.backbone_weights,  # decides the norm layers' layout
            "input_size": template.input_size,
            "model_config": template.model,
            "hyperparameters": template.hyperparameters,
            "class_names": self.train_set.class_names,
            "category_ids": self.train_set.category_ids,
            "tiling": self.tiling.to_dict() if self.tiling else None,
        }

    def checkpoint_state(self, rngs: list[dict]) -> dict:
        """last.pt: the model card plus everything a resume restores; `rngs` per rank."""
        return {
            **self.model_card(),
            **self.settings(),
            "batch_adapted_from": self.cfg.batch_adapted_from,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "ema_steps": self.ema.steps,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "early_stopping": self.early.state_dict(),
            "position": vars(self.pos).copy(),
            "best": self.best,
            "rng": rngs,
        }

    def save_best(self, metrics: dict) -> None:
        """best.pt: the model card and the EMA weights of the best validation so far."""
        state = {**self.model_card(), "ema": self.ema.module.state_dict(), "best": self.best,
                 "metrics": metrics}  # fmt: skip
        save_checkpoint(state, self.output / BEST)

    def report(self, event: Event) -> None:
        if self.reporter is not None:
            self.reporter.report(event)

    def final(self, status: str | None = None, stop_signal: int | None = None,
              already_finished: bool = False) -> Final:  # fmt: skip
        """The final event of this run, reported."""
        event = Final(
            status=status or self.pos.finished or "completed",
            epochs=self.pos.epoch,
            iteration=self.pos.iteration,
            best=self.best,
            best_checkpoint=str(self.output / BEST) if self.best else None,
            last_checkpoint=str(self.output / LAST),
            wall_seconds=time.monotonic() - self.started,
            already_finished=already_finished,
            stop_signal=stop_signal,
        )
        self.report(event)
        return event


def check_output_dir(output: Path) -> Path:
    """Creates the output directory and proves it is writable before any work is done."""
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InstsegError(
            f"output directory '{output}' is not writable ({e.strerror or e}); "
            f"pass --output to a directory you can write to"
        ) from e
    return output


def load_datasets(train_roots: list[Path], val_roots: list[Path]) -> tuple[CocoSubset, CocoSubset]:
    """The train and val subsets, checked to describe the same classes; without val roots,
    val is a fixed split of train."""
    train, val = load_train_val(train_roots, val_roots)
    if not any(inst for r in train.records for inst in r.instances if not inst.crowd):
        raise DataError(
            f"train set {_files(train)} has no usable objects to learn from "
            f"(every image is empty or every annotation was skipped)"
        )
    if train.class_names != val.class_names or train.category_ids != val.category_ids:
        raise DataError(
            f"train and val classes differ: {_files(train)} has "
            f"{list(zip(train.category_ids, train.class_names))}, {_files(val)} has "
            f"{list(zip(val.category_ids, val.class_names))}; both need the same categories"
        )
    return train, val


def _files(subset: CocoSubset) -> str:
    return " + ".join(f"'{path}'" for path in subset.annotation_files)


def train_sampler_for(
    records: list[ImageRecord], hyper: dict, seed: int, num_replicas: int = 1, rank: int = 0
) -> EpochSampler:
    """The training sampler: shuffled, flipped with the recipe's probability, batches grouped
    by aspect ratio."""
    return EpochSampler(
        len(records),
        train=True,
        seed=seed,
        flip_probability=hyper["flip_probability"],
        num_replicas=num_replicas,
        rank=rank,
        groups=aspect_groups([r.size_hw for r in records]),
        batch_size=hyper["batch_size"],
    )


def _own_process_group(worker_id: int) -> None:
    """Each DataLoader worker leaves the trainer's process group. A signal to the group
    (Ctrl-C in a terminal, `timeout`, a runtime that signals every process of a container)
    would otherwise kill the workers at once, and the main process would fail on the dead
    workers instead of finishing the iteration and saving its checkpoint. Outside the group
    a worker still ends with the trainer: it is shut down when the loader is, and exits by
    itself when its parent is gone."""
    os.setpgid(0, 0)


def data_loader(
    dataset: InstanceSegDataset, sampler: EpochSampler, cfg: TrainConfig, device: torch.device
) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.template.hyperparameters["batch_size"],
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",  # masks too: targets are copied non_blocking
        persistent_workers=workers > 0,
        worker_init_fn=_own_process_group if workers > 0 else None,
        # its own generator: creating an iterator must not consume the global RNG,
        # or a resumed run would sample RPN anchors differently from an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def prepare_run(cfg: TrainConfig, reporter: Reporter, dist: Distributed) -> TrainingRun:
    """Sets up a run: data, model, EMA, optimizer, schedule; resumed from last.pt where the
    output holds one (or --resume says so)."""
    output = check_output_dir(cfg.output) if dist.is_main else Path(cfg.output)
    configure_device(dist.device)
    _seed_everything(cfg.seed + dist.rank)
    train_set, val_set = load_datasets(cfg.train_roots, cfg.val_roots)
    tiling = choose_tiling(cfg.tiling, cfg.tile_size, train_set.records, cfg.template.input_size)
    if tiling is not None:
        train_set = replace(train_set, records=tile_records(train_set.records, tiling, cfg.seed))
    last_path = Path(cfg.output) / LAST
    # rank 0 decides, so that every rank resumes or none does
    resuming = dist.broadcast(cfg.resume or last_path.is_file() if dist.is_main else None)
    if resuming and cfg.init_weights is not None:
        log.warning("resuming from %s: --weights %s is not used", last_path, cfg.init_weights)
    state = load_checkpoint(last_path) if resuming else None
    cfg = keep_adapted_batch(cfg, state)
    hyper = cfg.template.hyperparameters
    backbone_weights = (
        state["backbone_weights"] if state else cfg.backbone_weights or hyper["backbone_weights"]
    )
    model = _build_model(cfg, train_set, backbone_weights, state, dist.device)
    chosen = None if state else choose_batch_size(cfg, model, train_set, dist)
    if chosen is not None:
        cfg, hyper = chosen, chosen.template.hyperparameters
    sampler = train_sampler_for(train_set.records, hyper, cfg.seed, dist.world_size, dist.rank)
    iterations_per_epoch = math.ceil(sampler.per_rank() / hyper["batch_size"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=hyper["learning_rate"], momentum=hyper["momentum"],
        weight_decay=hyper["weight_decay"],
    )  # fmt: skip
    run = TrainingRun(
        cfg, dist,
        # one failing reporter (a status patch, say) must never stop the training
        MultiReporter([reporter]) if dist.is_main else None,
        output, train_set, val_set, backbone_weights, model,
        ema=build_ema(model, hyper["ema_epoch_momentum"], iterations_per_epoch),
        optimizer=optimizer,
        schedule=WarmupPlateauSchedule(
            optimizer, warmup_iterations=hyper["warmup_iterations"],
            warmup_ratio=hyper["warmup_ratio"], factor=hyper["plateau_factor"],
            patience=hyper["plateau_patience"], min_lr=hyper["min_learning_rate"],
        ),
        early=EarlyStopping(hyper["early_stopping_patience"], hyper["early_stopping_start"]),
        sampler=sampler,
        iterations_per_epoch=iterations_per_epoch,
        tiling=tiling,
    )  # fmt: skip
    if state:
        _restore(run, state)
    if chosen is not None:
        run.report(adapted_event(cfg, "auto", None))
    return run


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_model(
    cfg: TrainConfig,
    train_set: CocoSubset,
    backbone_weights: str,
    state: dict | None,
    device: torch.device,
) -> torch.nn.Module:
    template = cfg.template
    start = None if state else start_weights(cfg)
    model = build_model(
        template.model,
        len(train_set.class_names),
        template.input_size,
        backbone_weights,
        # weights that come from a checkpoint next need no ImageNet download first
        load_backbone_weights=not (state or start),
    )
    if start is not None:
        load_start(model, read_start(start, template.name), train_set.class_names)
    return model.to(device)


def start_weights(cfg: TrainConfig) -> str | Path | None:
    """What a new training loads beyond its backbone: --weights, else the template's start
    (torchvision's COCO Mask R-CNN for ResNet50, as OTX's load_from) unless
    --backbone-weights chose the start."""
    if cfg.init_weights is not None:
        return cfg.init_weights
    chosen_backbone = cfg.backbone_weights or cfg.template.hyperparameters["backbone_weights"]
    if cfg.template.start == COCO and chosen_backbone == "imagenet" and not cfg.backbone_weights:
        return COCO
    return None


def _restore(run: TrainingRun, state: dict) -> None:
    """Continues from last.pt exactly where it stopped."""
    _check_compatible(state, run)
    run.model.load_state_dict(state["model"])
    run.ema.module.load_state_dict(state["ema"])
    run.ema.steps = state["ema_steps"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.early.load_state_dict(state["early_stopping"])
    run.pos = Position(**state["position"])
    if state["batch_size"] != run.batch_size:  # halved after running out of memory
        resume_with_smaller_batch(run, state)
    run.best = state.get("best", {})
    restore_rng_state(state["rng"][run.dist.rank])
    log.info(
        "resuming from %s at epoch %d, iteration %d", run.last_path, run.pos.epoch,
        run.pos.iteration,
    )  # fmt: skip


def _check_compatible(state: dict, run: TrainingRun) -> None:
    """A resume is exact only with the same model, classes, seed, batch and world size."""
    template, class_names = run.cfg.template, run.train_set.class_names
    if state.get("template") != template.name or state.get("class_names") != class_names:
        raise CheckpointError(
            f"the checkpoint in the output directory is from template {state.get('template')} "
            f"with classes {state.get('class_names')}, not {template.name} with "
            f"{class_names}; use another --output to start a new training"
        )
    for key, value in run.settings().items():
        if key == "batch_size" and smaller_batch_after_oom(run.cfg, state):
            continue
        if state.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"last.pt in the output directory was trained with {key} {state.get(key)}, not "
                f"{value}; resume with the same {flag} (or nproc/nnodes for world_size), "
                f"or use another --output to start a new training"
            )


def wrap_for_training(run: TrainingRun) -> torch.nn.Module:
    """The model as the optimizer steps it: under DDP when several processes train."""
    if not run.dist.enabled:
        return run.model
    device = run.device
    return DistributedDataParallel(
        run.model, device_ids=[device.index] if device.type == "cuda" else None
    )


def loaders(run: TrainingRun) -> tuple[DataLoader, DataLoader]:
    """The train loader (the run's sampler) and the val loader (sharded over the ranks)."""
    size, cfg, dist = run.cfg.template.input_size, run.cfg, run.dist
    val_sampler = EpochSampler(
        len(run.val_set.records), train=False, num_replicas=dist.world_size, rank=dist.rank
    )
    train = data_loader(InstanceSegDataset(run.train_set.records, size), run.sampler, cfg,
                        run.device)  # fmt: skip
    if run.tiling is None:
        return train, data_loader(InstanceSegDataset(run.val_set.records, size), val_sampler,
                                  cfg, run.device)  # fmt: skip
    tiled = TiledImages(run.val_set.records, size, run.tiling)
    return train, DataLoader(tiled, batch_size=1, sampler=val_sampler,
                             num_workers=cfg.num_workers, collate_fn=collate_tiled)  # fmt: skip
