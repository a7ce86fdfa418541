"""COCO instance annotations → image records, imported with Datumaro.

The JSON is read once up front so that a corrupt file is reported with its line and column,
and so that the dataset's own image and category ids are kept for the COCO results.
Datumaro does the format parsing (polygons, compressed and uncompressed RLE, crowd flags).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from datumaro.components.annotation import AnnotationType, Bbox, Polygon, RleMask
from datumaro.components.contexts.importer import ImportErrorPolicy
from datumaro.components.dataset import Dataset
from PIL import Image, UnidentifiedImageError

from instseg_trainer.errors import DataError

log = logging.getLogger(__name__)

ANNOTATION_GLOB = "instances_*.json"


@dataclass(frozen=True)
class Instance:
    """One object: a label index, its box (xyxy) and its mask as polygons or as an RLE."""

    label: int
    box: tuple[float, float, float, float]
    polygons: tuple[np.ndarray, ...] = ()
    rle: dict | None = None
    crowd: bool = False
    annotation_id: int = 0


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    width: int
    height: int
    instances: tuple[Instance, ...]


@dataclass
class CocoSubset:
    """A loaded subset: records, class names and the dataset's category ids per label index.

    Loaded from several roots, it is their union: `annotation_files` names each root's file.
    """

    name: str
    annotation_files: tuple[Path, ...]
    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    raw: dict = field(default_factory=dict, repr=False)  # the parsed JSON (merged: rebuilt)
    skipped: Counter = field(default_factory=Counter)

    @property
    def annotation_file(self) -> Path:
        """The annotation file; of a subset merged from several roots, the first one's."""
        return self.annotation_files[0]

    def ground_truth(self) -> dict:
        """The kept images and annotations, as the file has them (the dataset's own ids and
        exact segmentations): what evaluation scores against."""
        kept = {inst.annotation_id for r in self.records for inst in r.instances}
        image_ids = {r.image_id for r in self.records}
        return {
            "images": [img for img in self.raw["images"] if img["id"] in image_ids],
            "annotations": [a for a in self.raw["annotations"] if a.get("id") in kept],
            "categories": self.raw["categories"],
        }


class _SkippingErrorPolicy(ImportErrorPolicy):
    """Skips a bad annotation or image entry and remembers why, instead of failing the import."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def _handle_item_error(self, error: Exception) -> None:
        self.problems.append(f"image entry {error.item_id[0]}: {error.__cause__}")

    def _handle_annotation_error(self, error: Exception) -> None:
        self.problems.append(f"annotation {error.item_id[0]}: {error.__cause__}")


def annotation_file(root: Path, subset: str | None) -> Path:
    """The `annotations/instances_<subset>.json` of a dataset root.

    A root with a single annotation file uses it whatever its name; with `subset` None,
    "test" then "val" is preferred.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"dataset root '{root}' is not a directory (expected a COCO root)")
    ann_dir = root / "annotations"
    files = sorted(ann_dir.glob(ANNOTATION_GLOB)) if ann_dir.is_dir() else []
    if not files:
        raise DataError(
            f"dataset root '{root}' has no annotations/{ANNOTATION_GLOB}; expected the COCO layout "
            f"<root>/annotations/instances_<subset>.json and <root>/images/<subset>/"
        )
    if len(files) == 1:
        return files[0]
    for name in [subset] if subset else ["test", "val"]:
        wanted = ann_dir / f"instances_{name}.json"
        if wanted in files:
            return wanted
    names = ", ".join(_subset_name(f) for f in files)
    raise DataError(
        f"dataset root '{root}' has several subsets ({names}) and none named "
        f"'{subset or 'test/val'}'; pass --subset NAME or a root that holds only one subset"
    )


def _subset_name(path: Path) -> str:
    return path.stem[len("instances_") :]


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file '{path}': {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"annotation file '{path}' is not valid JSON (line {e.lineno}, column {e.colno}: "
            f"{e.msg}); the file is corrupt or truncated - re-export or re-copy it"
        ) from e
    if not isinstance(data, dict):
        raise DataError(f"annotation file '{path}': expected a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(
                f"annotation file '{path}': field '{key}' is missing or not a list "
                f"(a COCO instances file has 'images', 'annotations' and 'categories')"
            )
    if not data["categories"]:
        raise DataError(f"annotation file '{path}': 'categories' is empty; declare the classes")
    return data


