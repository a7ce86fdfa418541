"""The training loop: one function per epoch, one for validation, checkpoints in between."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from instseg_trainer.data.coco import CocoSubset, ImageRecord, load_coco_subset
from instseg_trainer.data.dataset import InstanceSegDataset, collate
from instseg_trainer.data.sampler import EpochSampler, aspect_groups
from instseg_trainer.engine.checkpoint import (
    BEST,
    LAST,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from instseg_trainer.engine.distributed import (
    Distributed,
    amp_dtype,
    configure_device,
    setup_distributed,
)
from instseg_trainer.engine.early_stopping import EarlyStopping
from instseg_trainer.engine.ema import build_ema
from instseg_trainer.engine.schedule import WarmupPlateauSchedule
from instseg_trainer.errors import CheckpointError, DataError, InstsegError
from instseg_trainer.evaluation.evaluator import coco_results, score
from instseg_trainer.models.mask_rcnn import build_model, to_model_input
from instseg_trainer.reporting.curves import plot_curves
from instseg_trainer.reporting.reporters import METRICS_FILENAME, MultiReporter, Reporter
from instseg_trainer.templates import Template

log = logging.getLogger(__name__)

CURVES = "curves.png"

# the checkpoint records how batches were formed, so a resume continues the same sequence
GROUPED_BATCHING = "aspect-ratio-groups"


@dataclass
class TrainConfig:
    template: Template
    train_root: Path
    val_root: Path
    output: Path
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    backbone_weights: str | None = None  # None: the template's default
    init_weights: Path | None = None
    resume: bool = False
    stop_after_iterations: int | None = None
    log_interval: int = 10


class TrainingDiverged(InstsegError):
    """The loss became NaN or infinite."""


@dataclass
class _Position:
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # batches done in the epoch in progress
    iteration: int = 0  # optimizer steps done in total
    finished: str | None = None  # "completed" / "early_stopped" once training has ended
    # the epoch `epoch` is trained and saved, its validation not yet done: a run stopped
    # during validation resumes with it
    validation_pending: bool = False


class _StopSignal:
    """SIGTERM/SIGINT ask for a checkpoint at the next iteration boundary (pod eviction,
    Job suspension, Ctrl-C), instead of losing the epoch in progress."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignal:
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: saving a checkpoint at the end of this iteration", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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


def load_datasets(train_root: Path, val_root: Path) -> tuple[CocoSubset, CocoSubset]:
    """The train and val subsets, checked to describe the same classes."""
    train = load_coco_subset(train_root, "train")
    val = load_coco_subset(val_root, "val")
    if not any(inst for r in train.records for inst in r.instances if not inst.crowd):
        raise DataError(
            f"train set '{train.annotation_file}' has no usable objects to learn from "
            f"(every image is empty or every annotation was skipped)"
        )
    if train.class_names != val.class_names or train.category_ids != val.category_ids:
        raise DataError(
            f"train and val classes differ: '{train.annotation_file}' has "
            f"{list(zip(train.category_ids, train.class_names))}, '{val.annotation_file}' has "
            f"{list(zip(val.category_ids, val.class_names))}; both files need the same categories"
        )
    return train, val


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _own_process_group(worker_id: int) -> None:
    """Each DataLoader worker leaves the trainer's process group. A signal to the group
    (Ctrl-C in a terminal, `timeout`, a runtime that signals every process of a container)
    would otherwise kill the workers at once, and the main process would fail on the dead
    workers instead of finishing the iteration and saving its checkpoint. Outside the group
    a worker still ends with the trainer: it is shut down when the loader is, and exits by
    itself when its parent is gone."""
    os.setpgid(0, 0)


def train_sampler_for(
    records: list[ImageRecord],
    hyper: dict,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    grouped: bool = True,
) -> EpochSampler:
    """The training sampler: shuffled, flipped with the recipe's probability, batches grouped
    by aspect ratio (unless `grouped` is false: the order of runs from before grouping)."""
    return EpochSampler(
        len(records),
        train=True,
        seed=seed,
        flip_probability=hyper["flip_probability"],
        num_replicas=num_replicas,
        rank=rank,
        groups=aspect_groups([(r.height, r.width) for r in records]) if grouped else None,
        batch_size=hyper["batch_size"],
    )


