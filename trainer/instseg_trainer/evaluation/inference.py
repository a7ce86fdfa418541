"""Evaluation and prediction with a trained checkpoint (the eval and predict commands)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from instseg_trainer.data.coco import CocoSubset, ImageRecord, image_size
from instseg_trainer.data.dataset import InstanceSegDataset, collate, load_rgb
from instseg_trainer.data.roots import load_roots
from instseg_trainer.data.tiling import Tiling
from instseg_trainer.engine.checkpoint import load_checkpoint
from instseg_trainer.engine.distributed import (
    Distributed,
    amp_dtype,
    configure_device,
    resolve_device,
)
from instseg_trainer.errors import CheckpointError, DataError
from instseg_trainer.evaluation.coco_eval import to_coco_results
from instseg_trainer.evaluation.evaluator import coco_results_of, predict, score
from instseg_trainer.evaluation.tiled import TiledImages, collate_tiled, predict_tiled
from instseg_trainer.export.runtime import ExportedModel, is_exported
from instseg_trainer.files import atomic_write
from instseg_trainer.models.mask_rcnn import build_model
from instseg_trainer.reporting.overlay import draw_overlay

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class TrainedModel:
    """A checkpoint's inference weights (the EMA model) with its classes and threshold."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        state = load_checkpoint(path)
        if "ema" not in state:
            raise CheckpointError(f"checkpoint '{path}' holds no model weights")
        self.path = Path(path)
        self.device = resolve_device(device)
        self.template = state["template"]
        self.input_size = state["input_size"]
        self.class_names: list[str] = state["class_names"]
        self.category_ids: list[int] = state["category_ids"]
        self.best: dict = state.get("best", {})
        self.position: dict | None = state.get("position")  # last.pt only: where the run is
        self.batch_size: int = state["hyperparameters"]["batch_size"]
        self.threshold: float | None = self.best.get("f_measure_threshold")
        tiling = state.get("tiling")  # trained on tiles: predicted through tiles
        self.tiling: Tiling | None = Tiling(**tiling) if tiling else None
        self.model = build_model(
            state["model_config"],
            len(self.class_names),
            self.input_size,
            state["backbone_weights"],
            load_backbone_weights=False,
        )
        self.model.load_state_dict(state["ema"])
        configure_device(self.device, tune=False)
        self.model.to(self.device).eval()

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return amp_dtype(self.device)

    def predict(self, loader: Iterable) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
        """(meta, detections) per image of the loader."""
        predictor = predict_tiled if self.tiling else predict
        return predictor(self.model, loader, self.device, self.amp_dtype)

    def loader(
        self, records: list[ImageRecord], batch_size: int | None, workers: int
    ) -> DataLoader:
        if self.tiling is not None:
            return DataLoader(TiledImages(records, self.input_size, self.tiling), batch_size=1,
                              num_workers=workers, collate_fn=collate_tiled)  # fmt: skip
        return DataLoader(
            InstanceSegDataset(records, self.input_size),
            batch_size=batch_size or self.batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )


def load_model(path: Path, device: str = "auto") -> TrainedModel | ExportedModel:
    """A checkpoint (.pt) or an exported model (.onnx, .xml) for eval and predict."""
    if is_exported(path):
        return ExportedModel(path)
    return TrainedModel(path, device)


def load_for_model(
    roots: Sequence[Path], subset: str | None, model: TrainedModel | ExportedModel
) -> CocoSubset:
    """A subset to run `model` on, which must have the model's classes."""
    return check_classes(load_roots(roots, subset), model)


def check_classes(data: CocoSubset, model: TrainedModel | ExportedModel) -> CocoSubset:
    if data.class_names != model.class_names:
        raise DataError(
            f"'{data.annotation_file}' has classes {data.class_names}, but the model "
            f"'{model.path}' was trained on {model.class_names}"
        )
    return data


def write_json(obj, path: Path) -> None:
    """Writes `obj` as JSON, atomically."""
    atomic_write(path, lambda file: file.write(json.dumps(obj).encode("utf-8")))


def evaluate_dataset(
    trained: TrainedModel | ExportedModel,
    roots: Sequence[Path],
    output: Path,
    subset: str | None = None,
    batch_size: int | None = None,
    workers: int = 2,
) -> dict:
    """Scores the model on a subset of one root or several (merged): evaluate_subset."""
    data = load_for_model(roots, subset, trained)
    return evaluate_subset(trained, data, output, batch_size, workers)


def evaluate_subset(
    trained: TrainedModel | ExportedModel,
    data: CocoSubset,
    output: Path,
    batch_size: int | None = None,
    workers: int = 2,
) -> dict:
    """Scores the model on a loaded subset; writes metrics.json, predictions.json (COCO
    results, RLE masks) and ground_truth.json (what was scored). From one COCO root, image ids
    are the dataset's own; otherwise renumbered as ground_truth.json says."""
    single = Distributed(0, 1, 0, trained.device)
    detections = trained.predict(trained.loader(data.records, batch_size, workers))
    results = coco_results_of(detections, data.category_ids, single)
    ground_truth = data.ground_truth()
    metrics = score(ground_truth, results, trained.threshold)
    metrics["dataset"] = {
        "annotation_files": [str(path) for path in data.annotation_files],
        "images": len(data.records),
        "skipped_annotations": dict(data.skipped),
    }
    metrics["checkpoint"] = str(trained.path)
    output.mkdir(parents=True, exist_ok=True)
    write_json(results, output / "predictions.json")
    write_json(ground_truth, output / "ground_truth.json")
    write_json(metrics, output / "metrics.json")
    return metrics


def image_records(source: Path) -> list[ImageRecord]:
    """An image file or a directory of images as records without annotations."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"--input '{source}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    elif source.is_file():
        paths = [source]
    else:
        raise DataError(f"--input '{source}' does not exist")
    records = []
    for i, path in enumerate(paths, start=1):
        size = image_size(path)
        if size is None:
            raise DataError(f"image '{path}' cannot be read; it is not an image PIL can open")
        records.append(ImageRecord(i, path, size[1], size[0], ()))
    return records


def predict_images(
    trained: TrainedModel | ExportedModel,
    source: Path,
    output: Path,
    score_threshold: float | None = None,
    batch_size: int | None = None,
    workers: int = 2,
) -> dict:
    """Overlay PNGs of detections above the threshold, and all detections as COCO results
    (predictions.json, with images.json naming the image ids)."""
    records = image_records(source)
    threshold = score_threshold if score_threshold is not None else (trained.threshold or 0.5)
    output.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(trained.category_ids)
    results: list[dict] = []
    drawn = 0
    loader = trained.loader(records, batch_size, workers)
    for meta, det in trained.predict(loader):
        record = records[meta["index"]]
        results.extend(
            to_coco_results(
                record.image_id, det["boxes"], det["scores"], ids[det["labels"]], det.get("masks")
            )
        )
        keep = det["scores"] > threshold  # strictly above, as the F-measure counts
        overlay = draw_overlay(
            np.asarray(load_rgb(record)),
            det["boxes"][keep],
            [trained.class_names[i] for i in det["labels"][keep]],
            det["scores"][keep],
            det["masks"][keep] if "masks" in det else None,
        )
        overlay.save(output / f"{record.path.stem}.png")
        drawn += int(keep.sum())
    images = [
        {"id": r.image_id, "file_name": str(r.path), "width": r.width, "height": r.height}
        for r in records
    ]
    write_json(images, output / "images.json")
    write_json(results, output / "predictions.json")
    return {"images": len(records), "drawn": drawn, "threshold": threshold, "output": str(output)}