def _categories(path: Path, data: dict) -> tuple[list[int], list[str]]:
    cats = []
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise DataError(
                f"annotation file '{path}': categories[{i}] needs an integer 'id' and a 'name'"
            )
        cats.append((c["id"], str(c["name"])))
    ids = [cid for cid, _ in cats]
    if 0 in ids:
        raise DataError(
            f"annotation file '{path}': category id 0 is not supported (COCO numbers categories "
            f"from 1, and Datumaro drops the annotations of id 0); renumber the categories"
        )
    if len(set(ids)) != len(ids):
        raise DataError(f"annotation file '{path}': duplicate category ids in 'categories'")
    cats.sort()  # Datumaro numbers labels in category-id order
    return [cid for cid, _ in cats], [name for _, name in cats]


def load_coco_subset(root: Path, subset: str | None) -> CocoSubset:
    """Imports one subset of a COCO root; bad annotations are skipped, counted and logged."""
    path = annotation_file(Path(root), subset)
    data = _read_json(path)
    category_ids, class_names = _categories(path, data)
    name = _subset_name(path)
    skipped: Counter = Counter()
    problems: list[str] = []

    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and ann.get("image_id") not in image_ids:
            skipped["annotation for an unknown image id"] += 1
            problems.append(f"annotation {ann.get('id')}: image_id {ann.get('image_id')} unknown")

    policy = _SkippingErrorPolicy()
    try:
        dataset = Dataset.import_from(str(path), "coco_instances", error_policy=policy)
    except Exception as e:  # Datumaro raises many types; the message is what the user needs
        raise DataError(f"annotation file '{path}': Datumaro could not import it: {e}") from e
    for problem in policy.problems:
        skipped[_reason(problem)] += 1
    problems.extend(policy.problems)

    labels = dataset.categories()[AnnotationType.label]
    imported_names = [label.name for label in labels]
    if imported_names != class_names:
        raise DataError(
            f"annotation file '{path}': Datumaro read the categories as {imported_names}, "
            f"the file declares {class_names}; check 'categories' for duplicate names or ids"
        )

    records = _records(dataset, path, Path(root) / "images" / name, skipped, problems)
    records.sort(key=lambda r: r.image_id)
    if not records:
        raise DataError(
            f"annotation file '{path}' has no usable images: 'images' is empty or every entry "
            f"was skipped (see the warnings above)"
        )
    if skipped:
        log.warning(
            "%s: skipped %d bad annotation(s): %s. First: %s",
            path,
            sum(skipped.values()),
            ", ".join(f"{n} {reason}" for reason, n in skipped.items()),
            "; ".join(problems[:3]),
        )
    return CocoSubset(name, (path,), records, class_names, category_ids, data, skipped)


def _records(
    dataset: Dataset, path: Path, images: Path, skipped: Counter, problems: list[str]
) -> list[ImageRecord]:
    """The imported items as records; an error naming the images that are missing or whose
    size differs from the annotation file's."""
    records = []
    missing: list[str] = []
    wrong_size: list[str] = []
    for item in dataset:
        size = image_size(Path(item.media.path))  # (height, width) from the file header
        if size is None:
            missing.append(item.media.path)
            continue
        if item.media.size is not None and tuple(item.media.size) != size:
            wrong_size.append(
                f"image id {item.attributes.get('id')} '{item.media.path}' is "
                f"{size[1]}x{size[0]}, the file says {item.media.size[1]}x{item.media.size[0]}"
            )
            continue
        records.append(_to_record(item, size, skipped, problems))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"annotation file '{path}' names {len(missing)} image(s) that are missing or not "
            f"readable images: {shown}; images must be under '{images}'"
        )
    if wrong_size:
        raise DataError(
            f"annotation file '{path}': {len(wrong_size)} image(s) differ from their "
            f"'width'/'height': {'; '.join(wrong_size[:3])}; fix the annotation file"
        )
    return records


def load_coco_roots(roots: Sequence[Path], subset: str | None) -> CocoSubset:
    """One subset of several COCO roots as one dataset (`--train-data-roots a,b`).

    Every root must declare the same categories. Image and annotation ids are renumbered
    from 1 across the roots, so that they stay unique, and image paths are made absolute.
    With one root this is `load_coco_subset`.
    """
    roots = [Path(root) for root in roots]
    if not roots:
        raise DataError("no dataset root given; pass at least one COCO root")
    resolved = [root.resolve() for root in roots]
    repeated = sorted({str(r) for r, key in zip(roots, resolved) if resolved.count(key) > 1})
    if repeated:
        raise DataError(f"dataset root(s) {', '.join(repeated)} given more than once")
    parts = [load_coco_subset(root, subset) for root in roots]
    if len(parts) == 1:
        return parts[0]
    for part in parts[1:]:
        _check_same_categories(parts[0], part)
    return _merge(parts)


