"""Tiling on small objects in large images: segm mAP with and without tiling.

Generates shapes of a few percent of the image's side on large images, trains the same
template twice for the same epochs and input size (without tiling; with `--tiling auto`,
which sizes the tiles from the objects), and scores both best checkpoints on the same val
images, whole (the tiled model predicts through its tiles).

    .venv/bin/python benchmarks/tiling.py                 # about 30 minutes on 2 cores

The last line is one JSON object: per run segm and bbox mAP (and mAP50), train images seen
per epoch, the tiling chosen, and seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instseg_trainer.sample_data import write_sample_dataset  # noqa: E402


def instseg(*args: str) -> None:
    print("+ instseg " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "instseg_trainer.cli", *args], check=True)


def run(args, data: Path, work: Path, tiling: str) -> dict:
    output = work / f"run-{tiling}"
    start = time.monotonic()
    instseg("train", args.template, "--train-data-roots", str(data), "--val-data-roots",
            str(data), "--output", str(output), "--epochs", str(args.epochs), "--input-size",
            str(args.input_size), "--backbone-weights", "none", "--workers", "0",
            "--tiling", tiling, "--log-interval", "50")  # fmt: skip
    seconds = round(time.monotonic() - start, 1)
    instseg("eval", "--weights", str(output / "best.pt"), "--data-roots", str(data), "--subset",
            "val", "--output", str(work / f"eval-{tiling}"), "--workers", "0")  # fmt: skip
    metrics = json.loads((work / f"eval-{tiling}" / "metrics.json").read_text())
    events = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    start_event = next(e for e in events if e["event"] == "start")
    state = {f"{task}_{key}": round(metrics[task][key], 4)
             for task in ("segm", "bbox") for key in ("map", "map50")}  # fmt: skip
    return {**state, "train_inputs_per_epoch": start_event["train_images"], "train_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="MaskRCNN-EfficientNetB2B")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=512, help="generated images' side")
    parser.add_argument("--object-scale", type=float, default=0.15)
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--val-images", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tiling-") as work:
        work = Path(work)
        data = work / "data"
        write_sample_dataset(data, num_train=args.train_images, num_val=args.val_images, seed=0,
                             min_size=args.image_size, max_size=args.image_size,
                             object_scale=args.object_scale, max_objects=8)  # fmt: skip
        rows = {mode: run(args, data, work, mode) for mode in ("off", "auto")}
    for mode, row in rows.items():
        print(f"tiling {mode:4s} segm mAP {row['segm_map']:.4f} (50: {row['segm_map50']:.4f})  "
              f"bbox mAP {row['bbox_map']:.4f}  {row['train_inputs_per_epoch']} inputs/epoch  "
              f"train {row['train_s']:.0f} s")  # fmt: skip
    print(json.dumps({"benchmark": "tiling", "template": args.template, "epochs": args.epochs,
                      "input_size": args.input_size, "image_size": args.image_size,
                      "object_scale": args.object_scale, "runs": rows,
                      "segm_map_gain": round(rows["auto"]["segm_map"] - rows["off"]["segm_map"],
                                             4)}))  # fmt: skip


if __name__ == "__main__":
    main()
