"""Instance-segmentation datasets in Datumaro's other formats (VOC instance masks, Cityscapes,
LabelMe, CVAT for images, Datumaro's own, ...): the format found with Datumaro's detection,
the dataset imported with Datumaro and converted in memory into the records and COCO ground
truth that a COCO root gives (coco.py), so training and evaluation never see the difference.

An instance is a polygon or a mask with a label; annotations sharing a non-zero group are
parts of one instance (Datumaro's convention), merged into one mask.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from datumaro.components.annotation import AnnotationType, Mask, Polygon
from datumaro.components.dataset import Dataset
from datumaro.components.environment import Environment
from pycocotools import mask as mask_utils

from instseg_trainer.data.coco import CocoSubset, ImageRecord, Instance, image_size
from instseg_trainer.errors import DataError

log = logging.getLogger(__name__)

BACKGROUND = "background"

# Datumaro's formats that can carry instance masks or polygons, in the order a root that
# several of them detect is read (the most specific first). COCO roots are read by coco.py.
INSTANCE_FORMATS = (
    "voc_instance_segmentation", "cityscapes", "mapillary_vistas_instances", "label_me",
    "cvat", "datumaro", "datumaro_binary", "ade20k2020", "ade20k2017", "open_images",
    "segment_anything", "kitti_segmentation", "voc",
)  # fmt: skip


def detect_format(root: Path) -> str:
    """The instance-segmentation format Datumaro detects at `root`; an error naming the root
    and the formats tried when it detects none."""
    detected = set(Environment().detect_dataset(str(root)))
    for name in INSTANCE_FORMATS:
        if name in detected:
            return name
    found = f" (Datumaro detected only {', '.join(sorted(detected))})" if detected else ""
    raise DataError(
        f"dataset root '{root}' is in no instance-segmentation format instseg reads{found}; "
        f"tried COCO (annotations/instances_*.json with its images, or one COCO .json beside "
        f"its images) and, with Datumaro's detection, {', '.join(INSTANCE_FORMATS)}"
    )


def load_datumaro_subset(root: Path, subset: str | None) -> CocoSubset:
    """One subset of a non-COCO root, converted; `subset` None takes test, then val, or the
    only one."""
    fmt = detect_format(root)
    try:
        dataset = Dataset.import_from(str(root), fmt)
    except Exception as e:  # Datumaro raises many types; the message is what the user needs
        raise DataError(f"dataset root '{root}' ({fmt}): Datumaro could not import it: {e}") from e
    name = _pick_subset(root, fmt, sorted(dataset.subsets()), subset)
    labels = [label.name for label in dataset.categories()[AnnotationType.label]]
    converted = _Converter(root, fmt, labels)
    items = dataset.get_subset(name)
    for item in items:
        converted.add(item)
    data = converted.subset(name)
    log.info("%s: read as %s (Datumaro), subset '%s': %d images, %d instances", root, fmt,
             name, len(data.records), len(data.raw["annotations"]))  # fmt: skip
    return data


def _pick_subset(root: Path, fmt: str, names: list[str], wanted: str | None) -> str:
    if len(names) == 1:
        return names[0]
    for candidate in [wanted] if wanted else ["test", "val"]:
        matches = [n for n in names if n == candidate] or [
            n for n in names if n.startswith(candidate)
        ]
        if len(matches) == 1:
            return matches[0]
    raise DataError(
        f"dataset root '{root}' ({fmt}) has subsets {', '.join(names)} and none named "
        f"'{wanted or 'test/val'}'; give a root per subset (eval, predict: --subset NAME)"
    )


class _Converter:
    """Datumaro items → ImageRecords and the COCO dict evaluation scores against. A label
    named "background" (VOC's and Cityscapes' label maps have one) is no class: Mask R-CNN
    has its own."""

    def __init__(self, root: Path, fmt: str, labels: list[str]) -> None:
        self.root, self.fmt = root, fmt
        kept = [i for i, name in enumerate(labels) if name.lower() != BACKGROUND]
        self.labels = [labels[i] for i in kept]
        self.class_of = {label: index for index, label in enumerate(kept)}  # Datumaro's → ours
        self.records: list[ImageRecord] = []
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.skipped: Counter = Counter()
        self.missing: list[str] = []

    def add(self, item) -> None:
        path = Path(item.media.path) if getattr(item.media, "path", None) else None
        size = image_size(path) if path else None
        if size is None:
            self.missing.append(str(path or item.id))
            return
        image_id = len(self.images) + 1
        height, width = size
        self.images.append({"id": image_id, "file_name": str(path), "height": height,
                            "width": width})  # fmt: skip
        instances = [self._instance(group, image_id, size) for group in _groups(item)
                     if group[0].label in self.class_of]  # fmt: skip
        kept = tuple(instance for instance in instances if instance is not None)
        self.records.append(ImageRecord(image_id, path, width, height, kept))

    def _instance(self, parts: list, image_id: int, size: tuple[int, int]) -> Instance | None:
        label = self.class_of[parts[0].label]
        rle = _rle(parts, size)
        area = float(mask_utils.area(rle))
        if area < 1:
            self.skipped["instance with an empty mask"] += 1
            return None
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        crowd = any(p.attributes.get("is_crowd") or p.attributes.get("iscrowd") for p in parts)
        counts = rle["counts"].decode("ascii")
        self.annotations.append({
            "id": len(self.annotations) + 1, "image_id": image_id, "category_id": label + 1,
            "segmentation": {"size": list(rle["size"]), "counts": counts}, "area": area,
            "bbox": [x, y, w, h], "iscrowd": int(bool(crowd)),
        })  # fmt: skip
        return Instance(label=label, box=(x, y, x + w, y + h),
                        rle={"size": [int(s) for s in rle["size"]], "counts": counts},
                        crowd=bool(crowd), annotation_id=len(self.annotations))  # fmt: skip

    def subset(self, name: str) -> CocoSubset:
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
            raise DataError(
                f"dataset root '{self.root}' ({self.fmt}) names {len(self.missing)} image(s) "
                f"that are missing or not readable images: {shown}"
            )
        if not self.annotations:
            raise DataError(
                f"dataset root '{self.root}' ({self.fmt}) has no instance masks or polygons "
                f"with a label: it cannot train instance segmentation"
            )
        if self.skipped:
            log.warning("%s: skipped %s", self.root,
                        ", ".join(f"{n} {why}" for why, n in self.skipped.items()))  # fmt: skip
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.labels)]
        raw = {"images": self.images, "annotations": self.annotations, "categories": categories}
        return CocoSubset(name, (Path(self.root),), self.records, list(self.labels),
                          [c["id"] for c in categories], raw, self.skipped)  # fmt: skip


def _groups(item) -> list[list]:
    """The item's labelled polygons and masks, one list per instance: annotations of one
    non-zero group together, every other annotation alone."""
    by_group: dict[int, list] = {}
    alone: list[list] = []
    for ann in item.annotations:
        if not isinstance(ann, (Polygon, Mask)) or ann.label is None:
            continue
        if ann.group:
            by_group.setdefault(ann.group, []).append(ann)
        else:
            alone.append([ann])
    return list(by_group.values()) + alone


def _rle(parts: list, size: tuple[int, int]) -> dict:
    """The union of an instance's polygons and masks as one COCO RLE."""
    height, width = size
    union = np.zeros((height, width), dtype=np.uint8)
    for part in parts:
        if isinstance(part, Polygon):
            points = [float(v) for v in part.points]
            if len(points) < 6:  # under 3 points: no area
                continue
            union |= mask_utils.decode(mask_utils.frPyObjects([points], height, width))[..., 0]
        else:
            image = np.asarray(part.image, dtype=bool)
            union[: image.shape[0], : image.shape[1]] |= image[:height, :width]
    return mask_utils.encode(np.asfortranarray(union))


