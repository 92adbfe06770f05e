"""Random generators' states in checkpoints, so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA, numpy's and Python's global generator states, in types `torch.load(weights_only=True)`
    reads (numpy's key as a tensor)."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"],
                                           "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))}},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def separate_rank_stream(rank: int) -> None:
    """Reseed torch's generators (CPU and CUDA) from one draw of the current stream and `rank`."""
    shared = int(torch.randint(2**62, ()))
    torch.manual_seed(int(np.random.SeedSequence([shared, rank]).generate_state(1, np.uint64)[0]) % 2**63)


class RNGState(L.Callback):
    """Stores the global random generators' states in every checkpoint and restores them just before the first
    training step after a resume: the noise, timesteps and caption dropout of the steps that follow are those of
    a run that was never stopped. Lightning saves no random state; seeding again at resume would replay step 0's.

    Restoring at the first step, not at load time, keeps whatever runs in between (the resumed loader's first
    batch, callbacks' start hooks) from shifting the stream. The data's own randomness is not drawn from
    these generators (see `text2img.lightning.datamodule.ResumableTrainLoader`).

    Ranks: `seed_everything` seeds every DDP rank alike, so sample i of every rank's batch would get the same
    noise, timestep and caption-dropout draw. At the first step (and after a resume) each rank > 0 moves to a
    stream of its own, derived from the shared one and its rank; rank 0 keeps the shared stream, so a single
    process is unaffected. Checkpoints hold rank 0's states: rank 0 resumes exactly, the others on new streams.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._started = False

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._to_restore is not None:
            restore_rng_state(self._to_restore)
            self._to_restore = None
        elif self._started:
            return
        self._started = True
        if trainer.global_rank > 0:
            separate_rank_stream(trainer.global_rank)
