"""Training throughput: instseg's training loop against a bare torchvision loop.

Per template, input size and batch, in one process and alternating (ours, torchvision, ours,
torchvision, ...) so that drift on a shared machine hits both sides alike:

- ours: `instseg_trainer.engine.trainer.train()` itself, stopped after warm-up + timed
  iterations: its DataLoader workers decode the PNGs of a generated dataset, flip, resize and
  rasterise masks; its model (build_model), SGD, warm-up schedule, gradient clipping, EMA and
  autocast. Time is read from its own iteration events (log interval = gcd(warmup, steps)),
  from the event after the warm-up to the last one.
- torchvision: torchvision's `MaskRCNN` class with its own transform and losses, assembled
  with the same backbone, anchors, heads and sampling settings; the same batches (same
  images, order and flips) already decoded and on the device, and a plain step:
  `loss = sum(model(images, targets).values()); loss.backward(); opt.step(); opt.zero_grad()`
  with plain SGD (momentum and weight decay as the template); bf16 autocast on CUDA, like
  torchvision's references with --amp. It runs with torch's default cudnn.benchmark/TF32
  switches, as a plain script would (train() may change them; --same-flags keeps them).

Both sides start from random init (no weight download). Peak memory: on CUDA,
torch.cuda.max_memory_allocated per side (torchvision's includes its preloaded batches,
reported beside it); on CPU only the process's peak RSS (ru_maxrss),
a weak proxy shared by both sides (DataLoader workers are other processes, not counted).
MFU (CUDA): FLOPs per image from instseg_trainer.models.complexity at the input size, scaled
by the padded batch's area, x3 for forward + backward, against 790 TFLOP/s (H200 bf16).

    .venv/bin/python benchmarks/train_throughput.py                  # CPU, a few minutes
    python benchmarks/train_throughput.py --device cuda --template MaskRCNN-ResNet50 \\
        --input-size 1024 --batch-size 4 --warmup 5 --steps 15

Targets (issue 5): CPU ratio (ours / torchvision images/s) >= 1.0; GPU, R50 at 1024 px >= 2.0.
The last line is one JSON object: template, input_size, batch_size, device, ours_img_s,
torchvision_img_s, ratio, peak memory, MFU and the per-round figures.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from instseg_trainer.data.coco import load_coco_subset
from instseg_trainer.data.dataset import InstanceSegDataset
from instseg_trainer.engine.distributed import configure_device, resolve_device
from instseg_trainer.engine.run import TrainConfig, train_sampler_for
from instseg_trainer.engine.trainer import train
from instseg_trainer.models.backbones import build_backbone
from instseg_trainer.models.complexity import measure_complexity
from instseg_trainer.models.mask_rcnn import (
    FEATURE_LEVELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    to_model_input,
)
from instseg_trainer.reporting.events import Iteration, parse_time
from instseg_trainer.reporting.reporters import MemoryReporter
from instseg_trainer.sample_data import CLASS_NAMES, write_sample_dataset
from instseg_trainer.templates import Template, get_template

PEAK_FLOPS = 790e12  # H200 dense bf16, as measured on the lent machines
DEFAULT_WORKERS = TrainConfig.num_workers
SEED = 0


def sample_dataset(root: Path | None, images: int, input_size: int, scratch: Path) -> Path:
    """`root` if it already holds a dataset with >= `images` train images, else a new one.

    Generated images are 0.75-1.25x the input size per side, so the pipeline resizes both up
    and down and the aspect ratio varies, as in real data.
    """
    root = root or scratch / "data"
    annotations = root / "annotations" / "instances_train.json"
    if annotations.is_file():
        have = len(json.loads(annotations.read_text())["images"])
        if have < images:
            sys.exit(
                f"{root} holds {have} train images; this run needs {images} (use another --data)"
            )
        return root
    start = time.monotonic()
    write_sample_dataset(
        root,
        num_train=images,
        num_val=1,
        seed=SEED,
        min_size=max(32, input_size * 3 // 4),
        max_size=input_size * 5 // 4,
    )
    print(f"wrote {images} sample images to {root} in {time.monotonic() - start:.1f} s", flush=True)
    return root


def training_batches(
    root: Path, template: Template, count: int, device: torch.device
) -> list[tuple[list[torch.Tensor], list[dict]]]:
    """The trainer's first `count` batches (same sampler, order and flips), float on device."""
    records = load_coco_subset(root, "train").records
    dataset = InstanceSegDataset(records, template.input_size)
    batch = template.hyperparameters["batch_size"]
    keys = list(train_sampler_for(records, template.hyperparameters, SEED))[: count * batch]
    batches = []
    for b in range(count):
        items = [dataset[key] for key in keys[b * batch : (b + 1) * batch]]
        images = to_model_input([im for im, _, _ in items], device)
        targets = [{k: v.to(device) for k, v in t.items()} for _, t, _ in items]
        batches.append((images, targets))
    return batches


