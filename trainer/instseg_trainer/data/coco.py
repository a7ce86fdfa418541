"""COCO instance annotations → image records, imported with Datumaro.

The JSON is read once up front so that a corrupt file is reported with its line and column,
and so that the dataset's own image and category ids are kept for the COCO results.
Datumaro does the format parsing (polygons, compressed and uncompressed RLE, crowd flags).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datumaro.components.annotation import AnnotationType, Bbox, Polygon, RleMask
from datumaro.components.contexts.importer import ImportErrorPolicy
from datumaro.components.dataset import Dataset
from datumaro.plugins.data_formats.coco.base import CocoImporterType
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
    # a tile of the image (x0, y0, x1, y1) that training sees instead of all of it
    window: tuple[int, int, int, int] | None = None

    @property
    def size_hw(self) -> tuple[int, int]:
        """(height, width) of what the model sees: the tile, or the image."""
        if self.window is None:
            return self.height, self.width
        x0, y0, x1, y1 = self.window
        return y1 - y0, x1 - x0


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


@dataclass(frozen=True)
class CocoLayout:
    """Where a COCO root keeps its annotation file and its images. The layouts read:
    - ours and CVAT's: annotations/instances_<subset>.json + images/<subset>/ (or images/);
    - the official COCO 2017 one: annotations/instances_train2017.json + train2017/;
    - one COCO file beside its images (labelme2coco, CVAT's single-file export):
      annotations.json + JPEGImages/, given as the root folder or as the file itself.
    `images` is the folder the file's `file_name` entries are relative to; None for a single
    file until its entries are read (single_file_images)."""

    annotation_file: Path
    subset: str
    images: Path | None


def find_coco_layout(root: Path, subset: str | None) -> CocoLayout | None:
    """The COCO layout of `root` for `subset` (None: test, then val, or the only one); None
    when `root` is no COCO dataset (it may be in another Datumaro format)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root '{root}' does not exist")
    if root.is_file():
        if root.suffix != ".json":
            raise DataError(
                f"dataset root '{root}' is a file but not a COCO .json; give a dataset folder "
                f"or its COCO annotation file"
            )
        return CocoLayout(root, root.stem, None)
    ann_dir = root / "annotations"
    files = sorted(ann_dir.glob(ANNOTATION_GLOB)) if ann_dir.is_dir() else []
    if files:
        path = _pick_annotation_file(root, files, subset)
        name = _subset_name(path)
        for images in (root / "images" / name, root / name, root / "images"):
            if images.is_dir():
                return CocoLayout(path, name, images)
        raise DataError(
            f"dataset root '{root}' has '{path}' but no folder of its images: expected "
            f"'{root / 'images' / name}', '{root / name}' (COCO 2017) or '{root / 'images'}'"
        )
    singles = sorted(p for p in root.glob("*.json") if _looks_like_coco(p))
    if len(singles) > 1:
        names = ", ".join(p.name for p in singles)
        raise DataError(
            f"dataset root '{root}' holds several COCO files ({names}); give the one to use "
            f"as the root (e.g. '{singles[0]}')"
        )
    return CocoLayout(singles[0], singles[0].stem, None) if singles else None


def _pick_annotation_file(root: Path, files: list[Path], subset: str | None) -> Path:
    """The file of `subset`: instances_<subset>.json, else the one whose subset name starts
    with it (train → instances_train2017.json); a single file serves every subset."""
    if len(files) == 1:
        return files[0]
    for name in [subset] if subset else ["test", "val"]:
        exact = [f for f in files if _subset_name(f) == name]
        prefixed = [f for f in files if _subset_name(f).startswith(name)]
        if len(exact or prefixed) == 1:
            return (exact or prefixed)[0]
    names = ", ".join(_subset_name(f) for f in files)
    raise DataError(
        f"dataset root '{root}' has several subsets ({names}) and not one named "
        f"'{subset or 'test/val'}' or starting with it; give a root or an annotation file per "
        f"subset (eval and predict also take --subset NAME)"
    )


def _looks_like_coco(path: Path) -> bool:
    """Whether a .json file is a COCO file (its start names COCO's "images"), without parsing
    it: LabelMe's and Segment Anything's per-image .json files lie beside images too."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return '"images"' in head  # Segment Anything's per-image files hold "image", singular


def single_file_images(path: Path, data: dict) -> Path:
    """The folder a single COCO file's `file_name` entries are relative to: the file's own
    folder, or the one of its sub-folders (JPEGImages/, images/, ...) that holds the first
    images."""
    names = [img["file_name"] for img in data["images"][:5]
             if isinstance(img, dict) and isinstance(img.get("file_name"), str)]  # fmt: skip
    base = path.parent
    for folder in [base, *sorted(p for p in base.iterdir() if p.is_dir())]:
        if names and all((folder / name).is_file() for name in names):
            return folder
    return base  # _records names the images it misses there


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
    """Imports one subset of a COCO root (any CocoLayout)."""
    layout = find_coco_layout(Path(root), subset)
    if layout is None:
        raise DataError(
            f"dataset root '{root}' has no annotations/{ANNOTATION_GLOB} and no COCO .json; "
            f"expected <root>/annotations/instances_<subset>.json with <root>/images/<subset>/"
        )
    return load_coco_layout(layout)


def load_coco_layout(layout: CocoLayout) -> CocoSubset:
    """Imports a COCO file with Datumaro; bad annotations are skipped, counted and logged."""
    path = layout.annotation_file
    data = _read_json(path)
    filtered = _without_unused_category_zero(path, data)
    data = filtered or data
    category_ids, class_names = _categories(path, data)
    images = layout.images or single_file_images(path, data)
    skipped: Counter = Counter()
    problems: list[str] = []

    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and ann.get("image_id") not in image_ids:
            skipped["annotation for an unknown image id"] += 1
            problems.append(f"annotation {ann.get('id')}: image_id {ann.get('image_id')} unknown")

    policy = _SkippingErrorPolicy()
    with tempfile.TemporaryDirectory(prefix="instseg-coco-") as staging:
        dataset = _import_staged(path, images, Path(staging), policy, filtered)
        for problem in policy.problems:
            skipped[_reason(problem)] += 1
        problems.extend(policy.problems)
        _check_imported_categories(path, dataset, class_names)
        records = _records(dataset, path, images, Path(staging) / "images", skipped, problems)
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
    return CocoSubset(layout.subset, (path,), records, class_names, category_ids, data, skipped)


def _without_unused_category_zero(path: Path, data: dict) -> dict | None:
    """`data` without a category of id 0 that no annotation uses (labelme2coco declares its
    `_background_` so), or None when there is none such."""
    zero = [c for c in data["categories"] if isinstance(c, dict) and c.get("id") == 0]
    used = any(isinstance(a, dict) and a.get("category_id") == 0 for a in data["annotations"])
    if not zero or used:
        return None
    log.info("%s: category id 0 %r has no annotations: not a class", path, zero[0].get("name"))
    return {**data, "categories": [c for c in data["categories"] if c not in zero]}


def _import_staged(
    path: Path, images: Path, staging: Path, policy, edited: dict | None = None
) -> Dataset:
    """Datumaro's COCO import of `path` with its images in `images`, whatever the layout: the
    file (or its `edited` form) and the folder are linked into `staging` as the COCO 2017
    layout Datumaro reads (annotations/instances_images.json + images/), and loaded there."""
    (staging / "annotations").mkdir()
    staged = staging / "annotations" / "instances_images.json"
    if edited is None:
        staged.symlink_to(path.absolute())
    else:
        staged.write_text(json.dumps(edited), encoding="utf-8")
    (staging / "images").symlink_to(images.absolute(), target_is_directory=True)
    try:
        dataset = Dataset.import_from(
            str(staging / "annotations" / "instances_images.json"), "coco_instances",
            coco_importer_type=CocoImporterType.mmdet, error_policy=policy,
        )  # fmt: skip
        dataset.init_cache()  # read every item while the links exist
    except Exception as e:  # Datumaro raises many types; the message is what the user needs
        raise DataError(f"annotation file '{path}': Datumaro could not import it: {e}") from e
    return dataset


def _check_imported_categories(path: Path, dataset: Dataset, class_names: list[str]) -> None:
    imported_names = [label.name for label in dataset.categories()[AnnotationType.label]]
    if imported_names != class_names:
        raise DataError(
            f"annotation file '{path}': Datumaro read the categories as {imported_names}, "
            f"the file declares {class_names}; check 'categories' for duplicate names or ids"
        )


def _records(
    dataset: Dataset,
    path: Path,
    images: Path,
    staged: Path,
    skipped: Counter,
    problems: list[str],
) -> list[ImageRecord]:
    """The imported items as records, their image paths under `images` (Datumaro saw them
    under `staged`); an error naming the images that are missing or whose size differs from
    the annotation file's."""
    records = []
    missing: list[str] = []
    wrong_size: list[str] = []
    for item in dataset:
        image = images / Path(item.media.path).relative_to(staged)
        size = image_size(image)  # (height, width) from the file header
        if size is None:
            missing.append(str(image))
            continue
        if item.media.size is not None and tuple(item.media.size) != size:
            wrong_size.append(
                f"image id {item.attributes.get('id')} '{image}' is "
                f"{size[1]}x{size[0]}, the file says {item.media.size[1]}x{item.media.size[0]}"
            )
            continue
        records.append(_to_record(item, image, size, skipped, problems))
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


def _to_record(
    item, path: Path, size: tuple[int, int], skipped: Counter, problems: list[str]
) -> ImageRecord:
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
        path=path,
        width=int(width),
        height=int(height),
        instances=tuple(instances),
    )


def _normalise_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts}
