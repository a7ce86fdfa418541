"""Running an exported model: ONNX through ONNX Runtime, OpenVINO IR through OpenVINO, with the
documented pre- and post-processing (graph.py), so that eval and predict treat it as they
treat a checkpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from instseg_trainer.data.coco import ImageRecord
from instseg_trainer.data.dataset import InstanceSegDataset, collate
from instseg_trainer.data.tiling import Tiling
from instseg_trainer.errors import CheckpointError, InstsegError
from instseg_trainer.evaluation.tiled import TiledImages, collate_tiled, merge_tiles
from instseg_trainer.export.graph import INPUTS, OUTPUTS
from instseg_trainer.models.mask_rcnn import paste_binary_masks

log = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5
EXPORTED_SUFFIXES = (".onnx", ".xml")
# OpenVINO's CPU plugin computes in bf16 by default where the CPU has it (AVX512-BF16, AMX),
# which costs parity with PyTorch (0.004 segm mAP measured on an fp32 model). Every model
# computes in f32 here: fp32 and INT8 (the layers INT8 keeps float) as PyTorch does, fp16
# with its weights as stored, so that a model's precision is what its accuracy reflects.
# A deployment that trades accuracy for speed sets INFERENCE_PRECISION_HINT bf16 itself.
OPENVINO_PRECISION_HINT = "f32"


def openvino_config(precision: str | None) -> dict[str, str]:
    """compile_model's configuration for a model stored at `precision` (any: f32 compute)."""
    return {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINT}


def metadata_path(model_path: Path) -> Path:
    """The metadata file beside a model: model_fp32.onnx → model_fp32.onnx.json."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


class ExportedModel:
    """An exported model with its metadata: classes, input size, threshold."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta_file = metadata_path(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"exported model '{self.path}' does not exist")
        try:
            self.metadata = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"'{meta_file}' (the metadata `instseg export` writes beside the model) "
                f"cannot be read: {e}; export the model again"
            ) from e
        self.device = torch.device("cpu")
        self.template = self.metadata["template"]
        self.input_size: int = self.metadata["input_size"]
        self.class_names: list[str] = [c["name"] for c in self.metadata["classes"]]
        self.category_ids: list[int] = [c["category_id"] for c in self.metadata["classes"]]
        self.threshold: float | None = self.metadata.get("score_threshold")
        self.batch_size = 1  # the graph takes one image
        tiling = self.metadata.get("tiling")
        self.tiling: Tiling | None = Tiling(**tiling) if tiling else None
        self._run = _session(self.path, self.metadata.get("precision"))

    def loader(self, records: list[ImageRecord], batch_size: int | None, workers: int):
        if self.tiling is not None:
            return DataLoader(TiledImages(records, self.input_size, self.tiling), batch_size=1,
                              num_workers=workers, collate_fn=collate_tiled)  # fmt: skip
        return DataLoader(
            InstanceSegDataset(records, self.input_size), batch_size=1, num_workers=workers,
            collate_fn=collate,
        )  # fmt: skip

    def predict(self, loader: Iterable) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
        """(meta, detections) per image, as evaluation.evaluator.predict gives them."""
        if self.tiling is not None:
            yield from self._predict_tiled(loader)
            return
        for images, _, metas in loader:
            for image, meta in zip(images, metas):
                original = np.asarray(meta["original_size"], dtype=np.int64)
                boxes, labels, scores, masks = self._run(image.numpy(), original)
                found = detections(boxes, labels, scores, masks, meta["original_size"],
                                   len(self.class_names))  # fmt: skip
                yield meta, found

    def _predict_tiled(self, loader: Iterable) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
        """The graph on each crop of a TiledImages loader, merged as PyTorch merges them."""
        for crops_batch, windows_batch, metas in loader:
            for crops, windows, meta in zip(crops_batch, windows_batch, metas):
                found = []
                for crop, window in zip(crops, windows):
                    size = (window[3] - window[1], window[2] - window[0])
                    outputs = self._run(crop.numpy(), np.asarray(size, dtype=np.int64))
                    det = detections(*outputs, size, len(self.class_names))
                    found.append(({k: torch.from_numpy(v) for k, v in det.items()}, window))
                merged = merge_tiles(found, meta["original_size"], self.metadata["nms_thresh"],
                                     self.metadata["detections_per_img"])  # fmt: skip
                yield meta, {k: v.numpy() for k, v in merged.items()}


def detections(boxes, labels, scores, masks, original_size, classes: int) -> dict[str, np.ndarray]:
    """The graph's outputs → detections as PyTorch inference gives them (masks pasted). A
    detection whose class index is not a class is dropped, with a warning: OpenVINO's CPU
    plugin returned one uninitialised detection for images without any from models exported
    before graph.py's NMS lost its branch."""
    labels = np.asarray(labels).astype(np.int64)
    valid = (labels >= 1) & (labels <= classes)
    if not valid.all():
        log.warning("dropped %d detection(s) with an invalid class index from the runtime",
                    int((~valid).sum()))  # fmt: skip
        boxes, labels, scores, masks = boxes[valid], labels[valid], scores[valid], masks[valid]
    pasted = paste_binary_masks(
        torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
        tuple(original_size), MASK_THRESHOLD,
    )  # fmt: skip
    return {
        "boxes": boxes.astype(np.float32),
        "scores": scores.astype(np.float32),
        "labels": labels.astype(np.int64) - 1,  # 0-based class indices
        "masks": pasted.numpy(),
    }


def _session(path: Path, precision: str | None):
    """A function (image, original_size) → (boxes, labels, scores, masks) for the runtime the
    file's suffix names."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda image, size: session.run(None, dict(zip(INPUTS, (image, size))))
    if path.suffix == ".xml":
        import openvino

        compiled = openvino.Core().compile_model(str(path), "CPU", openvino_config(precision))
        request = compiled.create_infer_request()

        def run(image, size):
            results = request.infer(dict(zip(INPUTS, (image, size))))
            return [results[compiled.output(name)] for name in OUTPUTS]

        return run
    raise InstsegError(
        f"'{path}': an exported model is .onnx or .xml (OpenVINO IR); a checkpoint is .pt"
    )


def is_exported(path: Path) -> bool:
    return Path(path).suffix in EXPORTED_SUFFIXES
