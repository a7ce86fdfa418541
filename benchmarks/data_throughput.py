"""Data pipeline throughput per DataLoader worker count, against what the model consumes.

The pipeline is the trainer's own: InstanceSegDataset over a generated dataset (PNG decode,
flip, resize, masks rasterised at the final size), the training EpochSampler and the
trainer's DataLoader (same collate, pin_memory on CUDA, persistent workers). For each worker
count it times `--batches` batches after the first one (worker start-up is not counted),
with nothing else running. The model's rate is images/s of bare training steps of the
template's model (build_model) on batches already on the device, or `--model-img-s`.

    .venv/bin/python benchmarks/data_throughput.py                   # CPU, about a minute
    python benchmarks/data_throughput.py --device cuda --template MaskRCNN-ResNet50 \\
        --input-size 1024 --batch-size 4 --workers 0,1,2,4,8

Target (issue 5): with the default worker count the pipeline delivers >= 5x what the model
consumes. The last line is one JSON object: template, input_size, batch_size, device,
img_s per worker count, model_img_s, default_workers and ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import (
    DEFAULT_WORKERS,
    SEED,
    bare_loop_img_s,
    sample_dataset,
    training_batches,
)

from instseg_trainer.data.coco import load_coco_subset
from instseg_trainer.data.dataset import InstanceSegDataset
from instseg_trainer.engine.distributed import configure_device, resolve_device
from instseg_trainer.engine.run import TrainConfig, data_loader, train_sampler_for
from instseg_trainer.models.mask_rcnn import build_model
from instseg_trainer.sample_data import CLASS_NAMES
from instseg_trainer.templates import Template, get_template


def pipeline_img_s(
    template: Template, data: Path, workers: int, batches: int, device: torch.device
) -> float:
    """images/s of the trainer's training DataLoader over `batches` batches after the first."""
    hyper = template.hyperparameters
    records = load_coco_subset(data, "train").records
    sampler = train_sampler_for(records, hyper, SEED)
    cfg = TrainConfig(
        template, train_roots=data, val_roots=data, output=data, num_workers=workers, seed=SEED
    )
    loader = data_loader(
        InstanceSegDataset(records, template.input_size), sampler, cfg,
        device,  # pinned for CUDA as in training
    )  # fmt: skip
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        batch_images, _, _ = next(it)
        images += len(batch_images)
    seconds = time.perf_counter() - start
    del it, loader  # stops the workers before the next worker count starts its own
    return images / seconds


def model_img_s(
    template: Template, data: Path, device: torch.device, warmup: int, steps: int
) -> float:
    """images/s of bare training steps of our model on batches already on the device."""
    batches = training_batches(data, template, warmup + steps, device)
    torch.manual_seed(SEED)
    model = build_model(template.model, len(CLASS_NAMES), template.input_size, "none").to(device)
    hyper = template.hyperparameters
    optimizer = torch.optim.SGD(
        model.parameters(), lr=hyper["learning_rate"], momentum=hyper["momentum"],
        weight_decay=hyper["weight_decay"],
    )  # fmt: skip
    img_s, _ = bare_loop_img_s(model, optimizer, batches, warmup, device, hyper["batch_size"])
    return img_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="MaskRCNN-EfficientNetB2B")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument(
        "--workers",
        default="0,1,2",
        help=f"comma-separated worker counts; the trainer's default ({DEFAULT_WORKERS}) is added",
    )
    parser.add_argument("--device", default="cpu", help="where the model's rate is measured")
    parser.add_argument("--model-warmup", type=int, default=1, help="untimed model steps")
    parser.add_argument("--model-steps", type=int, default=3, help="timed model steps")
    parser.add_argument("--model-img-s", type=float, help="the model's rate; skips measuring it")
    parser.add_argument("--data", type=Path, help="sample dataset to reuse (written if absent)")
    args = parser.parse_args()
    worker_counts = sorted({int(w) for w in args.workers.split(",")} | {DEFAULT_WORKERS})

    device = resolve_device(args.device)
    configure_device(device)  # as the trainer does
    template = get_template(args.template).with_overrides(
        input_size=args.input_size, batch_size=args.batch_size
    )
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as scratch:
        needed = max(args.batches + 1, args.model_warmup + args.model_steps) * args.batch_size
        data = sample_dataset(args.data, needed, args.input_size, Path(scratch))
        rates = {}
        for workers in worker_counts:
            rates[workers] = pipeline_img_s(template, data, workers, args.batches, device)
            print(f"{workers} workers: {rates[workers]:.1f} img/s", flush=True)
        model_rate = args.model_img_s or model_img_s(
            template, data, device, args.model_warmup, args.model_steps
        )

    ratio = rates[DEFAULT_WORKERS] / model_rate
    cuda = device.type == "cuda"
    result = {
        "benchmark": "data_throughput",
        "template": template.name,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batches": args.batches,
        "img_s": {str(w): round(v, 2) for w, v in rates.items()},
        "model_img_s": round(model_rate, 3),
        "model_img_s_measured": args.model_img_s is None,
        "default_workers": DEFAULT_WORKERS,
        "ratio": round(ratio, 2),
    }
    print(
        f"model consumes {model_rate:.2f} img/s; pipeline at the default {DEFAULT_WORKERS} "
        f"workers delivers {rates[DEFAULT_WORKERS]:.1f} img/s: {ratio:.1f}x (target >= 5x)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