def _check_same_categories(first: CocoSubset, other: CocoSubset) -> None:
    ours = list(zip(first.category_ids, first.class_names))
    theirs = list(zip(other.category_ids, other.class_names))
    if ours != theirs:
        raise DataError(
            f"annotation files '{first.annotation_file}' and '{other.annotation_file}' declare "
            f"different categories (id, name): only in the first "
            f"{[c for c in ours if c not in theirs]}, only in the second "
            f"{[c for c in theirs if c not in ours]}; roots of one subset must declare the same"
        )


def _merge(parts: list[CocoSubset]) -> CocoSubset:
    images: list[dict] = []
    annotations: list[dict] = []
    records: list[ImageRecord] = []
    for part in parts:
        raw_images = {i["id"]: i for i in part.raw["images"] if isinstance(i, dict) and "id" in i}
        raw_annotations = {
            a["id"]: a for a in part.raw["annotations"] if isinstance(a, dict) and "id" in a
        }
        for record in part.records:
            image_id = len(images) + 1
            instances = []
            for instance in record.instances:
                annotations.append(
                    {
                        **raw_annotations[instance.annotation_id],
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                    }
                )
                instances.append(replace(instance, annotation_id=len(annotations)))
            path = record.path.absolute()
            images.append({**raw_images[record.image_id], "id": image_id, "file_name": str(path)})
            records.append(
                replace(record, image_id=image_id, path=path, instances=tuple(instances))
            )
    first = parts[0]
    names = list(dict.fromkeys(part.name for part in parts))
    raw = {"images": images, "annotations": annotations, "categories": first.raw["categories"]}
    return CocoSubset(
        "+".join(names),
        tuple(path for part in parts for path in part.annotation_files),
        records,
        first.class_names,
        first.category_ids,
        raw,
        sum((part.skipped for part in parts), Counter()),
    )


def _reason(problem: str) -> str:
    if "Expected at least 3" in problem:
        return "polygon with fewer than 3 points"
    if "Undeclared" in problem or "undeclared" in problem:
        return "unknown category id"
    return "malformed annotation"


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the image header, or None when it is missing or not an image."""
    try:
        with Image.open(path) as im:  # reads the header only
            return im.height, im.width
    except (OSError, UnidentifiedImageError):
        return None


def _to_record(item, size: tuple[int, int], skipped: Counter, problems: list[str]) -> ImageRecord:
    height, width = size
    groups: dict[int, dict] = {}
    for ann in item.annotations:
        entry = groups.setdefault(ann.group, {"polygons": [], "rle": None, "box": None})
        if isinstance(ann, Polygon):
            entry["polygons"].append(np.asarray(ann.points, dtype=np.float64).reshape(-1, 2))
        elif isinstance(ann, RleMask):
            entry["rle"] = ann.rle
        elif isinstance(ann, Bbox):
            entry["box"] = ann
    instances = []
    for group, entry in groups.items():
        bbox = entry["box"]
        if bbox is None or bbox.label is None:
            skipped["annotation without a box or category"] += 1
            problems.append(f"annotation {group}: no bbox or category")
            continue
        x, y, w, h = bbox.get_bbox()
        if w <= 0 or h <= 0:
            skipped["zero-area box"] += 1
            problems.append(f"annotation {group}: bbox {[x, y, w, h]} has zero area")
            continue
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:
            skipped["box outside the image"] += 1
            problems.append(f"annotation {group}: bbox {[x, y, w, h]} lies outside the image")
            continue
        crowd = bool(bbox.attributes.get("is_crowd", False))
        if not entry["polygons"] and entry["rle"] is None:
            skipped["annotation without a segmentation"] += 1
            problems.append(f"annotation {group}: no segmentation")
            continue
        instances.append(
            Instance(
                label=bbox.label,
                box=(float(x1), float(y1), float(x2), float(y2)),
                polygons=tuple(entry["polygons"]),
                rle=_normalise_rle(entry["rle"]) if entry["rle"] is not None else None,
                crowd=crowd,
                annotation_id=int(group),
            )
        )
    return ImageRecord(
        image_id=int(item.attributes.get("id", 0)),
        path=Path(item.media.path),
        width=int(width),
        height=int(height),
        instances=tuple(instances),
    )


def _normalise_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts}