def data_loader(
    dataset: InstanceSegDataset,
    sampler: EpochSampler,
    batch_size: int,
    cfg: TrainConfig,
    device: torch.device,
) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
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


def train(cfg: TrainConfig, reporter: Reporter) -> dict:
    """Trains, validating each epoch; returns the final event. Resumes from `last.pt`."""
    dist = setup_distributed(cfg.device)
    try:
        return _train(cfg, reporter, dist)
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, reporter: Reporter, dist: Distributed) -> dict:
    started = time.monotonic()
    template, hyper = cfg.template, cfg.template.hyperparameters
    device = dist.device
    output = check_output_dir(cfg.output) if dist.is_main else Path(cfg.output)
    # one failing reporter (a status patch, say) must never stop the training
    reporter = MultiReporter([reporter]) if dist.is_main else None
    configure_device(device)
    _seed_everything(cfg.seed + dist.rank)

    train_set, val_set = load_datasets(cfg.train_root, cfg.val_root)
    num_classes = len(train_set.class_names)
    last_path = Path(cfg.output) / LAST
    # rank 0 decides, so that every rank resumes or none does
    resuming = dist.broadcast(cfg.resume or last_path.is_file() if dist.is_main else None)
    if resuming and cfg.init_weights is not None:
        log.warning("resuming from %s: --weights %s is not used", last_path, cfg.init_weights)
    state = load_checkpoint(last_path) if resuming else None
    backbone_weights = (
        state["backbone_weights"] if state else cfg.backbone_weights or hyper["backbone_weights"]
    )
    model = build_model(
        template.model,
        num_classes,
        template.input_size,
        backbone_weights,
        # weights that come from a checkpoint next need no ImageNet download first
        load_backbone_weights=not (state or cfg.init_weights),
    )
    if cfg.init_weights is not None and not state:
        _load_init_weights(model, cfg.init_weights, train_set.class_names)
    model.to(device)

    batch_size = hyper["batch_size"]
    train_sampler = train_sampler_for(
        train_set.records,
        hyper,
        cfg.seed,
        num_replicas=dist.world_size,
        rank=dist.rank,
        # a run started before batches were grouped by aspect ratio resumes in its own order
        grouped=not state or state.get("batching") == GROUPED_BATCHING,
    )
    iterations_per_epoch = math.ceil(train_sampler.per_rank() / batch_size)
    ema = build_ema(model, hyper["ema_epoch_momentum"], iterations_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=hyper["learning_rate"],
        momentum=hyper["momentum"],
        weight_decay=hyper["weight_decay"],
    )
    schedule = WarmupPlateauSchedule(
        optimizer,
        warmup_iterations=hyper["warmup_iterations"],
        warmup_ratio=hyper["warmup_ratio"],
        factor=hyper["plateau_factor"],
        patience=hyper["plateau_patience"],
        min_lr=hyper["min_learning_rate"],
    )
    early = EarlyStopping(hyper["early_stopping_patience"], hyper["early_stopping_start"])
    pos = _Position()
    best: dict = {}
    run_settings = {
        "seed": cfg.seed,
        "batch_size": batch_size,
        "world_size": dist.world_size,
        "input_size": template.input_size,
    }
    if state:
        _check_compatible(state, template, train_set, run_settings)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.steps = state["ema_steps"]
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        early.load_state_dict(state["early_stopping"])
        pos = _Position(**state["position"])
        best = state.get("best", {})
        restore_rng_state(state["rng"][dist.rank])
        log.info("resuming from %s at epoch %d, iteration %d", last_path, pos.epoch, pos.iteration)

    def checkpoint_state(rngs: list[dict]) -> dict:
        return {
            **_model_card(template, train_set, backbone_weights),
            **run_settings,
            "model": model.state_dict(),
            "ema": ema.module.state_dict(),
            "ema_steps": ema.steps,
            "batching": GROUPED_BATCHING if train_sampler.groups is not None else "random",
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "early_stopping": early.state_dict(),
            "position": vars(pos).copy(),
            "best": best,
            "rng": rngs,
        }

    total_epochs = hyper["epochs"]
    if pos.finished == "completed" and pos.epoch < total_epochs:
        pos.finished = None  # the same command with more --epochs extends the training
    if pos.finished:
        final = _final_event(pos, best, output, started, resumed_finished=True)
        if reporter:
            reporter.report(final)
        return final

    net = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if dist.enabled
        else model
    )
    train_loader = data_loader(
        InstanceSegDataset(train_set.records, template.input_size),
        train_sampler,
        batch_size,
        cfg,
        device,
    )
    val_sampler = EpochSampler(
        len(val_set.records), train=False, num_replicas=dist.world_size, rank=dist.rank
    )
    val_loader = data_loader(
        InstanceSegDataset(val_set.records, template.input_size),
        val_sampler,
        batch_size,
        cfg,
        device,
    )
    ground_truth = val_set.ground_truth()
    autocast_dtype = amp_dtype(device)
    if reporter:
        reporter.report(
            {
                "event": "start",
                "time": time.time(),
                "template": template.name,
                "total_epochs": total_epochs,
                "iterations_per_epoch": iterations_per_epoch,
                "train_images": len(train_set.records),
                "val_images": len(val_set.records),
                "classes": train_set.class_names,
                "device": str(device),
                "world_size": dist.world_size,
                "output": str(output),
                "resumed_at_iteration": pos.iteration,
            }
        )

    timing = {"train_seconds": 0.0, "train_iterations": 0, "val_seconds": 0.0}
    with _StopSignal() as stop:
        while pos.validation_pending or pos.epoch < total_epochs:
            if not pos.validation_pending:
                train_sampler.set_epoch(pos.epoch, skip=pos.epoch_step * batch_size)
                timing.update(epoch_start=time.monotonic(), epoch_loss=0.0, epoch_steps=0)
                interrupted = _train_one_epoch(
                    net, ema, optimizer, schedule, train_loader, device, autocast_dtype, pos,
                    cfg, iterations_per_epoch, total_epochs, reporter, stop, timing, dist,
                )  # fmt: skip
                if interrupted:
                    rngs = dist.gather_to_all(rng_state())  # a collective: every rank joins
                    if dist.is_main:
                        save_checkpoint(checkpoint_state(rngs), last_path)
                    return _stopped(pos, best, output, started, interrupted, reporter)
                pos.epoch, pos.epoch_step = pos.epoch + 1, 0
                pos.validation_pending = True
                if reporter and timing["epoch_steps"]:  # none: resumed at the epoch's end
                    reporter.report(
                        {
                            "event": "epoch",
                            "time": time.time(),
                            "epoch": pos.epoch,
                            "total_epochs": total_epochs,
                            "iteration": pos.iteration,
                            "loss": timing["epoch_loss"] / timing["epoch_steps"],
                            "learning_rate": schedule.learning_rate,
                            "seconds": time.monotonic() - timing["epoch_start"],
                        }
                    )
                # the epoch's training is safe before validation starts: a stop signal during
                # validation ends the run at once, and a crash there (out of memory on many
                # detections, a kill after the grace period) loses only the validation
                rngs = dist.gather_to_all(rng_state())
                if dist.is_main:
                    save_checkpoint(checkpoint_state(rngs), last_path)

            t0 = time.monotonic()
            results = coco_results(
                ema.module, val_loader, device, val_set.category_ids, dist, autocast_dtype,
                # one process stops between batches; DDP ranks finish together (they gather)
                should_stop=None if dist.enabled else lambda: stop.signum is not None,
            )  # fmt: skip
            if results is None:
                return _stopped(pos, best, output, started, "interrupted", reporter)
            metrics = dist.broadcast(score(ground_truth, results) if dist.is_main else None)
            timing["val_seconds"] = time.monotonic() - t0
            segm_map = metrics["segm"]["map"]
            improved = early.update(segm_map, pos.epoch)
            schedule.step_validation(segm_map)
            if improved:
                best = {
                    "epoch": pos.epoch,
                    "segm_map": segm_map,
                    "segm_map50": metrics["segm"]["map50"],
                    "bbox_map": metrics["bbox"]["map"],
                    "bbox_map50": metrics["bbox"]["map50"],
                    "f_measure": metrics["f_measure"]["best"]["f_measure"],
                    "f_measure_threshold": metrics["f_measure"]["best"]["threshold"],
                }
            pos.validation_pending = False
            stopping = early.should_stop(pos.epoch)
            if stopping or pos.epoch >= total_epochs:
                pos.finished = "early_stopped" if stopping else "completed"
            # last.pt was saved before validation; what validation changed (early stopping,
            # plateau schedule, best) goes into the next one. A run killed before then
            # validates this epoch again on resume. Only the end is saved here.
            rngs = dist.gather_to_all(rng_state()) if pos.finished else None
            if dist.is_main:
                if improved:
                    save_checkpoint(
                        {
                            **_model_card(template, train_set, backbone_weights),
                            "ema": ema.module.state_dict(),
                            "best": best,
                            "metrics": metrics,
                        },
                        output / BEST,
                    )
                if pos.finished:
                    save_checkpoint(checkpoint_state(rngs), last_path)
                reporter.report(
                    {
                        "event": "validation",
                        "time": time.time(),
                        "epoch": pos.epoch,
                        "total_epochs": total_epochs,
                        "iteration": pos.iteration,
                        "metrics": metrics,
                        "best": best,
                        "improved": improved,
                        "learning_rate": schedule.learning_rate,
                        "seconds": timing["val_seconds"],
                    }
                )
                _plot(output)
            if pos.finished:
                break

    final = _final_event(pos, best, output, started)
    if reporter:
        reporter.report(final)
        _plot(output)
    return final


