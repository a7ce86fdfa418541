"""Where a training starts: class-incremental fine-tuning from a checkpoint of other classes,
torchvision's COCO Mask R-CNN for the ResNet50 template (by name or from a file), and the
template's own start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from instseg_trainer.engine.checkpoint import FORMAT
from instseg_trainer.engine.run import TrainConfig, start_weights
from instseg_trainer.errors import CheckpointError
from instseg_trainer.models import starts
from instseg_trainer.models.mask_rcnn import build_model
from instseg_trainer.models.starts import adapt_class_layers, load_start, read_start
from instseg_trainer.templates import get_template

CLS = "roi_heads.box_predictor.cls_score.weight"
BOX = "roi_heads.box_predictor.bbox_pred.weight"
MASK = "roi_heads.mask_predictor.mask_fcn_logits.weight"
BACKBONE = "backbone.fpn.layer_blocks.0.0.weight"


def _model(classes: int, template: str = "MaskRCNN-EfficientNetB2B", layout: str = "none"):
    torch.manual_seed(classes)
    model_cfg = get_template(template).model
    return build_model(model_cfg, classes, 64, layout, load_backbone_weights=False)


def _checkpoint(path: Path, model, class_names: list[str]) -> Path:
    torch.save({"format": FORMAT, "model": model.state_dict(), "class_names": class_names,
                "template": "MaskRCNN-EfficientNetB2B"}, path)  # fmt: skip
    return path


def test_adapting_keeps_the_background_and_the_shared_classes_rows() -> None:
    old = {CLS: torch.arange(4.0)[:, None].repeat(1, 2), BOX: torch.arange(16.0)[:, None]}
    fresh = {CLS: torch.full((4, 2), -1.0), BOX: torch.full((16, 1), -1.0)}
    new = adapt_class_layers(old, fresh, ["a", "b", "c"], ["c", "a", "d"])
    assert new[CLS][:, 0].tolist() == [0, 3, 1, -1]  # background, c, a, d (fresh)
    assert new[BOX][:, 0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, -1, -1, -1, -1]


def test_a_checkpoint_of_other_classes_starts_a_class_incremental_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trained = _model(3)
    path = _checkpoint(tmp_path / "best.pt", trained, ["circle", "rectangle", "triangle"])
    model = _model(4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("INFO"):
        load_start(model, read_start(path, "MaskRCNN-EfficientNetB2B"),
                   ["triangle", "circle", "star", "hexagon"])  # fmt: skip
    old, new = trained.state_dict(), model.state_dict()
    assert torch.equal(new[BACKBONE], old[BACKBONE])  # shared layers: loaded
    for layer in (CLS, MASK):
        assert torch.equal(new[layer][0], old[layer][0])  # background
        assert torch.equal(new[layer][1], old[layer][3])  # triangle
        assert torch.equal(new[layer][2], old[layer][1])  # circle
        assert torch.equal(new[layer][3:], fresh[layer][3:])  # star, hexagon: initialised
    assert torch.equal(new[BOX][4:8], old[BOX][12:16])
    assert "class-incremental" in caplog.text and "'star', 'hexagon'" in caplog.text


def test_same_classes_load_every_weight(tmp_path: Path) -> None:
    trained = _model(3)
    path = _checkpoint(tmp_path / "best.pt", trained, ["a", "b", "c"])
    model = _model(3)
    load_start(model, read_start(path, "MaskRCNN-EfficientNetB2B"), ["a", "b", "c"])
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())


def test_torchvisions_coco_mask_rcnn_file_starts_the_resnet50_template(tmp_path: Path) -> None:
    coco = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(coco.state_dict(), path)
    model = _model(2, "MaskRCNN-ResNet50", layout="imagenet")  # frozen norms, as COCO's
    load_start(model, read_start(path, "MaskRCNN-ResNet50"), ["person", "widget"])
    ours, theirs = model.state_dict(), coco.state_dict()
    assert torch.equal(ours["backbone.body.layer1.0.conv1.weight"],
                       theirs["backbone.body.layer1.0.conv1.weight"])  # fmt: skip
    assert torch.equal(ours["rpn.head.conv.0.0.weight"], theirs["rpn.head.conv.0.0.weight"])
    assert torch.equal(ours[CLS][1], theirs[CLS][1])  # "person" is COCO's class 1
    assert not torch.equal(ours[CLS][2], theirs[CLS][2])  # "widget" is new
    with pytest.raises(CheckpointError, match="fits MaskRCNN-ResNet50, not MaskRCNN-ConvNeXt"):
        read_start(path, "MaskRCNN-ConvNeXt")
    narrow = get_template("MaskRCNN-ResNet50").with_settings({"mask_head.channels": 128})
    changed = build_model(narrow.model, 2, 64, "imagenet", load_backbone_weights=False)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_start(changed, read_start(path, "MaskRCNN-ResNet50"), ["person", "widget"])


def test_without_internet_coco_says_which_file_to_bring(monkeypatch) -> None:
    def offline(self, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(type(starts._coco_weights()), "get_state_dict", offline)
    with pytest.raises(CheckpointError) as refused:
        read_start("coco", "MaskRCNN-ResNet50")
    message = str(refused.value)
    assert "name resolution" in message
    assert "--weights /path/to/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in message


def test_a_file_that_is_no_start_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_start(tmp_path / "broken.pt", "MaskRCNN-ResNet50")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither an instseg checkpoint nor"):
        read_start(tmp_path / "other.pt", "MaskRCNN-ResNet50")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_start(tmp_path / "missing.pt", "MaskRCNN-ResNet50")


def test_a_start_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "best.pt", _model(3), ["a", "b", "c"])
    with pytest.raises(CheckpointError, match="does not fit the model built here"):
        load_start(_model(3, "MaskRCNN-ResNet50"), read_start(path, "MaskRCNN-ResNet50"),
                   ["a", "b", "c"])  # fmt: skip


@pytest.mark.parametrize(
    ("template", "weights", "backbone", "start"),
    [
        ("MaskRCNN-ResNet50", None, None, "coco"),  # the template's start, as OTX's load_from
        ("MaskRCNN-ResNet50", None, "none", None),  # --backbone-weights chose the start
        ("MaskRCNN-ResNet50", None, "imagenet", None),
        ("MaskRCNN-EfficientNetB2B", None, None, None),
        ("MaskRCNN-EfficientNetB2B", "run/best.pt", "none", "run/best.pt"),
    ],
)
def test_the_start_is_weights_else_the_templates(template, weights, backbone, start) -> None:
    cfg = TrainConfig(get_template(template), "data", [], "out", backbone_weights=backbone,
                      init_weights=weights)  # fmt: skip
    assert start_weights(cfg) == start
