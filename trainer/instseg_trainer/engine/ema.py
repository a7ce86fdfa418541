"""EMA of the weights with torch.optim.swa_utils, parameterised like OTX's EMA hook."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay(epoch_momentum: float, iterations_per_epoch: int) -> float:
    """Per-iteration decay such that weights one epoch old keep (1 - epoch_momentum) of
    their share, i.e. OTX's `epoch_momentum` spread over an epoch's iterations."""
    return (1.0 - epoch_momentum) ** (1.0 / max(iterations_per_epoch, 1))


def build_ema(model: nn.Module, epoch_momentum: float, iterations_per_epoch: int) -> AveragedModel:
    """An averaged copy of `model` (buffers too, so batch-norm statistics follow)."""
    decay = ema_decay(epoch_momentum, iterations_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
