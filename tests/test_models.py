"""Templates, complexity and the recipe's losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instseg_trainer.errors import TemplateError
from instseg_trainer.models.complexity import measure_complexity
from instseg_trainer.models.losses import l1_box_loss
from instseg_trainer.models.mask_rcnn import build_model
from instseg_trainer.templates import all_templates, get_template


def test_templates_resolve_by_name_and_otx_id() -> None:
    names = [t.name for t in all_templates()]
    assert names == ["MaskRCNN-EfficientNetB2B", "MaskRCNN-ResNet50", "MaskRCNN-ConvNeXt"]
    for t in all_templates():
        assert get_template(t.otx_id) == t
        assert get_template(t.name.lower()) == t
    with pytest.raises(TemplateError, match="unknown template"):
        get_template("MaskRCNN-Swin")


def test_overrides_are_typed_and_validated() -> None:
    t = get_template("MaskRCNN-ResNet50").with_overrides(epochs=3, learning_rate=0.02)
    assert t.hyperparameters["epochs"] == 3 and t.hyperparameters["learning_rate"] == 0.02
    assert get_template("MaskRCNN-ResNet50").hyperparameters["epochs"] == 100  # copy, not edit
    with pytest.raises(TemplateError, match="unknown setting 'hyperparameters.epoch'"):
        get_template("MaskRCNN-ResNet50").with_overrides(epoch=3)
    with pytest.raises(TemplateError, match="batch_size"):
        get_template("MaskRCNN-ResNet50").with_overrides(batch_size=0)


def test_every_template_value_can_be_set_by_path_or_unique_ending() -> None:
    recipe = get_template("MaskRCNN-ConvNeXt")
    t = recipe.with_settings({
        "hyperparameters.momentum": 0.95, "rpn.nms_thresh": 0.6, "drop_path_rate": 0,
        "model.anchor_sizes": [16, 32, 64, 128, 256], "grad_clip_norm": 10,
    })  # fmt: skip
    assert t.hyperparameters["momentum"] == 0.95 and t.model["rpn"]["nms_thresh"] == 0.6
    assert t.model["drop_path_rate"] == 0.0 and t.hyperparameters["grad_clip_norm"] == 10.0
    assert t.model["anchor_sizes"] == [16, 32, 64, 128, 256]
    assert recipe.model["rpn"]["nms_thresh"] == 0.7  # the template itself is unchanged
    assert "model.backbone" not in recipe.settings() and len(recipe.settings()) == 40


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hyperparameters.momentom": 0.9}, "unknown setting .* known: .*hyperparameters.momentum"),
        ({"nms_thresh": 0.6}, "ambiguous: model.rpn.nms_thresh, model.roi.nms_thresh"),
        ({"epochs": 2.5}, "takes a value like 100, got 2.5"),
        ({"momentum": "high"}, "takes a value like 0.9"),
        ({"model.roi.nms_thresh": 1.5}, "within \\[0, 1\\]"),
        ({"model.mask_head.convs": 0}, "must be > 0"),
        ({"model.anchor_sizes": [32, 64]}, "5 sizes, one per FPN level"),
        ({"model.backbone": "resnet50"}, "choose another template"),
        ({"plateau_factor": 1.0}, "plateau_factor' must be within \\(0, 1\\)"),
        ({"warmup_ratio": 0.0}, "warmup_ratio' must be within \\(0, 1\\]"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm' must be >= 0"),
        ({"model.roi.bg_iou_thresh": 0.6}, "must not exceed 'model.roi.fg_iou_thresh'"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(settings: dict, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        get_template("MaskRCNN-ResNet50").with_settings(settings)


def test_model_settings_reach_the_built_model() -> None:
    template = get_template("MaskRCNN-EfficientNetB2B").with_settings({
        "model.rpn.nms_thresh": 0.6, "model.roi.detections_per_img": 7,
        "model.mask_head.convs": 2, "model.aspect_ratios": [1.0],
    })  # fmt: skip
    model = build_model(template.model, num_classes=3, input_size=64)
    assert model.rpn.nms_thresh == 0.6 and model.roi_heads.detections_per_img == 7
    assert len(model.roi_heads.mask_head) == 2
    assert model.rpn.anchor_generator.num_anchors_per_location() == [1] * 5


@pytest.mark.parametrize(
    ("name", "seed_gflops", "seed_params_m"),
    # EfficientNet-B2B: the seed's "13.27 MB" is the parameter count in millions
    [("MaskRCNN-EfficientNetB2B", 68.48, 13.27), ("MaskRCNN-ResNet50", 533.80, 44.47)],
)
def test_measured_complexity_matches_the_seed(name, seed_gflops, seed_params_m) -> None:
    c = measure_complexity(get_template(name))
    assert c["gflops"] == pytest.approx(seed_gflops, rel=0.08)
    assert c["parameters"] / 1e6 == pytest.approx(seed_params_m, rel=0.02)


def test_l1_box_loss_uses_the_ground_truth_class_deltas() -> None:
    regression = torch.tensor([[0.0] * 4 + [1.0, 2.0, 3.0, 4.0], [9.0] * 8, [0.5] * 8])
    labels = [torch.tensor([1, 0]), torch.tensor([1])]
    targets = [torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0] * 4]), torch.tensor([[0.0] * 4])]
    # |deltas - targets| of the two positives' class-1 deltas, divided by the 3 sampled RoIs
    expected = ((0 + 1 + 2 + 3) + (0.5 * 4)) / 3
    assert l1_box_loss(regression, labels, targets).item() == pytest.approx(expected)


def test_model_trains_with_l1_box_losses() -> None:
    torch.manual_seed(0)
    template = get_template("MaskRCNN-EfficientNetB2B")
    model = build_model(template.model, num_classes=2, input_size=64).train()
    images = [torch.rand(3, 64, 48), torch.rand(3, 40, 64)]
    masks = torch.zeros(1, 64, 48, dtype=torch.uint8)
    masks[0, 10:40, 8:30] = 1
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
         "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 40, 64, dtype=torch.uint8)},
    ]  # fmt: skip
    losses = model(images, targets)
    assert set(losses) == {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg",
    }  # fmt: skip
    assert all(torch.isfinite(v) for v in losses.values())
    # the RoI box term is L1 of the sampled deltas (torchvision's would be smooth L1)
    heads = model.roi_heads
    assert heads._box_regression is None  # released after use
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad is not None


def test_rpn_box_loss_is_l1() -> None:
    template = get_template("MaskRCNN-EfficientNetB2B")
    rpn = build_model(template.model, 2, 64).rpn
    torch.manual_seed(0)
    labels = [torch.tensor([1.0, 0.0, 1.0, -1.0])]
    targets = [torch.tensor([[0.2] * 4, [0.0] * 4, [0.05] * 4, [0.0] * 4])]
    deltas = torch.zeros(4, 4)
    _, box_loss = rpn.compute_loss(torch.zeros(4, 1), deltas, labels, targets)
    assert box_loss.item() == pytest.approx(F.l1_loss(deltas[[0, 2]], targets[0][[0, 2]],
                                                      reduction="sum").item() / 3)  # fmt: skip
