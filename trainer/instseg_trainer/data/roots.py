"""Dataset roots as users give them (`--train-data-roots a,b`): each root in any COCO layout
(coco.py) or any other instance-segmentation format Datumaro detects (formats.py), several
roots merged into one subset, and a validation split of train when no val root is given."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from instseg_trainer.data.coco import CocoSubset, ImageRecord, find_coco_layout, load_coco_layout
from instseg_trainer.data.formats import load_datumaro_subset
from instseg_trainer.errors import DataError

log = logging.getLogger(__name__)

VAL_FRACTION = 0.2  # of train, when no val root is given (as OTX splits)
SPLIT_SEED = 0


def load_root(root: Path, subset: str | None) -> CocoSubset:
    """One subset of one root: COCO when it has a COCO layout, else the format Datumaro
    detects."""
    layout = find_coco_layout(Path(root), subset)
    if layout is not None:
        return load_coco_layout(layout)
    return load_datumaro_subset(Path(root), subset)


def load_roots(roots: Sequence[Path], subset: str | None) -> CocoSubset:
    """One subset of several roots as one dataset (`--train-data-roots a,b`).

    Every root must declare the same categories. Image and annotation ids are renumbered
    from 1 across the roots, so that they stay unique, and image paths are made absolute.
    With one root this is `load_root`.
    """
    roots = [Path(root) for root in roots]
    if not roots:
        raise DataError("no dataset root given; pass at least one dataset root")
    resolved = [root.resolve() for root in roots]
    repeated = sorted({str(r) for r, key in zip(roots, resolved) if resolved.count(key) > 1})
    if repeated:
        raise DataError(f"dataset root(s) {', '.join(repeated)} given more than once")
    parts = [load_root(root, subset) for root in roots]
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


def load_train_val(
    train_roots: Sequence[Path], val_roots: Sequence[Path]
) -> tuple[CocoSubset, CocoSubset]:
    """The train and val subsets a training uses: val from its roots, or, without any, the
    fixed split of train (split_for_validation)."""
    train = load_roots(train_roots, "train")
    if val_roots:
        return train, load_roots(val_roots, "val")
    return split_for_validation(train)


def split_for_validation(train: CocoSubset) -> tuple[CocoSubset, CocoSubset]:
    """Train without a val root: VAL_FRACTION of its images (at least one), drawn with a fixed
    seed from the images in id order, become the val subset; the same data always splits the
    same way. Both keep the whole COCO dict: ground_truth() takes each one's images."""
    if len(train.records) < 2:
        raise DataError(
            f"train set {train.annotation_file} has {len(train.records)} image(s): too few to "
            f"split off a validation set; give --val-data-roots"
        )
    ordered = sorted(train.records, key=lambda r: r.image_id)
    count = max(1, math.floor(len(ordered) * VAL_FRACTION))
    chosen = set(random.Random(SPLIT_SEED).sample(range(len(ordered)), count))
    val_records = [r for i, r in enumerate(ordered) if i in chosen]
    train_records = [r for i, r in enumerate(ordered) if i not in chosen]
    log.info(
        "no val root given: the val set is %d of the %d train images (%.0f%%, seed %d)",
        count, len(ordered), 100 * VAL_FRACTION, SPLIT_SEED,
    )  # fmt: skip
    return (replace(train, records=train_records, skipped=Counter(train.skipped)),
            replace(train, name=f"{train.name} (val split)", records=val_records,
                    skipped=Counter()))  # fmt: skip
