"""The recipe's losses where torchvision's differ: L1 box regression in the RPN and RoI head.

Classification stays cross-entropy (binary for RPN objectness, softmax for RoI classes) and
masks stay per-class binary cross-entropy, exactly as in torchvision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork


def l1_box_loss(
    box_regression: torch.Tensor, labels: list[torch.Tensor], regression_targets: list[torch.Tensor]
) -> torch.Tensor:
    """L1 between predicted and target deltas of the positive RoIs, per sampled RoI.

    `box_regression` is (N, classes*4); the deltas of each RoI's ground-truth class are used.
    """
    labels_all = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    positive = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[positive, labels_all[positive]]
    return F.l1_loss(deltas, targets[positive], reduction="sum") / max(labels_all.numel(), 1)


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with an L1 box loss instead of smooth L1."""

    def compute_loss(
        self,
        objectness: torch.Tensor,
        pred_bbox_deltas: torch.Tensor,
        labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels_all = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / max(
            sampled.numel(), 1
        )
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels_all[sampled]
        )
        return objectness_loss, box_loss


class L1RoIHeads(RoIHeads):
    """torchvision's RoIHeads with an L1 box loss instead of smooth L1.

    torchvision computes the box loss inside `forward` with a module-level function, so the
    sampled targets and the predictor's output are kept on the side and the box term is
    replaced; everything else (sampling, mask branch, inference) is torchvision's own.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._box_regression: torch.Tensor | None = None
        self._sampled: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.box_predictor.register_forward_hook(self._keep_box_regression)

    def _keep_box_regression(self, module, inputs, outputs) -> None:
        if self.training:
            self._box_regression = outputs[1]

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(
            proposals, targets
        )
        self._sampled = (labels, regression_targets)
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training:
            labels, regression_targets = self._sampled
            losses["loss_box_reg"] = l1_box_loss(self._box_regression, labels, regression_targets)
            self._box_regression = self._sampled = None
        return result, losses
