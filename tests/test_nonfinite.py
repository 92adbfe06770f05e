"""model.nonfinite_loss: a NaN or inf loss stops training naming the step and the losses, or skips the update
(weights and optimiser state untouched, counted, every DDP process agreeing), for both LightningModules; with the
decision on the host (the CPU's default optimisers) and on the device (fused optimisers, the GPU's default)."""

import dataclasses
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch

from conftest import REPO_ROOT, compose_train, smoke_overrides
from text2img.run.compose import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def poison_loss_at(monkeypatch, module: L.LightningModule, steps: set[int]) -> None:
    """The generator's training loss becomes NaN at the given global steps."""
    original = module.generator.training_loss

    def training_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * float("nan") if module.trainer.global_step in steps else loss

    monkeypatch.setattr(module.generator, "training_loss", training_loss)


class WeightsAcrossBatches(L.Callback):
    """The trainable weights and the optimiser's largest step count before and after each batch (counted
    from 0 across epochs)."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []
        self.optimizer_steps: list[tuple[int, int]] = []

    @staticmethod
    def weights(module: L.LightningModule) -> list[torch.Tensor]:
        return [p.detach().clone() for p in module.parameters() if p.requires_grad]

    @staticmethod
    def adam_step(trainer: L.Trainer) -> int:
        states = [s for optimizer in trainer.optimizers for s in optimizer.state.values()]
        return max((int(s["step"]) for s in states), default=0)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(self.weights(module))
        self._step = self.adam_step(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(self.weights(module))
        self.optimizer_steps.append((self._step, self.adam_step(trainer)))

    def changed(self, batch: int) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(self.before[batch], self.after[batch]))


# host: read every step, gradients set to None; device: fused optimisers drop the update with `found_inf`
DECIDED_ON = pytest.mark.parametrize("fused", [False, True], ids=["host", "device"])
FUSED = ("model.optimizer.fused=true",)
FUSED_GAN = ("model.optimizer.fused=true", "model.discriminator_optimizer.fused=true")


def smoke_run(tmp_path, imagefolder, *overrides: str):
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "test=false",
                                                  "trainer.val_check_interval=100", *overrides))
    return build(cfg)


@DECIDED_ON
def test_nan_loss_stops_naming_the_step_and_the_loss(tmp_path, imagefolder, monkeypatch, fused):
    run = smoke_run(tmp_path, imagefolder, *(FUSED if fused else ()))
    poison_loss_at(monkeypatch, run.model, {3})
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 3 \(epoch 0, batch 3\): loss nan; lower "
                                                 r"model\.optimizer\.lr.*\(or set model\.nonfinite_loss=skip to skip such steps\)$"):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 3
    assert run.model.nonfinite.on_device == fused


@DECIDED_ON
def test_skip_leaves_the_weights_of_a_nan_step_and_counts_it(tmp_path, imagefolder, monkeypatch, fused):
    run = smoke_run(tmp_path, imagefolder, "model.nonfinite_loss=skip", "model.optimizer.weight_decay=0.1",
                    *(FUSED if fused else ()))
    poison_loss_at(monkeypatch, run.model, {3})
    probe = WeightsAcrossBatches()
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule)

    assert run.trainer.global_step == 6  # the run finishes; a skipped step still counts
    assert probe.changed(2) and probe.changed(4)
    assert not probe.changed(3)  # no update, not even weight decay
    assert probe.optimizer_steps[3] == (3, 3)  # AdamW's moments and step count untouched
    assert all(torch.isfinite(w).all() for w in probe.after[5])
    assert run.model.nonfinite.skipped_steps == 1
    assert float(run.trainer.callback_metrics["train/skipped_steps"]) == 1


@DECIDED_ON
def test_skip_gives_up_after_too_many_skips_in_a_row(tmp_path, imagefolder, monkeypatch, fused):
    run = smoke_run(tmp_path, imagefolder, "model.nonfinite_loss=skip", "model.max_consecutive_skips=3",
                    *(FUSED if fused else ()))
    poison_loss_at(monkeypatch, run.model, {1, 3, 4, 5})
    with pytest.raises(FloatingPointError, match=r"gave up after 3 skipped steps in a row .*the last a non-finite "
                                                 r"loss at step 5 \(epoch 1, batch 1\): loss nan"):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.model.nonfinite.skipped_steps == 4  # the isolated skip at step 1 did not count towards the limit


def test_on_the_device_a_stop_between_reads_freezes_the_weights_and_names_its_step(tmp_path, imagefolder, monkeypatch):
    """Flags read every 5th batch: the NaN at step 2 halts the updates at once, and the read at the 5th batch
    raises naming step 2, with the weights of before step 2."""
    run = smoke_run(tmp_path, imagefolder, "trainer.log_every_n_steps=5", *FUSED)
    poison_loss_at(monkeypatch, run.model, {2})
    probe = WeightsAcrossBatches()
    run.trainer.callbacks.append(probe)
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 2 \(epoch 0, batch 2\): loss nan; "):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.model.nonfinite.read_every == 5
    assert probe.changed(1) and not probe.changed(2) and not probe.changed(3)  # (step 0's warmed-up lr is 0)
    assert run.trainer.global_step == 4  # raised in the 5th batch's step: batches 2 and 3 stepped, updates dropped


def test_on_the_device_skips_between_reads_are_counted_and_warned_about(tmp_path, imagefolder, monkeypatch, caplog):
    run = smoke_run(tmp_path, imagefolder, "trainer.log_every_n_steps=5", "model.nonfinite_loss=skip", *FUSED)
    poison_loss_at(monkeypatch, run.model, {2, 3})
    probe = WeightsAcrossBatches()
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert probe.changed(1) and not probe.changed(2) and not probe.changed(3) and probe.changed(4)
    assert probe.optimizer_steps[2] == (2, 2) and probe.optimizer_steps[3] == (2, 2)
    assert run.model.nonfinite.skipped_steps == 2
    assert "skipped the updates of 2 batches since the last check, the last a non-finite loss at step 3" in caplog.text


# --- generator=gan: the same policy in manual optimisation ------------------------------------------------


class PoisonDiscriminator(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            module.generator.discriminator.stem.weight.data.fill_(float("nan"))


@DECIDED_ON
def test_gan_stops_naming_the_step_and_both_losses(tmp_path, imagefolder, fused):
    run = smoke_run(tmp_path, imagefolder, "generator=gan", *(FUSED_GAN if fused else ()))
    run.trainer.callbacks.append(PoisonDiscriminator())
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 2 \(epoch 0, batch 1\): discriminator loss nan, "
                                                 r"generator loss nan; lower the learning rates"):
        run.trainer.fit(run.model, datamodule=run.datamodule)


@DECIDED_ON
def test_gan_skips_a_batch_with_a_nan_discriminator_loss(tmp_path, imagefolder, monkeypatch, fused):
    run = smoke_run(tmp_path, imagefolder, "generator=gan", "model.nonfinite_loss=skip", *(FUSED_GAN if fused else ()))
    gan, trainer = run.model.generator, run.trainer
    original = gan.discriminator_loss

    def discriminator_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        poisoned = len(probe.before) == 2  # the second batch
        return dataclasses.replace(loss, total=loss.total * float("nan")) if poisoned else loss

    probe = WeightsAcrossBatches()
    monkeypatch.setattr(gan, "discriminator_loss", discriminator_loss)
    trainer.callbacks.append(probe)
    trainer.fit(run.model, datamodule=run.datamodule)

    assert probe.changed(0) and not probe.changed(1) and probe.changed(2)
    assert probe.optimizer_steps[1] == (1, 1)  # neither optimiser's state moved
    # both optimisers stepped with the update dropped: the skipped batch counts 2 steps like the others
    assert trainer.global_step == 6 and len(probe.after) == 3
    assert run.model.nonfinite.skipped_steps == 1


@pytest.mark.slow
def test_ddp_processes_agree_to_skip_a_nan_on_one_of_them(tmp_path, imagefolder):
    """NaN on rank 1 only at its fourth step: without agreement, rank 0 would step alone (and the ranks' weights
    part) or one rank would wait forever in the gradient all-reduce."""
    script = tmp_path / "train_nan_on_rank1.py"
    script.write_text(textwrap.dedent("""
        import os
        import runpy
        from text2img.generators.diffusion import DiffusionGenerator

        original, calls = DiffusionGenerator.training_loss, []

        def training_loss(self, *args, **kwargs):
            calls.append(1)
            loss = original(self, *args, **kwargs)
            return loss * float("nan") if os.environ.get("LOCAL_RANK") == "1" and len(calls) == 4 else loss

        DiffusionGenerator.training_loss = training_loss
        runpy.run_module("text2img.train", run_name="__main__")  # as `python -m text2img.train`
    """))
    out = subprocess.run(
        [sys.executable, str(script), *smoke_overrides(imagefolder), "trainer=ddp_cpu", "logger=csv", "test=false",
         "model.nonfinite_loss=skip", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "non-finite loss at step 3 (" in out.stderr + out.stdout  # rank 0 reports rank 1's NaN
    assert "finite here, non-finite on another process" in out.stderr + out.stdout
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