def torchvision_model(template: Template, num_classes: int) -> MaskRCNN:
    """torchvision's MaskRCNN (its transform, losses and box coder) with the template's parts."""
    cfg = template.model
    rpn, roi, mask = cfg["rpn"], cfg["roi"], cfg["mask_head"]
    backbone = build_backbone(
        cfg["backbone"], cfg["fpn_channels"], "none", cfg.get("drop_path_rate", 0.1)
    )
    channels = backbone.out_channels
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=template.input_size,
        max_size=template.input_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        rpn_anchor_generator=AnchorGenerator(
            sizes=tuple((s,) for s in cfg["anchor_sizes"]),
            aspect_ratios=(tuple(cfg["aspect_ratios"]),) * len(cfg["anchor_sizes"]),
        ),
        rpn_pre_nms_top_n_train=rpn["pre_nms_top_n_train"],
        rpn_pre_nms_top_n_test=rpn["pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=rpn["post_nms_top_n_train"],
        rpn_post_nms_top_n_test=rpn["post_nms_top_n_test"],
        rpn_nms_thresh=rpn["nms_thresh"],
        rpn_fg_iou_thresh=rpn["fg_iou_thresh"],
        rpn_bg_iou_thresh=rpn["bg_iou_thresh"],
        rpn_batch_size_per_image=rpn["batch_size_per_image"],
        rpn_positive_fraction=rpn["positive_fraction"],
        box_roi_pool=MultiScaleRoIAlign(FEATURE_LEVELS, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, roi["representation_size"]),
        box_predictor=FastRCNNPredictor(roi["representation_size"], num_classes + 1),
        box_score_thresh=roi["score_thresh"],
        box_nms_thresh=roi["nms_thresh"],
        box_detections_per_img=roi["detections_per_img"],
        box_fg_iou_thresh=roi["fg_iou_thresh"],
        box_bg_iou_thresh=roi["bg_iou_thresh"],
        box_batch_size_per_image=roi["batch_size_per_image"],
        box_positive_fraction=roi["positive_fraction"],
        mask_roi_pool=MultiScaleRoIAlign(FEATURE_LEVELS, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, [mask["channels"]] * mask["convs"], 1),
        mask_predictor=MaskRCNNPredictor(mask["channels"], mask["channels"], num_classes + 1),
    )


def global_flags() -> dict:
    """torch's process-wide speed switches, which a training run may leave changed."""
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def set_global_flags(flags: dict) -> None:
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_allow_tf32"]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def run_ours(
    template: Template, data: Path, device: torch.device, warmup: int, steps: int, workers: int
) -> tuple[float, float | None]:
    """images/s of train() over `steps` iterations after `warmup`, and its peak memory."""
    log = MemoryReporter()
    with tempfile.TemporaryDirectory(prefix="ours-") as output:
        cfg = TrainConfig(
            template=template,
            train_roots=data,
            val_roots=data,
            output=Path(output),
            device=str(device),
            num_workers=workers,
            seed=SEED,
            backbone_weights="none",
            stop_after_iterations=warmup + steps,
            log_interval=math.gcd(warmup, steps),
        )
        reset_peak_memory(device)
        final = train(cfg, log)
        peak = peak_memory_mib(device)
    at = {e.iteration: parse_time(e.time) for e in log.events if isinstance(e, Iteration)}
    if final.status != "stopped" or warmup not in at or warmup + steps not in at:
        raise RuntimeError(f"train() did not stop after {warmup + steps} iterations: {final}")
    return steps * template.hyperparameters["batch_size"] / (at[warmup + steps] - at[warmup]), peak


def bare_loop_img_s(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list,
    warmup: int,
    device: torch.device,
    batch_size: int,
) -> tuple[float, float | None]:
    """images/s of the bare loop over batches[warmup:], after batches[:warmup], and peak memory."""
    autocast = device.type == "cuda"  # bf16 there; fp32 on CPU, as the trainer does
    reset_peak_memory(device)
    model.train()
    start = 0.0
    for i, (images, targets) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return (len(batches) - warmup) * batch_size / seconds, peak_memory_mib(device)


