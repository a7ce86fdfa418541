"""Accuracy parity of exported models: segm and bbox mAP of the PyTorch checkpoint and of its
ONNX, OpenVINO FP32 / FP16 and INT8 forms, on the same val images, one image at a time.

Without --weights it first trains the template on generated shapes (the recipe, from random
init) so that there is accuracy to lose. Targets (issue 12): |Δ segm mAP| ≤ 0.005 for FP32,
≤ 0.01 for FP16, ≤ 0.02 for INT8.

    .venv/bin/python benchmarks/export_parity.py                        # about 15 minutes
    .venv/bin/python benchmarks/export_parity.py --weights runs/r50/best.pt --data-roots data/

The last line is one JSON object: per form segm and bbox mAP and the differences.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from inference_throughput import add_model_args, export_all, prepare

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instseg_trainer.evaluation.inference import evaluate_dataset, load_model  # noqa: E402

TARGETS = {"fp32": 0.005, "fp16": 0.01, "int8": 0.02}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, input_size=128, epochs=8, images=24, train=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parity-") as work:
        data, weights = prepare(args, Path(work))
        models = export_all(weights, data, Path(work) / "exported")
        scores = {}
        for name, path in models.items():
            metrics = evaluate_dataset(load_model(path, "cpu"), [data], Path(work) / name,
                                       "val", batch_size=1, workers=0)  # fmt: skip
            scores[name] = {task: round(metrics[task]["map"], 4) for task in ("segm", "bbox")}
    reference = scores["pytorch"]
    rows = {}
    for name, score in scores.items():
        delta = round(score["segm"] - reference["segm"], 4)
        target = TARGETS[name.rsplit("-", 1)[-1]] if name != "pytorch" else 0.0
        rows[name] = {**{f"{t}_map": v for t, v in score.items()}, "segm_delta": delta,
                      "within_target": abs(delta) <= target}  # fmt: skip
        print(f"{name:14s} segm mAP {score['segm']:.4f}  bbox mAP {score['bbox']:.4f}  "
              f"Δsegm {delta:+.4f}")  # fmt: skip
    print(json.dumps({"benchmark": "export_parity", "template": args.template,
                      "input_size": args.input_size, "trained_here": args.weights is None,
                      "forms": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