def export_coco_as(source: Path, target: Path, fmt: str) -> None:
    """Writes the COCO root `source` (both subsets) into `target` in Datumaro's format `fmt`,
    each non-crowd instance as a mask (what every instance format stores): the sample data in
    the formats users bring (`instseg sample-data --format`)."""
    from datumaro.components.dataset_base import DatasetItem
    from datumaro.components.media import Image as DatumaroImage

    from instseg_trainer.data.coco import load_coco_subset

    items = []
    class_names: list[str] = []
    for subset in ("train", "val"):
        data = load_coco_subset(source, subset)
        class_names = data.class_names
        for record in data.records:
            masks = [
                Mask(image=_instance_mask(inst, record), label=inst.label, id=number, group=number)
                for number, inst in enumerate(record.instances, start=1) if not inst.crowd
            ]  # fmt: skip
            media = DatumaroImage.from_file(path=str(record.path))
            items.append(DatasetItem(id=record.path.stem, subset=subset, media=media,
                                     annotations=masks))  # fmt: skip
    dataset = Dataset.from_iterable(items, categories=class_names)
    dataset.export(str(target), fmt, save_media=True)


def _instance_mask(instance: Instance, record: ImageRecord) -> np.ndarray:
    size = (record.height, record.width)
    if instance.rle is not None:
        rle = instance.rle
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, *size)
        return mask_utils.decode(rle).astype(bool)
    flat = [[float(v) for v in polygon.reshape(-1)] for polygon in instance.polygons]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, *size))).astype(bool)
