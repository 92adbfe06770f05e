"""The LightningModule of adversarial backends: two optimisers, alternating discriminator and generator steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor

from text2img.conditioning import TextConditioner
from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator
from text2img.generators.gan import GANGenerator
from text2img.lightning.module import Text2ImgModule
from text2img.networks.effnet import EfficientNetLite0Features
from text2img.networks.features import RealFeatureCache
from text2img.networks.frozen import ImageFeatureExtractor
from text2img.networks.lit import LiTConfig, LiTEvaluator, load_or_train_lit
from text2img.types import Batch, TextEmbedding
from text2img.utils.lora import LoraSettings


class LiTAlignmentLoss:
    """GALIP-style alignment term: 1 - the mean cosine between the LiT evaluator's image tower on generated
    images and its text tower on their text (differentiable in the images; both towers stay frozen).

    A plain object, not a submodule: a frozen instrument stays out of the model's checkpoints, EMA and optimisers.
    """

    def __init__(self, evaluator: LiTEvaluator, extractor: ImageFeatureExtractor) -> None:
        self.evaluator = evaluator
        self.extractor = extractor

    def __call__(self, images: Tensor, text: TextEmbedding) -> Tensor:
        image_emb = self.evaluator.embed_images(self.extractor((images + 1) / 2))
        text_emb = self.evaluator.embed_text(text)
        return 1 - (image_emb * text_emb).sum(-1).mean()


class AdversarialModule(Text2ImgModule):
    """Trains a GAN backend with Lightning manual optimisation: per batch, one discriminator step, then one
    generator step on the same generated images (DF-GAN's schedule).

    Two optimisers with their own learning rates: `optimizer` for the generator side (generator network,
    fusion head, null embedding) and `discriminator_optimizer` for the discriminator. Lightning counts both
    optimiser steps in `trainer.global_step`, so one batch advances it by 2 (and `trainer.max_steps` counts
    them too). Lightning clips gradients only in automatic optimisation; this module clips each step's
    gradients to `gradient_clip_val` (norm) itself. A non-finite loss stops training with the step and both
    losses, or skips the batch (`nonfinite_loss`, as in `Text2ImgModule`): a non-finite discriminator loss drops
    both of its steps' updates, a non-finite generator loss the generator's (the discriminator's step of that
    batch, already taken, stays). A skipped batch advances `trainer.global_step` by 2 like any other (its
    optimisers step with the update dropped, so that the decision can stay on the device). `alignment_weight` > 0
    adds the GALIP-style `LiTAlignmentLoss` to the generator's loss.
    """

    # what the progress bars show (text2img.callbacks.progress_bar), read only when they draw
    bar_metrics = ("train/d_loss", "train/g_loss")
    nonfinite_advice = (
        "lower the learning rates (model.optimizer.lr, model.discriminator_optimizer.lr), keep "
        "trainer.gradient_clip_val set, or train in trainer.precision=32-true"
    )

    def __init__(
        self,
        fusion: FusionHead,
        generator: Generator,
        conditioner: TextConditioner,
        optimizer: Callable[..., torch.optim.Optimizer],
        discriminator_optimizer: Callable[..., torch.optim.Optimizer],
        eval_seed: int = 1234,
        text_length: int | None = None,
        gradient_clip_val: float | None = None,
        alignment_weight: float = 0.0,
        alignment_seed: int = 1,
        alignment_cache_dir: str = ".cache/eval",
        init_from: str | None = None,
        generator_lora: LoraSettings | None = None,
        nonfinite_loss: str = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        if not isinstance(generator, GANGenerator):
            raise ConfigError(
                f"model=gan trains adversarial generators but got {type(generator).__name__}; use generator=gan, "
                "or model=default for this generator"
            )
        if conditioner.encoder is not None:
            # Both optimisers' losses would backpropagate into the one text forward per batch.
            raise ConfigError(
                f"generator=gan trains with a frozen text encoder, not encoder.mode={conditioner.encoder.mode}; drop "
                "peft=lora and set encoder.mode=frozen"
            )
        if alignment_weight < 0:
            raise ConfigError(f"model.alignment_weight={alignment_weight} is negative; use 0 (off) or more")
        super().__init__(
            fusion, generator, conditioner, optimizer, None, eval_seed, text_length, init_from=init_from,
            generator_lora=generator_lora, nonfinite_loss=nonfinite_loss, max_consecutive_skips=max_consecutive_skips,
        )
        self.automatic_optimization = False
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.gradient_clip_val = gradient_clip_val
        self.alignment_weight = alignment_weight
        self.alignment_seed = alignment_seed
        self.alignment_cache_dir = alignment_cache_dir
        self.alignment: LiTAlignmentLoss | None = None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[generator side, discriminator], in the order `training_step` unpacks them."""
        discriminator = list(self.generator.discriminator.parameters())
        is_discriminator = {id(p) for p in discriminator}
        generator_side = [p for p in self.parameters() if p.requires_grad and id(p) not in is_discriminator]
        return [self.optimizer_factory(generator_side), self.discriminator_optimizer_factory(discriminator)]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.alignment_weight > 0 and self.alignment is None:
            self.alignment = self._alignment_loss()

    def _alignment_loss(self) -> LiTAlignmentLoss:
        source = self.trainer.datamodule.source  # its images and captions
        cache = Path(self.alignment_cache_dir).expanduser()
        extractor = EfficientNetLite0Features().to(self.device)
        # Trained with `alignment_seed`, a different seed from the alignment metric's (metrics.alignment.seed,
        # 0): the generator learns from another text tower than the one that scores it, so training does not
        # directly game the metric. (Both share the locked EfficientNet image side.)
        evaluator = load_or_train_lit(
            source, self.conditioner.reference_encoder, self.conditioner.cache, RealFeatureCache(cache / "features"),
            extractor, cache / "lit", LiTConfig(), self.alignment_seed,
        )
        return LiTAlignmentLoss(evaluator.to(self.device), extractor)

    def _step(self, optimizer: LightningOptimizer, loss: Tensor) -> None:
        """One optimiser step on `loss`; `on_before_optimizer_step` drops the update where `_drop_update` says."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor] | None:
        generator_optimizer, discriminator_optimizer = self.optimizers()
        gan = self.generator
        text = self.conditioner.drop(self.conditioner.encode_captions(batch.captions, batch.caption_draws, True).text)
        # One generated batch serves both steps: detached for the discriminator, through the updated
        # discriminator for the generator (DF-GAN), which saves a generator forward per batch.
        fake = gan.fake(text, self.fusion, gan.training_noise(len(batch), self.device))

        step = self.global_step  # the step a failure is reported at: the discriminator's
        with self.toggled_optimizer(discriminator_optimizer):
            d = gan.discriminator_loss(batch.images, fake.detach(), text)
            # A non-finite discriminator loss drops both steps of the batch; the flags stay on the device
            # (NonFiniteLossPolicy), so both optimisers step, with the update dropped, and a skipped batch counts
            # in trainer.global_step like a kept one.
            self._drop_update = self.nonfinite.flag(self, {"discriminator loss": d.total})
            self._step(discriminator_optimizer, d.total)

        with self.toggled_optimizer(generator_optimizer):
            g_loss = gan.generator_loss(fake, text)
            if self.alignment is not None:
                alignment = self.alignment(fake, text)
                g_loss = g_loss + self.alignment_weight * alignment
                self.log("train/alignment", alignment, batch_size=len(batch))
            losses = {"discriminator loss": d.total, "generator loss": g_loss}
            self._drop_update = self.nonfinite.check(self, losses, batch_idx, step=step)
            self._step(generator_optimizer, g_loss)

        self.log_dict(
            {"train/d_loss": d.total, "train/g_loss": g_loss}, batch_size=len(batch)
        )
        self.log_dict(
            {"train/d_real": d.real, "train/d_fake": d.fake, "train/d_mismatch": d.mismatch,
             "train/gradient_penalty": d.gradient_penalty},
            batch_size=len(batch),
        )
        return {"d_loss": d.total.detach(), "g_loss": g_loss.detach()}