def _stopped(
    pos: _Position, best: dict | None, output: Path, started: float, status: str, reporter
) -> dict:
    """The final event of a run stopped before its end (its checkpoint is already saved)."""
    final = _final_event(pos, best, output, started, status=status)
    if reporter:
        reporter.report(final)
    return final


def _train_one_epoch(
    net, ema, optimizer, schedule, loader, device, amp_dtype, pos: _Position, cfg: TrainConfig,
    iterations_per_epoch: int, total_epochs: int, reporter, stop: _StopSignal, timing: dict,
    dist: Distributed,
) -> str | None:  # fmt: skip
    """Runs the rest of the epoch; returns "interrupted"/"stopped" when it stopped early."""
    net.train()
    grad_clip = cfg.template.hyperparameters["grad_clip_norm"]
    batch_size = cfg.template.hyperparameters["batch_size"]
    # losses are summed on the device and read every log_interval: no per-step host sync
    sums: dict[str, torch.Tensor] = {}
    window_steps, window_start = 0, time.monotonic()
    for images, targets, _ in loader:
        inputs = to_model_input(images, device)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = net(inputs, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], grad_clip
            )
        optimizer.step()
        ema.update_parameters(_unwrap(net))
        pos.iteration += 1
        pos.epoch_step += 1
        schedule.step_iteration(pos.iteration)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
        window_steps += 1

        last_of_epoch = pos.epoch_step >= iterations_per_epoch
        if window_steps >= cfg.log_interval or last_of_epoch:
            means = dist.average(torch.stack(list(sums.values())) / window_steps).tolist()
            values = dict(zip(sums, means))
            total = sum(values.values())
            if not math.isfinite(total):
                raise TrainingDiverged(
                    f"the loss became {total} at iteration {pos.iteration} ({values}); "
                    f"lower --learning-rate or check the annotations"
                )
            elapsed = time.monotonic() - window_start
            timing["train_seconds"] += elapsed
            timing["train_iterations"] += window_steps
            timing["epoch_loss"] += total * window_steps
            timing["epoch_steps"] += window_steps
            per_iteration = timing["train_seconds"] / timing["train_iterations"]
            remaining = (total_epochs - pos.epoch) * iterations_per_epoch - pos.epoch_step
            epochs_left = total_epochs - pos.epoch
            if reporter:
                reporter.report(
                    {
                        "event": "iteration",
                        "time": time.time(),
                        "epoch": pos.epoch + 1,
                        "total_epochs": total_epochs,
                        "iteration": pos.iteration,
                        "epoch_iteration": pos.epoch_step,
                        "iterations_per_epoch": iterations_per_epoch,
                        "loss": total,
                        "losses": values,
                        "learning_rate": optimizer.param_groups[0]["lr"],
                        "images_per_second": window_steps * batch_size * dist.world_size / elapsed,
                        "eta_seconds": remaining * per_iteration
                        + epochs_left * timing["val_seconds"],
                    }
                )
            sums, window_steps, window_start = {}, 0, time.monotonic()

        if cfg.stop_after_iterations is not None and pos.iteration >= cfg.stop_after_iterations:
            return "stopped"
        # under DDP every rank must agree to stop; ask only at log boundaries (it syncs)
        if (not dist.enabled or window_steps == 0) and dist.broadcast(stop.signum) is not None:
            return "interrupted"
    return None


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net


