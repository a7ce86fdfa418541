"""EMA of the weights, parameterised like OTX's EMA hook."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def ema_decay(epoch_momentum: float, iterations_per_epoch: int) -> float:
    """Per-iteration decay such that weights one epoch old keep (1 - epoch_momentum) of
    their share, i.e. OTX's `epoch_momentum` spread over an epoch's iterations."""
    return (1.0 - epoch_momentum) ** (1.0 / max(iterations_per_epoch, 1))


class WeightEma:
    """An averaged copy of a model, buffers too (so batch-norm statistics follow).

    The same arithmetic as torch's AveragedModel with get_ema_multi_avg_fn, but the step
    count is a Python int: AveragedModel keeps it in a CPU tensor that it compares and
    copies to the device on every update, a host-device sync per training step.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        # listed afresh each time: .to() or load_state_dict(assign=True) replace tensors
        mine, mine_others = _split_floating(_tensors(self.module))
        floats, others = _split_floating(_tensors(model))
        if self.steps == 0:
            torch._foreach_copy_(mine + mine_others, floats + others)
        else:
            torch._foreach_lerp_(mine, floats, 1.0 - self.decay)
            for averaged, current in zip(mine_others, others, strict=True):
                averaged.copy_(averaged * self.decay + current * (1.0 - self.decay))
        self.steps += 1


def build_ema(model: nn.Module, epoch_momentum: float, iterations_per_epoch: int) -> WeightEma:
    """An averaged copy of `model` with the decay of `ema_decay`."""
    return WeightEma(model, ema_decay(epoch_momentum, iterations_per_epoch))


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]


def _split_floating(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    floats = [t for t in tensors if t.is_floating_point()]
    return floats, [t for t in tensors if not t.is_floating_point()]
