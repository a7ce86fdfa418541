"""Checkpoints: written atomically, loaded with a clear error when they do not fit."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from instseg_trainer.errors import CheckpointError
from instseg_trainer.files import atomic_write

FORMAT = "instseg-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(state: dict, path: Path) -> None:
    """Saves `state` atomically: a crash or a full disk never leaves a half-written
    checkpoint where a good one was."""
    atomic_write(Path(path), lambda file: torch.save({"format": FORMAT, **state}, file))


def read_weights_file(path: Path, named: str, if_missing: str = "") -> object:
    """torch.load of a file of tensors on the CPU; a CheckpointError naming it (`named`, e.g.
    "checkpoint 'best.pt'") when it is missing (then with `if_missing`) or unreadable."""
    if not Path(path).is_file():
        raise CheckpointError(f"{named} does not exist{if_missing}")
    try:
        # weights_only: a file from a shared volume must not be able to run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{named} cannot be read ({e}); it is corrupt or truncated") from e


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    state = read_weights_file(path, f"checkpoint '{path}'")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not an instseg checkpoint (expected format {FORMAT}); "
            f"use best.pt or last.pt from an instseg training output"
        )
    return state


def rng_state() -> dict:
    """RNG states as tensors and plain values (what a weights-only load accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
