"""Our template recipe against torchvision's reference detection recipe, same model and data.

Both train the same template (model, input size, batch size, epochs, seed, random flip) on
the same generated shapes from the same initialisation, and are scored on the same val
images with the same evaluator:
- ours: the template's recipe (OTX's): SGD, linear warmup, ReduceLROnPlateau on val segm
  mAP, EMA of the weights, gradient clipping, early stopping; best.pt (the best validation);
- torchvision's (references/detection/train.py defaults): SGD lr 0.02 per 16 images (scaled
  linearly to the batch), momentum 0.9, weight decay 1e-4, warmup over the first epoch from
  lr/1000 (at most 1000 iterations), multi-step decay x0.1 at 16/26 and 22/26 of the
  epochs; no EMA, no plateau, no clipping, no early stopping; the last epoch's model, as the
  reference reports it (its best epoch too, for comparison).

    .venv/bin/python benchmarks/recipe_vs_torchvision.py            # about 20 min on 2 cores

The last line is one JSON object: per recipe segm and bbox mAP (and mAP50), with the
differences ours - torchvision's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from torch.optim.lr_scheduler import LinearLR, MultiStepLR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instseg_trainer.engine.distributed import setup_distributed  # noqa: E402
from instseg_trainer.engine.ema import WeightEma  # noqa: E402
from instseg_trainer.engine.run import TrainConfig, prepare_run  # noqa: E402
from instseg_trainer.engine.trainer import fit  # noqa: E402
from instseg_trainer.evaluation.inference import evaluate_dataset, load_model  # noqa: E402
from instseg_trainer.reporting.reporters import make_reporters  # noqa: E402
from instseg_trainer.sample_data import write_sample_dataset  # noqa: E402
from instseg_trainer.templates import get_template  # noqa: E402

REFERENCE_LR_PER_16_IMAGES = 0.02
REFERENCE_MILESTONES = (16 / 26, 22 / 26)


class ReferenceSchedule:
    """torchvision's reference schedule behind our engine's schedule interface: LinearLR
    warmup stepped per iteration in the first epoch, MultiStepLR stepped once per epoch."""

    def __init__(self, optimizer, epochs: int, iterations_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.warmup_iterations = min(1000, iterations_per_epoch - 1)
        self.warmup = LinearLR(optimizer, start_factor=1 / 1000,
                               total_iters=max(self.warmup_iterations, 1))  # fmt: skip
        milestones = sorted({max(1, round(epochs * m)) for m in REFERENCE_MILESTONES})
        self.decay = MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def step_iteration(self, iteration: int) -> None:
        if iteration <= self.warmup_iterations:
            self.warmup.step()

    def step_validation(self, metric: float) -> None:  # once per epoch, after its training
        self.decay.step()

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"warmup": self.warmup.state_dict(), "decay": self.decay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.warmup.load_state_dict(state["warmup"])
        self.decay.load_state_dict(state["decay"])


def train_ours(args, data: Path, output: Path) -> None:
    template = get_template(args.template).with_overrides(epochs=args.epochs,
                                                          input_size=args.input_size)  # fmt: skip
    _fit(TrainConfig(template, data, data, output, device="cpu", num_workers=args.workers,
                     backbone_weights="none"), reference=False)  # fmt: skip


def train_reference(args, data: Path, output: Path) -> None:
    recipe = get_template(args.template)
    batch = recipe.hyperparameters["batch_size"]
    template = recipe.with_overrides(epochs=args.epochs, input_size=args.input_size).with_settings({
        "hyperparameters.learning_rate": REFERENCE_LR_PER_16_IMAGES * batch / 16,
        "hyperparameters.momentum": 0.9, "hyperparameters.weight_decay": 1e-4,
        "hyperparameters.grad_clip_norm": 0.0, "hyperparameters.early_stopping_patience": 0,
        "hyperparameters.flip_probability": 0.5,
    })  # fmt: skip
    _fit(TrainConfig(template, data, data, output, device="cpu", num_workers=args.workers,
                     backbone_weights="none"), reference=True)  # fmt: skip


def _fit(cfg: TrainConfig, reference: bool) -> None:
    dist = setup_distributed(cfg.device)
    reporter = make_reporters(cfg.output)
    try:
        run = prepare_run(cfg, reporter, dist)
        if reference:
            run.schedule = ReferenceSchedule(run.optimizer, run.total_epochs,
                                             run.iterations_per_epoch)  # fmt: skip
            run.ema = WeightEma(run.model, decay=0.0)  # "EMA" = the weights themselves
        fit(run)
    finally:
        reporter.close()
        dist.shutdown()


def score(weights: Path, data: Path, output: Path) -> dict:
    metrics = evaluate_dataset(load_model(weights, "cpu"), [data], output, "val", 2, 0)
    return {f"{task}_{key}": round(metrics[task][key], 4)
            for task in ("segm", "bbox") for key in ("map", "map50")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="MaskRCNN-EfficientNetB2B")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--val-images", type=int, default=24)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="recipe-") as work:
        work = Path(work)
        data = work / "data"
        sizes = {"min_size": args.input_size // 2, "max_size": args.input_size}
        write_sample_dataset(data, num_train=args.train_images, num_val=args.val_images,
                             seed=0, **sizes)  # fmt: skip
        for name, train in (("ours", train_ours), ("torchvision", train_reference)):
            start = time.monotonic()
            train(args, data, work / name)
            seconds = round(time.monotonic() - start, 1)
            rows[name] = {**score(work / name / "best.pt", data, work / f"{name}-best"),
                          "train_s": seconds}  # fmt: skip
            if name == "torchvision":  # the reference reports its last model
                last = score(work / name / "last.pt", data, work / f"{name}-last")
                rows["torchvision-last"] = {**last, "train_s": seconds}
    for name, row in rows.items():
        print(f"{name:17s} segm mAP {row['segm_map']:.4f} (50: {row['segm_map50']:.4f})  "
              f"bbox mAP {row['bbox_map']:.4f} (50: {row['bbox_map50']:.4f})  "
              f"train {row['train_s']:.0f} s")  # fmt: skip
    delta = {key: round(rows["ours"][key] - rows["torchvision-last"][key], 4)
             for key in ("segm_map", "bbox_map", "segm_map50", "bbox_map50")}  # fmt: skip
    print(json.dumps({"benchmark": "recipe_vs_torchvision", "template": args.template,
                      "epochs": args.epochs, "input_size": args.input_size,
                      "train_images": args.train_images, "val_images": args.val_images,
                      "recipes": rows, "ours_minus_torchvision_last": delta}))  # fmt: skip


if __name__ == "__main__":
    main()
