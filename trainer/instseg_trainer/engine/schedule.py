"""Linear warmup per iteration, then ReduceLROnPlateau on the validation metric."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LinearLR, ReduceLROnPlateau


class WarmupPlateauSchedule:
    """torch's LinearLR (stepped each iteration during warmup) and ReduceLROnPlateau
    (stepped on each validation, maximising segm mAP) over one optimizer."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_iterations: int,
        warmup_ratio: float,
        factor: float,
        patience: int,
        min_lr: float,
    ) -> None:
        self.warmup_iterations = warmup_iterations
        self.warmup = (
            LinearLR(optimizer, start_factor=warmup_ratio, total_iters=warmup_iterations)
            if warmup_iterations > 0
            else None
        )
        self.plateau = ReduceLROnPlateau(
            optimizer, mode="max", factor=factor, patience=patience, min_lr=min_lr
        )
        self.optimizer = optimizer

    def step_iteration(self, iteration: int) -> None:
        """Call after optimizer.step() of (1-based) `iteration`."""
        if self.warmup is not None and iteration <= self.warmup_iterations:
            self.warmup.step()

    def step_validation(self, metric: float) -> None:
        self.plateau.step(metric)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
            "plateau": self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.warmup is not None and state.get("warmup") is not None:
            self.warmup.load_state_dict(state["warmup"])
        self.plateau.load_state_dict(state["plateau"])
