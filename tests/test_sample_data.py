import json
from pathlib import Path

import datumaro as dm
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from instseg_trainer.sample_data import CLASS_NAMES, write_sample_dataset


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    return root, write_sample_dataset(root)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(root: Path, subset: str) -> COCO:
    return COCO(str(root / "annotations" / f"instances_{subset}.json"))


# Pixels within `width` (chessboard distance) of the mask, outside it.
def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    height, cols = mask.shape
    padded = np.pad(mask, width)
    grown = np.zeros_like(mask)
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            grown |= padded[dy : dy + height, dx : dx + cols]
    return grown & ~mask


def test_same_seed_writes_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"num_train": 5, "num_val": 3, "seed": 7}
    write_sample_dataset(tmp_path / "a", **kwargs)
    write_sample_dataset(tmp_path / "b", **kwargs)
    write_sample_dataset(tmp_path / "c", **{**kwargs, "seed": 8})

    first, second, other = (_files(tmp_path / name) for name in "abc")
    assert len(first) == 2 + 5 + 3
    assert first == second
    assert other.keys() == first.keys()
    json_name = str(Path("annotations", "instances_train.json"))
    assert other[json_name] != first[json_name]
    assert all(other[name] != first[name] for name in first if name.endswith(".png"))
    train, val = (first[str(Path("images", s, f"{s}_0001.png"))] for s in ("train", "val"))
    assert train != val


def test_rewriting_a_root_reproduces_it_and_keeps_other_files(tmp_path: Path) -> None:
    write_sample_dataset(tmp_path, num_train=3, num_val=2)
    before = _files(tmp_path)
    (tmp_path / "images" / "train" / "train_0001.png").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("mine")

    write_sample_dataset(tmp_path, num_train=3, num_val=2)

    after = _files(tmp_path)
    assert after.pop("notes.txt") == b"mine"
    assert after == before


def test_val_subset_does_not_depend_on_train_size(tmp_path: Path) -> None:
    write_sample_dataset(tmp_path / "small", num_train=2, num_val=3)
    write_sample_dataset(tmp_path / "large", num_train=6, num_val=3)
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    val = [name for name in small if "val" in name]
    assert len(val) == 4
    assert all(small[name] == large[name] for name in val)


def test_default_summary_has_every_annotation_kind(default_dataset: tuple[Path, dict]) -> None:
    root, summary = default_dataset
    assert summary["train"]["images"] == 96
    assert summary["val"]["images"] == 24
    total = summary["total"]
    for key in ("polygons", "rle", "crowd", "empty_images"):
        assert total[key] > 0, key
    assert total["objects"] == total["polygons"] + total["rle"]
    assert 0.15 < total["rle"] / total["objects"] < 0.35
    assert 0.03 < total["empty_images"] / total["images"] < 0.2

    for subset in ("train", "val"):
        annotations = json.loads((root / "annotations" / f"instances_{subset}.json").read_text())[
            "annotations"
        ]
        crowd = [a for a in annotations if a["iscrowd"]]
        polygons = [a for a in annotations if isinstance(a["segmentation"], list)]
        assert len(crowd) == summary[subset]["crowd"]
        assert len(polygons) == summary[subset]["polygons"]
        assert len(annotations) - len(crowd) == summary[subset]["objects"]


def test_annotations_match_their_masks(default_dataset: tuple[Path, dict]) -> None:
    root, _ = default_dataset
    for subset in ("train", "val"):
        coco = _load(root, subset)
        categories = {c["id"]: c for c in coco.dataset["categories"]}
        assert {c["name"] for c in categories.values()} == set(CLASS_NAMES)
        assert sorted(categories) != list(range(1, len(categories) + 1))
        assert {c["supercategory"] for c in categories.values()} == {"shape"}

        images = coco.dataset["images"]
        assert [img["id"] for img in images] == list(range(1, len(images) + 1))
        assert len({(img["width"], img["height"]) for img in images}) > len(images) // 2
        annotation_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(set(annotation_ids)) == len(annotation_ids)

        for img in images:
            assert "/" not in img["file_name"]
            with Image.open(root / "images" / subset / img["file_name"]) as pil:
                assert pil.size == (img["width"], img["height"])
            assert 128 <= img["width"] <= 256 and 128 <= img["height"] <= 256

            objects = np.zeros((img["height"], img["width"]), dtype=int)
            for ann in coco.imgToAnns[img["id"]]:
                assert ann["category_id"] in categories
                segmentation = ann["segmentation"]
                if ann["iscrowd"]:
                    assert isinstance(segmentation["counts"], list)
                elif isinstance(segmentation, list):
                    assert len(segmentation) == 1 and len(segmentation[0]) >= 6
                else:
                    assert isinstance(segmentation["counts"], str)
                    assert segmentation["size"] == [img["height"], img["width"]]

                mask = coco.annToMask(ann).astype(bool)
                assert ann["area"] == mask.sum() > 0
                ys, xs = np.nonzero(mask)
                tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert ann["bbox"] == [float(v) for v in tight]
                if not ann["iscrowd"]:
                    objects += mask
            # Occluded objects store only what stays visible, so instances never share a pixel.
            assert objects.max() <= 1


def test_objects_stand_out_from_their_surroundings(default_dataset: tuple[Path, dict]) -> None:
    root, summary = default_dataset
    checked = 0
    for subset in ("train", "val"):
        coco = _load(root, subset)
        for img in coco.dataset["images"]:
            pixels = np.asarray(
                Image.open(root / "images" / subset / img["file_name"]), dtype=float
            )
            # Crowd regions are excluded: their members each have their own colour.
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=False)):
                mask = coco.annToMask(ann).astype(bool)
                colour = np.median(pixels[mask], axis=0)
                inside = np.linalg.norm(pixels[mask] - colour, axis=1)
                around = np.linalg.norm(pixels[_ring(mask, 3)] - colour, axis=1)
                # An object is one flat colour under mild noise, and the ring around it is not.
                assert np.mean(inside < 25) > 0.95, (subset, ann["id"])
                assert np.mean(around > 40) > 0.95, (subset, ann["id"])
                checked += 1
    assert checked == summary["total"]["objects"]


def test_datumaro_imports_both_subsets(default_dataset: tuple[Path, dict]) -> None:
    root, summary = default_dataset
    dataset = dm.Dataset.import_from(str(root), "coco_instances")

    subsets = {name: len(subset) for name, subset in dataset.subsets().items()}
    assert subsets == {"train": 96, "val": 24}
    labels = dataset.categories()[dm.AnnotationType.label]
    assert tuple(label.name for label in labels.items) == CLASS_NAMES

    kinds: dict[str, int] = {}
    for item in dataset:
        assert item.media.data.shape[2] == 3
        for ann in item.annotations:
            key = f"{type(ann).__name__}{'-crowd' if ann.attributes['is_crowd'] else ''}"
            kinds[key] = kinds.get(key, 0) + 1
    assert kinds["Polygon"] == summary["total"]["polygons"]
    assert kinds["RleMask"] == summary["total"]["rle"]
    assert kinds["RleMask-crowd"] == summary["total"]["crowd"]


def test_rejects_arguments_it_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_val"):
        write_sample_dataset(tmp_path, num_val=0)
    with pytest.raises(ValueError, match="min_size"):
        write_sample_dataset(tmp_path, min_size=300, max_size=200)
    assert not any(tmp_path.iterdir())
