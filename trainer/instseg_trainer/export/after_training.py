"""The export a training asks for (`instseg train --export ...`, spec.export): best.pt into
<output>/exported/ in each format, INT8 too if asked, each model scored on the val set."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from instseg_contract import EXPORT_DIRECTORY

from instseg_trainer.data.coco import CocoSubset
from instseg_trainer.data.roots import load_roots, load_train_val
from instseg_trainer.evaluation.inference import evaluate_subset, load_model
from instseg_trainer.export.exporter import export_model
from instseg_trainer.export.optimize import optimize_model

log = logging.getLogger(__name__)


def export_after_training(
    best: Path,
    formats: Sequence[str],
    precision: str,
    optimize: bool,
    train_roots: Sequence[Path],
    val_roots: Sequence[Path],
) -> list[dict]:
    """status.artifacts entries of the models exported from `best` (a best.pt)."""
    directory = best.parent / EXPORT_DIRECTORY
    models = []
    for fmt in formats:
        # ONNX is fp32; the requested precision is the OpenVINO model's
        exported = export_model(best, fmt, precision if fmt == "openvino" else "fp32", directory)
        models.append((fmt, exported.precision, exported.model, exported.size_bytes))
    if optimize:
        fp32 = directory / "model_fp32.xml"
        if not fp32.is_file():  # the float model calibration starts from
            export_model(best, "openvino", "fp32", directory)
        int8 = optimize_model(fp32, train_roots, val_roots, directory)
        models.append(("openvino", "int8", int8.model, int8.size_bytes))
    # what the training validated on; the train set is read only to split it
    val = load_roots(val_roots, "val") if val_roots else load_train_val(train_roots, [])[1]
    return [_artifact(fmt, precision, path, size, val) for fmt, precision, path, size
            in models]  # fmt: skip


def _artifact(fmt: str, precision: str, path: Path, size: int, val: CocoSubset) -> dict:
    scores = path.parent / f"eval-{path.name}"
    metrics = evaluate_subset(load_model(path, "cpu"), val, scores, 1, 0)
    log.info("exported %s %s: %s, val segm mAP %.4f", fmt, precision, path,
             metrics["segm"]["map"])  # fmt: skip
    return {
        "name": f"{fmt}-{precision}", "path": str(path), "format": fmt, "precision": precision,
        "sizeBytes": size, "valSegmMap": round(float(metrics["segm"]["map"]), 4),
    }  # fmt: skip
