"""Inference speed of one model in every form instseg gives it: the PyTorch checkpoint, ONNX
through ONNX Runtime, and OpenVINO IR at FP32, FP16 and INT8 (NNCF, `instseg optimize`), on
the same images, one at a time (the exported graph's batch), on the CPU.

Each form runs the whole path of `instseg predict` minus image decoding: the graph, then the
post-processing step (box scaling is in the graph; masks pasted and thresholded outside).
Latency is the median over `--runs` passes of every image after one warm-up pass.

    .venv/bin/python benchmarks/inference_throughput.py                      # about 3 minutes
    .venv/bin/python benchmarks/inference_throughput.py --weights runs/r50/best.pt \\
        --data-roots data/ --images 20

Without --weights it trains the template for --epochs on generated data first (speed does
not depend on how well a model learned, but an untrained one keeps up to 100 detections per
image: the heaviest post-processing). The last line is one JSON object: per form its median
latency (ms), images/s, speed-up over PyTorch and size (MiB), plus the setup.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instseg_trainer.cli import main as instseg  # noqa: E402
from instseg_trainer.data.roots import load_roots  # noqa: E402
from instseg_trainer.evaluation.inference import load_model  # noqa: E402
from instseg_trainer.sample_data import write_sample_dataset  # noqa: E402

FORMS = (  # name, instseg export/optimize arguments, model file
    ("onnx-fp32", ("export", "--format", "onnx"), "model_fp32.onnx"),
    ("openvino-fp32", ("export", "--format", "openvino"), "model_fp32.xml"),
    ("openvino-fp16", ("export", "--format", "openvino", "--precision", "fp16"),
     "model_fp16.xml"),
    ("openvino-int8", ("optimize",), "model_int8.xml"),
)  # fmt: skip


def run_instseg(*args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = instseg(list(args))
    if code != 0:
        raise RuntimeError(f"instseg {' '.join(args)} failed: {out.getvalue()}")


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(data root, checkpoint): the user's, or generated data and a short training."""
    data = args.data_roots
    if data is None:
        data = work / "data"
        write_sample_dataset(data, num_train=args.train_images, num_val=args.images, seed=0,
                             min_size=args.input_size // 2, max_size=args.input_size)  # fmt: skip
    weights = args.weights
    if weights is None:
        run_instseg("train", args.template, "--train-data-roots", str(data), "--val-data-roots",
                    str(data), "--output", str(work / "run"), "--epochs", str(args.epochs),
                    "--input-size", str(args.input_size), "--backbone-weights", "none",
                    "--workers", "0")  # fmt: skip
        weights = work / "run" / "best.pt"
    return data, weights


def export_all(weights: Path, data: Path, exported: Path) -> dict[str, Path]:
    """Every form that could be made (INT8 is refused when it loses more than 1 AP point)."""
    for name, arguments, _ in FORMS:
        try:
            if arguments[0] == "optimize":
                run_instseg("optimize", "--weights", str(exported / "model_fp32.xml"),
                            "--data-roots", str(data), "--output", str(exported))  # fmt: skip
            else:
                run_instseg(*arguments, "--weights", str(weights), "--output", str(exported))
        except RuntimeError as error:
            print(f"{name}: not made ({error})")
    forms = {name: exported / file for name, _, file in FORMS if (exported / file).is_file()}
    return {"pytorch": weights} | forms


def median_latency(model_path: Path, data: Path, images: int, runs: int) -> float:
    """Seconds per image: graph and post-processing, images decoded beforehand."""
    model = load_model(model_path, "cpu")
    records = load_roots([data], "val").records[:images]
    batches = list(model.loader(records, 1, 0))
    for _ in model.predict(batches):  # warm-up pass
        pass
    times = []
    for _ in range(runs):
        for batch in batches:
            start = time.perf_counter()
            for _ in model.predict([batch]):
                pass
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def size_mib(path: Path) -> float:
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def add_model_args(
    parser: argparse.ArgumentParser, input_size: int, epochs: int, images: int, train: int
) -> None:
    """The model and data of a run: a checkpoint and a COCO root, or a template trained here
    on generated shapes."""
    parser.add_argument("--template", default="MaskRCNN-EfficientNetB2B")
    parser.add_argument("--input-size", type=int, default=input_size)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--weights", type=Path, help="a checkpoint (default: train one)")
    parser.add_argument("--data-roots", type=Path, help="COCO root with val (default: generated)")
    parser.add_argument("--images", type=int, default=images, help="val images")
    parser.add_argument("--train-images", type=int, default=train, help="generated train images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, input_size=256, epochs=2, images=8, train=24)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="inference-") as work:
        data, weights = prepare(args, Path(work))
        models = export_all(weights, data, Path(work) / "exported")
        latency = {name: median_latency(path, data, args.images, args.runs)
                   for name, path in models.items()}  # fmt: skip
        sizes = {name: size_mib(path) for name, path in models.items()}
        input_size = load_model(weights, "cpu").input_size  # the checkpoint's, if given
    figures = {
        name: {"latency_ms": round(seconds * 1000, 1), "img_s": round(1 / seconds, 2),
               "speedup_vs_pytorch": round(latency["pytorch"] / seconds, 2),
               "size_mib": round(sizes[name], 1)}
        for name, seconds in latency.items()
    }  # fmt: skip
    for name, row in figures.items():
        print(f"{name:14s} {row['latency_ms']:8.1f} ms  {row['img_s']:6.2f} img/s  "
              f"x{row['speedup_vs_pytorch']:.2f}  {row['size_mib']:6.1f} MiB")  # fmt: skip
    print(json.dumps({
        "benchmark": "inference_throughput", "template": args.template,
        "input_size": input_size, "device": "cpu", "threads": torch.get_num_threads(),
        "images": args.images, "runs": args.runs, "trained_here": args.weights is None,
        "forms": figures,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
