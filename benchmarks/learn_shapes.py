"""Can the recipe learn from scratch? Train EfficientNet-B2B on the sample shapes on CPU.

Generates the sample dataset, trains MaskRCNN-EfficientNetB2B from random init with the
template's recipe (only epochs, input size and the warmup length are set here), evaluates
the best checkpoint on val with `instseg eval`, and prints the figures. Target: segm mAP50
>= 0.5 within 20 minutes on a 2-core machine.

    python benchmarks/learn_shapes.py --output /tmp/learn_shapes

The last line is one JSON object: template, epochs, wall_s, segm_map, segm_map50, bbox_map,
predictions and ground_truth (files, so anyone can re-score with pycocotools).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TEMPLATE = "MaskRCNN-EfficientNetB2B"


def run(args: list[str]) -> None:
    print("+ instseg " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "instseg_trainer.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("learn_shapes"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=192)
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data, run_dir, eval_dir = args.output / "data", args.output / "run", args.output / "eval"
    start = time.monotonic()
    run([
        "sample-data", str(data),
        "--train-images", str(args.train_images), "--val-images", str(args.val_images),
    ])  # fmt: skip
    run([
        "train", TEMPLATE, "--train-data-roots", str(data), "--val-data-roots", str(data),
        "--output", str(run_dir), "--epochs", str(args.epochs),
        "--input-size", str(args.input_size), "--backbone-weights", "none",
        "--device", args.device, "--workers", str(args.workers), "--log-interval", "20",
    ])  # fmt: skip
    train_s = time.monotonic() - start
    run([
        "eval", "--weights", str(run_dir / "best.pt"), "--data-roots", str(data),
        "--subset", "val", "--output", str(eval_dir), "--device", args.device,
    ])  # fmt: skip
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    result = {
        "template": TEMPLATE,
        "epochs": args.epochs,
        "input_size": args.input_size,
        "train_images": args.train_images,
        "wall_s": round(time.monotonic() - start, 1),
        "train_wall_s": round(train_s, 1),
        "segm_map": round(metrics["segm"]["map"], 4),
        "segm_map50": round(metrics["segm"]["map50"], 4),
        "bbox_map": round(metrics["bbox"]["map"], 4),
        "bbox_map50": round(metrics["bbox"]["map50"], 4),
        "predictions": str(eval_dir / "predictions.json"),
        "ground_truth": str(eval_dir / "ground_truth.json"),
    }
    print(
        f"segm mAP50 {result['segm_map50']:.3f} (target >= 0.5), wall {result['wall_s']:.0f} s "
        f"(target <= 1200 s)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
