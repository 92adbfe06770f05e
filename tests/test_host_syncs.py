"""No value comes back from the device in a training step outside the logging steps: on a GPU each such copy
(`.item()`, `bool(tensor)`, `float(tensor)`, `.tolist()`, `.cpu()`) waits for the GPU's queue to drain.

On the CPU every tensor is on the host, so the calls are counted through a patch of `torch.Tensor`, for the
tensors that live on the device when training on a GPU: those made by the data loader (which runs on the host
by design, before the batch moves to the device) are left out. The runs use fused optimisers, the GPU's default
(conf/model/: `${fused_optimizer:...}`), whose step count lives on the device; with the CPU's default optimisers
torch keeps that count on the host and reads it there, which is no sync. On a GPU,
`experiments/bench/gpu_check.py` counts the syncs with `torch.cuda.set_sync_debug_mode("warn")`.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import compose_train, smoke_overrides
from text2img.run.compose import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOST_COPIES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
LOG_EVERY = 4


class SyncCounter(L.Callback):
    """Counts host copies of tensors per training batch: from a batch's start to the next one's (so Lightning's
    logging after the batch counts towards it), until training ends."""

    def __init__(self) -> None:
        self.batch: int | None = None
        self.calls: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self._originals = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = 0 if self.batch is None else self.batch + 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.batch = None

    def __enter__(self) -> "SyncCounter":
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            if counter.batch is not None:
                stack = traceback.extract_stack(limit=40)[:-1]
                if not any("torch/utils/data/" in frame.filename for frame in stack):
                    where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stack)
                                  if "site-packages/torch/" not in f.filename), "?")
                    counter.calls[counter.batch][f"{name} at {where}"] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def per_batch(self, batches: int) -> list[int]:
        return [sum(self.calls[b].values()) for b in range(batches)]


def count_syncs(tmp_path, imagefolder, batches: int, *overrides: str) -> tuple[SyncCounter, L.LightningModule]:
    cfg = compose_train(tmp_path, smoke_overrides(
        imagefolder, "test=false", "trainer.val_check_interval=1000", f"trainer.log_every_n_steps={LOG_EVERY}",
        "model.optimizer.fused=true", *overrides,
    ))
    run = build(cfg)
    counter = SyncCounter()
    run.trainer.callbacks.append(counter)
    with counter:
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert counter.batch is None and len(counter.calls) <= batches
    return counter, run.model


def assert_only_at_logging_steps(counter: SyncCounter, batches: int, bound: int) -> None:
    per_batch = counter.per_batch(batches)
    logging = {b for b in range(batches) if (b + 1) % LOG_EVERY == 0}
    elsewhere = {b: dict(counter.calls[b]) for b in range(batches) if b not in logging and per_batch[b]}
    assert not elsewhere, f"host syncs outside the logging steps: {elsewhere}"
    assert all(per_batch[b] <= bound for b in logging), {b: dict(counter.calls[b]) for b in logging}


def test_diffusion_steps_sync_only_at_logging_steps(tmp_path, imagefolder):
    """0 syncs in 3 of 4 steps; at a logging step, Lightning's copy of each logged metric (train/loss,
    lr-AdamW) and the non-finite flags' one read."""
    counter, model = count_syncs(tmp_path, imagefolder, 8, "trainer.max_steps=8")
    assert model.nonfinite.on_device and model.nonfinite.read_every == LOG_EVERY
    assert_only_at_logging_steps(counter, 8, bound=4)


def test_gan_steps_sync_only_at_logging_steps(tmp_path, imagefolder):
    """The same for the GAN's two optimiser steps per batch, with the EMA of its weights."""
    counter, model = count_syncs(tmp_path, imagefolder, 8, "generator=gan", "trainer.max_steps=16",
                                 "model.discriminator_optimizer.fused=true")
    assert model.nonfinite.on_device
    # at a logging step: the 7 logged GAN metrics and the flags' read
    assert_only_at_logging_steps(counter, 8, bound=10)
