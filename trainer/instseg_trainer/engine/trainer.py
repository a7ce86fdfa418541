"""The training loop, cut as torchvision's detection references cut theirs: `train` sets a
run up (engine/run.py) and `fit` goes through its epochs, each `train_one_epoch`, then
`evaluate` and `validate_and_save`. Checkpoints: last.pt after each epoch's training (before
its validation) and at the end, best.pt at each better validation.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from instseg_trainer.engine.batch_size import adapted_event, halved_after_oom
from instseg_trainer.engine.checkpoint import rng_state, save_checkpoint
from instseg_trainer.engine.distributed import setup_distributed
from instseg_trainer.engine.run import (
    TrainConfig,
    TrainingRun,
    check_output_dir,
    loaders,
    prepare_run,
    wrap_for_training,
)
from instseg_trainer.errors import InstsegError
from instseg_trainer.evaluation.evaluator import coco_results, score
from instseg_trainer.evaluation.tiled import predict_tiled
from instseg_trainer.models.mask_rcnn import to_model_input
from instseg_trainer.reporting.curves import plot_curves
from instseg_trainer.reporting.events import Epoch, Final, Iteration, Start, Validation
from instseg_trainer.reporting.reporters import METRICS_FILENAME, Reporter

__all__ = ["TrainConfig", "TrainingDiverged", "check_output_dir", "train"]

log = logging.getLogger(__name__)

CURVES = "curves.png"


class TrainingDiverged(InstsegError):
    """The loss became NaN or infinite."""


class StopSignal:
    """SIGTERM/SIGINT ask for a checkpoint at the next iteration boundary (pod eviction,
    Job suspension, Ctrl-C), instead of losing the epoch in progress."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
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


def train(cfg: TrainConfig, reporter: Reporter) -> Final:
    """Trains, validating each epoch; returns the final event. Resumes from `last.pt`; after
    the GPU ran out of memory, resumes from it with half the batch (engine.batch_size)."""
    dist = setup_distributed(cfg.device)
    try:
        while True:
            used = cfg  # the config the run trained with (prepare_run may adapt its batch)
            try:
                run = prepare_run(cfg, reporter, dist)
                used = run.cfg
                return fit(run)
            except torch.OutOfMemoryError as error:
                message = str(error).splitlines()[0]
            # outside the except block: the failed run's tensors are free once its frames are
            run = None
            gc.collect()
            torch.cuda.empty_cache()
            cfg = halved_after_oom(used, dist, message)
            if dist.is_main:
                reporter.report(adapted_event(cfg, "out_of_memory", used))
    finally:
        dist.shutdown()


def fit(run: TrainingRun) -> Final:
    """Trains the run's remaining epochs, each followed by its validation."""
    pos = run.pos
    if pos.finished == "completed" and pos.epoch < run.total_epochs:
        pos.finished = None  # the same command with more --epochs extends the training
    if pos.finished:
        return run.final(already_finished=True)
    net = wrap_for_training(run)
    train_loader, val_loader = loaders(run)
    run.report(_start_event(run))
    with StopSignal() as stop:
        while pos.validation_pending or pos.epoch < run.total_epochs:
            if not pos.validation_pending:
                run.sampler.set_epoch(pos.epoch, skip=pos.epoch_step * run.batch_size)
                stopped = train_one_epoch(run, net, train_loader, stop)
                if stopped:
                    _save_last(run)
                    return run.final(stopped, stop.signum)
                _end_epoch(run)
            metrics = evaluate(run, val_loader, stop)
            if metrics is None:
                return run.final("interrupted", stop.signum)
            validate_and_save(run, metrics)
            if pos.finished:
                break
    final = run.final()
    if run.dist.is_main:
        _plot(run.output)
    return final


@dataclass
class _LossWindow:
    """The losses of the iterations since the last iteration event, summed on the device
    (read only at the event: no host sync per step)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    start: float = field(default_factory=time.monotonic)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.steps += 1


def train_one_epoch(
    run: TrainingRun, net: torch.nn.Module, loader: DataLoader, stop: StopSignal
) -> str | None:
    """Runs the rest of the epoch; "interrupted" (a stop signal) or "stopped"
    (--stop-after-iterations) when it ended early."""
    net.train()
    pos, cfg, dist = run.pos, run.cfg, run.dist
    run.timing.start_epoch()
    window = _LossWindow()
    for images, targets, _ in loader:
        window.add(_step(run, net, images, targets))
        if window.steps >= cfg.log_interval or pos.epoch_step >= run.iterations_per_epoch:
            _report_iterations(run, window)
            window = _LossWindow()
        if cfg.stop_after_iterations is not None and pos.iteration >= cfg.stop_after_iterations:
            return "stopped"
        # under DDP every rank must agree to stop; ask only at log boundaries (it syncs)
        if (not dist.enabled or window.steps == 0) and dist.broadcast(stop.signum) is not None:
            return "interrupted"
    return None


def _step(
    run: TrainingRun, net: torch.nn.Module, images: list, targets: list[dict]
) -> dict[str, torch.Tensor]:
    """One optimizer step (and its EMA update); the batch's losses."""
    device, dtype = run.device, run.autocast_dtype
    inputs = to_model_input(images, device)
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        losses = net(inputs, targets)
    loss = sum(losses.values())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.hyper["grad_clip_norm"]:
        parameters = [p for group in run.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, run.hyper["grad_clip_norm"])
    run.optimizer.step()
    run.ema.update_parameters(net.module if isinstance(net, DistributedDataParallel) else net)
    run.pos.iteration += 1
    run.pos.epoch_step += 1
    run.schedule.step_iteration(run.pos.iteration)
    return losses