def _model_card(template: Template, train_set: CocoSubset, backbone_weights: str) -> dict:
    """What eval and predict need to rebuild the model without the template file."""
    return {
        "template": template.name,
        "backbone_weights": backbone_weights,  # decides the norm layers' layout
        "input_size": template.input_size,
        "model_config": template.model,
        "hyperparameters": template.hyperparameters,
        "class_names": train_set.class_names,
        "category_ids": train_set.category_ids,
    }


def _check_compatible(
    state: dict, template: Template, train_set: CocoSubset, run_settings: dict
) -> None:
    """A resume is exact only with the same model, classes, seed, batch and world size."""
    if state.get("template") != template.name or state.get("class_names") != train_set.class_names:
        raise CheckpointError(
            f"the checkpoint in the output directory is from template {state.get('template')} "
            f"with classes {state.get('class_names')}, not {template.name} with "
            f"{train_set.class_names}; use another --output to start a new training"
        )
    for key, value in run_settings.items():
        if state.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"last.pt in the output directory was trained with {key} {state.get(key)}, not "
                f"{value}; resume with the same {flag} (or nproc/nnodes for world_size), "
                f"or use another --output to start a new training"
            )


def _load_init_weights(model: torch.nn.Module, path: Path, class_names: list[str]) -> None:
    state = load_checkpoint(path)
    weights = state.get("ema") or state.get("model")
    if weights is None:
        raise CheckpointError(f"--weights '{path}' holds no model weights")
    if state.get("class_names") != class_names:
        raise CheckpointError(
            f"--weights '{path}' was trained on classes {state.get('class_names')}, but this "
            f"dataset has {class_names}; fine-tuning keeps the classes, so start from "
            f"--backbone-weights instead"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"--weights '{path}' does not fit the {state.get('template')} model built here: {e}"
        ) from e


def _final_event(
    pos: _Position,
    best: dict,
    output: Path,
    started: float,
    status: str | None = None,
    resumed_finished: bool = False,
) -> dict:
    return {
        "event": "final",
        "time": time.time(),
        "status": status or pos.finished or "completed",
        "epochs": pos.epoch,
        "iteration": pos.iteration,
        "best": best,
        "best_checkpoint": str(Path(output) / BEST) if best else None,
        "last_checkpoint": str(Path(output) / LAST),
        "wall_seconds": time.monotonic() - started,
        "already_finished": resumed_finished,
    }


def _plot(output: Path) -> None:
    try:
        plot_curves(output / METRICS_FILENAME, output / CURVES)
    except Exception as e:  # a plot must never cost a training run
        log.warning("could not draw %s: %s", output / CURVES, e)
