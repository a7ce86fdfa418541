"""Early stopping on the validation metric, as OTX's LazyEarlyStoppingHook does it."""

from __future__ import annotations


class EarlyStopping:
    """Stops when the metric has not improved for `patience` validations, never before
    epoch `start` (1-based); `patience` 0 disables it."""

    def __init__(self, patience: int, start: int = 0) -> None:
        self.patience = patience
        self.start = start
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_validations = 0

    def update(self, metric: float, epoch: int) -> bool:
        """Records the validation of `epoch`; returns True when it is a new best."""
        if self.best is None or metric > self.best:
            self.best, self.best_epoch, self.bad_validations = metric, epoch, 0
            return True
        self.bad_validations += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        return self.patience > 0 and epoch >= self.start and self.bad_validations >= self.patience

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_validations": self.bad_validations,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.bad_validations = state["bad_validations"]