def flops_per_image(template: Template, batches: list) -> float:
    """Template FLOPs at the square input size, scaled by the area of the padded batch tensor
    (each batch is padded to its largest height and width, rounded up to 32)."""
    size = template.input_size
    square = measure_complexity(template, len(CLASS_NAMES))["gflops"] * 1e9
    areas = [
        math.ceil(max(im.shape[-2] for im in images) / 32)
        * 32
        * math.ceil(max(im.shape[-1] for im in images) / 32)
        * 32
        for images, _ in batches
    ]
    return square * statistics.mean(areas) / size**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="MaskRCNN-EfficientNetB2B")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per block")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=2, help="ours + torchvision blocks")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (bf16 autocast)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="ours' DataLoader")
    parser.add_argument("--data", type=Path, help="sample dataset to reuse (written if absent)")
    parser.add_argument(
        "--same-flags",
        action="store_true",
        help="the torchvision loop keeps the switches train() set (cudnn.benchmark, TF32) "
        "instead of torch's defaults",
    )
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")

    device = resolve_device(args.device)
    # the trainer's CPU setting (flush denormals) for both loops; the CUDA tuning switches
    # only as --keep-tuning says
    configure_device(device, tune=False)
    template = get_template(args.template).with_overrides(
        input_size=args.input_size, batch_size=args.batch_size
    )
    steps_per_block = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch:
        data = sample_dataset(
            args.data, steps_per_block * args.batch_size, args.input_size, Path(scratch)
        )
        batches = training_batches(data, template, steps_per_block, device)
        torch.manual_seed(SEED)
        model = torchvision_model(template, len(CLASS_NAMES)).to(device)
        hyper = template.hyperparameters
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=hyper["learning_rate"],
            momentum=hyper["momentum"],
            weight_decay=hyper["weight_decay"],
        )
        ours, theirs, ours_peak, theirs_peak = [], [], [], []
        defaults = global_flags()
        for r in range(args.rounds):
            img_s, peak = run_ours(template, data, device, args.warmup, args.steps, args.workers)
            ours.append(img_s)
            ours_peak.append(peak)
            trainer_flags = global_flags()
            if not args.same_flags:
                set_global_flags(defaults)  # the bare loop runs as a plain script would
            img_s, peak = bare_loop_img_s(
                model, optimizer, batches, args.warmup, device, args.batch_size
            )
            theirs.append(img_s)
            theirs_peak.append(peak)
            print(
                f"round {r + 1}/{args.rounds}: ours {ours[-1]:.2f} img/s, "
                f"torchvision {theirs[-1]:.2f} img/s",
                flush=True,
            )
        flops = flops_per_image(template, batches)
        preloaded = sum(
            t.numel() * t.element_size()
            for images, targets in batches
            for t in [*images, *(v for target in targets for v in target.values())]
        )

    ours_img_s, theirs_img_s = statistics.median(ours), statistics.median(theirs)
    ratio = ours_img_s / theirs_img_s
    cuda = device.type == "cuda"
    result = {
        "benchmark": "train_throughput",
        "template": template.name,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": "bf16-autocast" if cuda else "fp32",
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "ours_img_s": round(ours_img_s, 3),
        "torchvision_img_s": round(theirs_img_s, 3),
        "ratio": round(ratio, 3),
        "ours_step_s": round(args.batch_size / ours_img_s, 4),
        "torchvision_step_s": round(args.batch_size / theirs_img_s, 4),
        "ours_peak_mib": round(max(ours_peak)) if cuda else None,
        "torchvision_peak_mib": round(max(theirs_peak)) if cuda else None,
        "torchvision_preloaded_mib": round(preloaded / 2**20),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "gflops_per_image": round(flops / 1e9, 2),
        "ours_mfu": round(3 * flops * ours_img_s / PEAK_FLOPS, 4) if cuda else None,
        "torchvision_mfu": round(3 * flops * theirs_img_s / PEAK_FLOPS, 4) if cuda else None,
        "torchvision_flags": "trainer's" if args.same_flags else "torch defaults",
        "trainer_changed_flags": {k: v for k, v in trainer_flags.items() if defaults[k] != v},
        "ours_rounds_img_s": [round(v, 3) for v in ours],
        "torchvision_rounds_img_s": [round(v, 3) for v in theirs],
    }
    target = 2.0 if cuda else 1.0
    print(
        f"{template.name} {args.input_size} px batch {args.batch_size} on {result['device']}: "
        f"ours {ours_img_s:.2f} img/s, torchvision {theirs_img_s:.2f} img/s, "
        f"ratio {ratio:.2f} (target >= {target})"
    )
    if cuda:
        print(
            f"peak memory: ours {result['ours_peak_mib']} MiB, torchvision "
            f"{result['torchvision_peak_mib']} MiB (with {result['torchvision_preloaded_mib']} "
            f"MiB of preloaded batches); MFU ours {result['ours_mfu']:.1%}, "
            f"torchvision {result['torchvision_mfu']:.1%} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s"
        )
    else:
        print(f"peak RSS of the process (both sides, weak proxy): {result['peak_rss_mib']} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