def _report_iterations(run: TrainingRun, window: _LossWindow) -> None:
    """The iteration event of a window: mean losses over every rank, speed and ETA. A loss
    that is no longer finite stops the training."""
    pos, timing, dist = run.pos, run.timing, run.dist
    means = dist.average(torch.stack(list(window.sums.values())) / window.steps).tolist()
    losses = dict(zip(window.sums, means))
    total = sum(losses.values())
    if not math.isfinite(total):
        raise TrainingDiverged(
            f"the loss became {total} at iteration {pos.iteration} ({losses}); "
            f"lower --learning-rate or check the annotations"
        )
    elapsed = time.monotonic() - window.start
    timing.train_seconds += elapsed
    timing.train_iterations += window.steps
    timing.epoch_loss += total * window.steps
    timing.epoch_steps += window.steps
    per_iteration = timing.train_seconds / timing.train_iterations
    remaining = (run.total_epochs - pos.epoch) * run.iterations_per_epoch - pos.epoch_step
    eta = remaining * per_iteration + (run.total_epochs - pos.epoch) * timing.val_seconds
    run.report(
        Iteration(
            epoch=pos.epoch + 1, total_epochs=run.total_epochs, iteration=pos.iteration,
            epoch_iteration=pos.epoch_step, iterations_per_epoch=run.iterations_per_epoch,
            loss=total, losses=losses, learning_rate=run.optimizer.param_groups[0]["lr"],
            images_per_second=window.steps * run.batch_size * dist.world_size / elapsed,
            eta_seconds=eta,
        )
    )  # fmt: skip


def _end_epoch(run: TrainingRun) -> None:
    """The epoch's training is done: its event, and last.pt before validation starts (a stop
    signal during validation ends the run at once, and a crash there, out of memory on many
    detections or a kill after the grace period, loses only the validation)."""
    pos, timing = run.pos, run.timing
    pos.epoch, pos.epoch_step = pos.epoch + 1, 0
    pos.validation_pending = True
    if timing.epoch_steps:  # none: resumed at the epoch's very end
        run.report(
            Epoch(
                epoch=pos.epoch, total_epochs=run.total_epochs, iteration=pos.iteration,
                loss=timing.epoch_loss / timing.epoch_steps,
                learning_rate=run.schedule.learning_rate,
                seconds=time.monotonic() - timing.epoch_start,
            )
        )  # fmt: skip
    _save_last(run)


def _save_last(run: TrainingRun) -> None:
    rngs = run.dist.gather_to_all(rng_state())  # a collective: every rank joins
    if run.dist.is_main:
        save_checkpoint(run.checkpoint_state(rngs), run.last_path)


def evaluate(run: TrainingRun, loader: DataLoader, stop: StopSignal) -> dict | None:
    """COCO metrics and the F-measure of the EMA model on the val set; None when a stop signal
    came (single process only: DDP ranks finish together, they gather)."""
    started, dist = time.monotonic(), run.dist
    results = coco_results(
        run.ema.module, loader, run.device, run.val_set.category_ids, dist, run.autocast_dtype,
        should_stop=None if dist.enabled else lambda: stop.signum is not None,
        predictor=predict_tiled if run.tiling else None,
    )  # fmt: skip
    if results is None:
        return None
    metrics = dist.broadcast(score(run.ground_truth, results) if dist.is_main else None)
    run.timing.val_seconds = time.monotonic() - started
    return metrics


def validate_and_save(run: TrainingRun, metrics: dict) -> None:
    """What a validation decides: the best epoch (best.pt), the plateau schedule, early
    stopping, and at the end of training last.pt. last.pt was saved before validation; what
    validation changed goes into the next one (a run killed before then validates this
    epoch again on resume)."""
    pos = run.pos
    segm_map = metrics["segm"]["map"]
    improved = run.early.update(segm_map, pos.epoch)
    run.schedule.step_validation(segm_map)
    if improved:
        run.best = _best_of(metrics, pos.epoch)
    pos.validation_pending = False
    stopping = run.early.should_stop(pos.epoch)
    if stopping or pos.epoch >= run.total_epochs:
        pos.finished = "early_stopped" if stopping else "completed"
        _save_last(run)
    if not run.dist.is_main:
        return
    if improved:
        run.save_best(metrics)
    run.report(
        Validation(
            epoch=pos.epoch, total_epochs=run.total_epochs, iteration=pos.iteration,
            metrics=metrics, best=run.best, improved=improved,
            learning_rate=run.schedule.learning_rate, seconds=run.timing.val_seconds,
        )
    )  # fmt: skip
    _plot(run.output)


def _best_of(metrics: dict, epoch: int) -> dict:
    return {
        "epoch": epoch,
        "segm_map": metrics["segm"]["map"],
        "segm_map50": metrics["segm"]["map50"],
        "bbox_map": metrics["bbox"]["map"],
        "bbox_map50": metrics["bbox"]["map50"],
        "f_measure": metrics["f_measure"]["best"]["f_measure"],
        "f_measure_threshold": metrics["f_measure"]["best"]["threshold"],
    }


def _start_event(run: TrainingRun) -> Start:
    return Start(
        template=run.cfg.template.name, total_epochs=run.total_epochs,
        iterations_per_epoch=run.iterations_per_epoch,
        train_images=len(run.train_set.records), val_images=len(run.val_set.records),
        classes=run.train_set.class_names, device=str(run.device),
        world_size=run.dist.world_size, output=str(run.output),
        resumed_at_iteration=run.pos.iteration, batch_size=run.batch_size,
    )  # fmt: skip


def _plot(output: Path) -> None:
    try:
        plot_curves(output / METRICS_FILENAME, output / CURVES)
    except Exception as e:  # a plot must never cost a training run
        log.warning("could not draw %s: %s", output / CURVES, e)
