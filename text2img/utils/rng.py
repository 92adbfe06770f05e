"""Keeping a run's random stream independent of what was cached."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def random_state_kept(device: torch.device | str = "cpu") -> Iterator[None]:
    """Restores torch's global random state (the CPU's, and the device's on a GPU) on exit.

    For work that happens only when a cache is cold: converting or loading a model (transformers initialises
    weights randomly before loading them), training an evaluator. Without it a run trains differently on a
    fresh machine than on one whose caches are warm, since every later draw (data order, noise) shifts.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
