"""`instseg optimize`: post-training INT8 quantization of an exported model with NNCF, on a
calibration subset of the train set, with accuracy control: segm mAP on the validation set
may be at most `max_drop` below the float model's.

What stays float at every stage: the element-wise and comparison ops (FLOAT_OPS), the mask
head (MASK_HEAD: it runs on the detections, which calibration images without any leave
empty, so its activation ranges cannot be measured), and the transposed convolution of the
mask predictor. Control is by stages (RESTORE_STAGES): first the backbone, FPN, RPN head and
box head are quantized; when the drop is too large, the RPN and RoI heads go back to float;
when it is still too large, nothing is written and the error says what INT8 cost. (NNCF's
own quantize_with_accuracy_control was tried first: its per-layer ranking could not undo the
mask head's broken ranges.)"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instseg_trainer.data.coco import CocoSubset
from instseg_trainer.data.dataset import InstanceSegDataset
from instseg_trainer.data.roots import load_train_val
from instseg_trainer.engine.distributed import Distributed
from instseg_trainer.engine.run import check_output_dir
from instseg_trainer.errors import InstsegError
from instseg_trainer.evaluation.evaluator import coco_results_of, score
from instseg_trainer.evaluation.inference import check_classes
from instseg_trainer.export.exporter import model_size, publish
from instseg_trainer.export.graph import INPUTS, OUTPUTS
from instseg_trainer.export.runtime import ExportedModel, detections, openvino_config

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 300
# kept float: element-wise and comparison ops, which in the detection heads compute box
# coordinates, class indices and NMS inputs, and the mask predictor's transposed convolution
FLOAT_OPS = (
    "Add", "Subtract", "Multiply", "Divide", "Power", "Maximum", "Minimum", "Less", "Greater",
    "LessEqual", "GreaterEqual", "Equal", "NotEqual", "ReduceMean", "ReduceMax", "Interpolate",
    "Sqrt", "Exp", "Log", "Floor", "Ceiling", "Clamp", "Sigmoid", "Softmax", "TopK",
    "NonMaxSuppression", "ROIAlign", "Concat", "Gather", "GatherND", "ScatterUpdate",
    "ScatterNDUpdate", "Select", "ConvolutionBackpropData",
)  # fmt: skip
# node names (regular expressions) of the layers kept float at each stage; the names are the
# module paths that graph.export_onnx gives the ONNX nodes
MASK_HEAD = ("/roi_heads/mask_head/.*", "/roi_heads/mask_predictor/.*")
HEADS = ("/rpn/.*", "/roi_heads/.*")
RESTORE_STAGES = (MASK_HEAD, HEADS)
MAX_DROP = 0.01  # segm mAP, absolute: one AP point


@dataclass(frozen=True)
class Optimized:
    model: Path
    calibration_images: int
    float_map: float
    int8_map: float
    size_bytes: int

    @property
    def drop(self) -> float:
        return self.float_map - self.int8_map


def optimize_model(
    weights: Path,
    train_roots: Sequence[Path],
    val_roots: Sequence[Path],
    output: Path,
    subset_size: int = CALIBRATION_IMAGES,
    max_drop: float = MAX_DROP,
) -> Optimized:
    import nncf
    import openvino

    source = ExportedModel(weights)  # reads the metadata, checks the file
    if source.path.suffix != ".xml" or source.metadata.get("precision") != "fp32":
        raise InstsegError(
            f"'{weights}': optimize takes an fp32 OpenVINO IR; make one with `instseg export "
            f"--format openvino --precision fp32`"
        )
    output = check_output_dir(output)
    train, val = (check_classes(data, source) for data in load_train_val(train_roots, val_roots))
    calibration = nncf.Dataset(_items(train, source.input_size), _inputs)
    validation = nncf.Dataset(_items(val, source.input_size), _inputs)
    ground_truth = val.ground_truth()

    def segm_map(compiled, items: Iterable[dict]) -> float:
        return _segm_map(compiled, items, val.category_ids, ground_truth)

    core = openvino.Core()
    model = core.read_model(str(source.path))
    in_f32 = openvino_config("fp32")  # the float model and the INT8 model's float layers
    float_map = segm_map(core.compile_model(model, "CPU", in_f32), validation.get_data())
    calibrated = min(subset_size, len(train.records))
    for stage, float_layers in enumerate(RESTORE_STAGES, start=1):
        kept_float = nncf.IgnoredScope(
            patterns=list(float_layers), types=list(FLOAT_OPS), validate=False
        )
        quantized = nncf.quantize(
            model, calibration, subset_size=calibrated, ignored_scope=kept_float
        )
        int8_map = segm_map(core.compile_model(quantized, "CPU", in_f32), validation.get_data())
        log.info("INT8 stage %d: val segm mAP %.4f (fp32 %.4f)", stage, int8_map, float_map)
        if float_map - int8_map <= max_drop:
            break
    else:
        raise InstsegError(
            f"INT8 loses {float_map - int8_map:.4f} segm mAP on val (fp32 {float_map:.4f}), "
            f"more than --max-drop {max_drop}; nothing written: raise --max-drop, or deploy "
            f"the fp16 or fp32 model"
        )
    quantization = {"calibration_images": calibrated, "max_drop": max_drop, "stage": stage,
                    "val_segm_map_fp32": float_map, "val_segm_map_int8": int8_map}  # fmt: skip
    path = publish(
        output / "model_int8.xml",
        lambda staged: openvino.save_model(quantized, str(staged), compress_to_fp16=False),
        {**source.metadata, "precision": "int8", "quantization": quantization},
    )  # fmt: skip
    return Optimized(path, calibrated, float_map, int8_map, model_size(path))


def _items(data: CocoSubset, input_size: int) -> list[dict]:
    """Each image as the graph takes it, with its meta (decoded once, kept in memory)."""
    dataset = InstanceSegDataset(data.records, input_size)
    items = []
    for index in range(len(dataset)):
        image, _, meta = dataset[index]
        size = np.asarray(meta["original_size"], dtype=np.int64)
        items.append({INPUTS[0]: image.numpy(), INPUTS[1]: size, "meta": meta})
    return items


def _inputs(item: dict) -> dict:
    return {name: item[name] for name in INPUTS}


def _segm_map(compiled, items: Iterable[dict], category_ids: list[int], ground_truth) -> float:
    def predictions():
        for item in items:
            results = compiled(_inputs(item))
            outputs = [results[compiled.output(name)] for name in OUTPUTS]
            yield item["meta"], detections(*outputs, item["meta"]["original_size"],
                                           len(category_ids))  # fmt: skip

    single = Distributed(0, 1, 0, torch.device("cpu"))
    results = coco_results_of(predictions(), category_ids, single)
    return float(score(ground_truth, results)["segm"]["map"])
