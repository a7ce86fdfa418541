"""`instseg export`: a checkpoint → ONNX or OpenVINO IR, with a metadata file that makes the
artefact self-describing (classes with the dataset's category ids, input size,
normalisation, the F-measure threshold, template, instseg version, what the graph holds).

Nothing half-written is left: the files are made in a temporary directory inside the output
directory and renamed into place once all of them exist.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from instseg_trainer import __version__
from instseg_trainer.engine.run import check_output_dir
from instseg_trainer.errors import InstsegError
from instseg_trainer.evaluation.inference import TrainedModel
from instseg_trainer.export.graph import INPUTS, OPSET, OUTPUTS, export_onnx
from instseg_trainer.export.runtime import metadata_path
from instseg_trainer.models.mask_rcnn import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}


@dataclass(frozen=True)
class Exported:
    model: Path
    metadata: Path
    format: str
    precision: str
    size_bytes: int  # the model's files together (IR: .xml + .bin)


def model_name(fmt: str, precision: str) -> str:
    return f"model_{precision}{SUFFIX[fmt]}"


def export_model(weights: Path, fmt: str, precision: str, output: Path) -> Exported:
    """Exports `weights` (best.pt, or last.pt) as `fmt` at `precision` into `output`."""
    if fmt not in FORMATS or precision not in PRECISIONS:
        raise InstsegError(
            f"cannot export as {fmt} {precision}: formats are {', '.join(FORMATS)}, "
            f"precisions {', '.join(PRECISIONS)}"
        )
    if fmt == "onnx" and precision != "fp32":
        raise InstsegError("ONNX export is fp32; for fp16 use --format openvino --precision fp16")
    trained = TrainedModel(weights, device="cpu")
    _warn_if_unfinished(trained)
    output = check_output_dir(output)
    name = model_name(fmt, precision)
    model = publish(
        output / name, lambda staged: _write_model(trained, fmt, precision, staged),
        _metadata(trained, fmt, precision),
    )  # fmt: skip
    return Exported(model, metadata_path(model), fmt, precision, model_size(model))


def publish(model: Path, write: Callable[[Path], None], metadata: dict) -> Path:
    """Writes a model (`write` gets the path to write it to) and its metadata in a temporary
    directory beside `model`, then renames them into place, the metadata last: a model is
    listed once it is whole, and a failure leaves nothing."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=model.parent) as staging:
        staged = Path(staging) / model.name
        write(staged)
        metadata_path(staged).write_text(json.dumps(metadata, indent=2) + "\n")
        for file in sorted(Path(staging).iterdir(), key=lambda p: p.suffix == ".json"):
            os.replace(file, model.parent / file.name)
    return model


def model_size(model: Path) -> int:
    """Bytes of a model's files (OpenVINO IR: .xml and .bin)."""
    return sum(p.stat().st_size for p in (model, model.with_suffix(".bin")) if p.is_file())


def _write_model(trained: TrainedModel, fmt: str, precision: str, path: Path) -> None:
    onnx_path = path.with_suffix(".onnx")
    export_onnx(trained.model, trained.input_size, onnx_path)
    if fmt == "openvino":
        import openvino

        converted = openvino.convert_model(str(onnx_path))
        openvino.save_model(converted, str(path), compress_to_fp16=precision == "fp16")
        onnx_path.unlink()


def _warn_if_unfinished(trained: TrainedModel) -> None:
    position = trained.position
    if position and not position.get("finished"):
        log.warning(
            "'%s' is the checkpoint of an unfinished run (epoch %d): exporting it as it is; "
            "best.pt holds the best validated weights",
            trained.path, position.get("epoch", 0),
        )  # fmt: skip


def _metadata(trained: TrainedModel, fmt: str, precision: str) -> dict:
    classes = [
        {"label": index, "name": name, "category_id": category_id}
        for index, (name, category_id) in enumerate(
            zip(trained.class_names, trained.category_ids), start=1
        )
    ]
    return {
        "instseg_version": __version__,
        "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source_checkpoint": str(trained.path),
        "template": trained.template,
        "format": fmt,
        "precision": precision,
        "onnx_opset": OPSET,
        "input_size": trained.input_size,
        "classes": classes,
        "score_threshold": trained.threshold,  # the F-measure-best threshold on validation
        "best": trained.best,
        # trained on tiles: the graph runs on each tile and on the whole image, and the
        # detections merge by class-wise NMS at these settings (evaluation.tiled)
        "tiling": trained.tiling.to_dict() if trained.tiling else None,
        "nms_thresh": float(trained.model.roi_heads.nms_thresh),
        "detections_per_img": int(trained.model.roi_heads.detections_per_img),
        "inputs": {
            INPUTS[0]: "uint8 (3, H, W) RGB, resized so that its longer side is input_size "
            "(aspect kept, PIL bilinear)",
            INPUTS[1]: "int64 (2,): the original image's (height, width)",
        },
        "outputs": dict(
            zip(
                OUTPUTS,
                (
                    "float32 (N, 4) xyxy boxes in original pixels",
                    "int64 (N,) class labels from 1 (classes[].label)",
                    "float32 (N,) scores",
                    "float32 (N, 1, 28, 28) mask probabilities inside each box",
                ),
            )
        ),  # fmt: skip
        "in_graph": [
            "scaling to [0, 1]",
            "normalisation",
            "padding to a multiple of 32",
            "backbone + FPN",
            "RPN with box decoding and NMS",
            "RoI heads with box decoding and class-wise NMS",
            "mask head",
            "boxes scaled to the original size",
        ],  # fmt: skip
        "normalisation": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": "1/255"},
        "postprocessing": "paste each 28x28 mask into its box at the original size and keep "
        "pixels > 0.5 (instseg_trainer.models.mask_rcnn.paste_binary_masks)",
    }
