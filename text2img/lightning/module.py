"""The LightningModule shared by every generator backend: text side, caption dropout, optimisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator
from text2img.generators.diffusion import DiffusionGenerator, ImageEdit
from text2img.types import Batch, EvalOutputs, TextEmbedding


class Text2ImgModule(L.LightningModule):
    """Trains `generator` conditioned by `fusion` on cached text embeddings.

    Captions are dropped to a learned null embedding at rate `caption_dropout` so the same model
    also learns the unconditional branch that classifier-free guidance needs at sampling time.
    Validation and test steps generate images for the batch's prompts with a fixed seed, so grids
    and metrics from different steps and runs are comparable; callbacks turn them into grids and FID.
    """

    def __init__(
        self,
        fusion: FusionHead,
        generator: Generator,
        text_dim: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        caption_dropout: float = 0.1,
        eval_seed: int = 1234,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"model.caption_dropout={caption_dropout} must be in [0, 1)")
        self.fusion = fusion
        self.generator = generator
        self.null_tokens = nn.Parameter(torch.randn(1, text_dim) * 0.02)
        self.null_pooled = nn.Parameter(torch.randn(text_dim) * 0.02)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.caption_dropout = caption_dropout
        self.eval_seed = eval_seed
        # The resolved run config, stored in checkpoints so sampling and evaluation can rebuild the model.
        self.run_config: dict[str, Any] | None = None
        # Sampler settings for evaluation (guidance_scale, steps); empty = the generator's defaults.
        self.eval_sampling: dict[str, Any] = {}

    def null_text(self, batch_size: int) -> TextEmbedding:
        """The learned unconditional embedding: one token, always attended."""
        device = self.null_tokens.device
        return TextEmbedding(
            tokens=self.null_tokens.expand(batch_size, 1, -1),
            mask=torch.ones(batch_size, 1, dtype=torch.bool, device=device),
            pooled=self.null_pooled.expand(batch_size, -1),
        )

    def drop_captions(self, text: TextEmbedding) -> TextEmbedding:
        """Replace a random `caption_dropout` fraction of the rows by the null embedding."""
        if self.caption_dropout == 0.0:
            return text
        batch, length, _ = text.tokens.shape
        drop = torch.rand(batch, device=text.tokens.device) < self.caption_dropout
        null_tokens = torch.zeros_like(text.tokens)
        null_tokens[:, 0] = self.null_tokens.to(text.tokens.dtype)
        null_mask = torch.zeros_like(text.mask)
        null_mask[:, 0] = True
        return TextEmbedding(
            tokens=torch.where(drop[:, None, None], null_tokens, text.tokens),
            mask=torch.where(drop[:, None], null_mask, text.mask),
            pooled=torch.where(drop[:, None], self.null_pooled.to(text.pooled.dtype).expand_as(text.pooled), text.pooled),
        )

    def text_of(self, batch: Batch) -> TextEmbedding:
        if batch.text is None:
            raise RuntimeError("the batch carries no text embeddings; the data module must attach cached embeddings")
        return batch.text

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        text = self.drop_captions(self.text_of(batch))
        loss = self.generator.training_loss(batch.images, text, self.fusion, latents=batch.latents)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "calibration_images"):
            self.generator.calibrate(datamodule.calibration_images().to(self.device))

    @torch.no_grad()
    def generate(
        self,
        text: TextEmbedding,
        seeds: Sequence[int],
        guidance_scale: float | None = None,
        steps: int | None = None,
        edit: ImageEdit | None = None,
    ) -> Tensor:
        """Images in [0, 1] for the given text; image i depends only on its text, `seeds[i]` and its edit input.

        `edit` turns sampling into text-guided editing of given images (diffusion backends only).
        """
        if len(seeds) != len(text):
            raise ValueError(f"got {len(seeds)} seeds for {len(text)} prompts; give one seed per prompt")
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        null_text = self.null_text(len(text))
        sampling = {"guidance_scale": guidance_scale, "steps": steps}
        if edit is None:
            images = self.generator.sample(text, null_text, self.fusion, generators, **sampling)
        elif isinstance(self.generator, DiffusionGenerator):
            images = self.generator.sample(text, null_text, self.fusion, generators, **sampling, edit=edit)
        else:
            raise ConfigError(
                f"{type(self.generator).__name__} cannot edit images (only diffusion backends denoise from a "
                "noised input); drop init_image, mask and strength, or use a diffusion checkpoint"
            )
        return (images.float() + 1) / 2

    def _eval_step(self, batch: Batch) -> EvalOutputs:
        # The seed of a sample is fixed by its position in the evaluation set: the same images at every
        # validation, whatever the batch size and the number of processes.
        if batch.keys is None:
            raise RuntimeError("evaluation batches must carry keys; the data module attaches them")
        text = self.text_of(batch)
        reconstructions = None
        if self.generator.reconstructs:
            reconstructions = (self.generator.reconstruct(batch.images, text, self.fusion).float() + 1) / 2
        return EvalOutputs(
            images=self.generate(text, (self.eval_seed + batch.keys).tolist(), **self.eval_sampling),
            real=(batch.images.float() + 1) / 2,
            captions=batch.captions,
            text=text,
            keys=batch.keys,
            reconstructions=reconstructions,
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> EvalOutputs:
        return self._eval_step(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> EvalOutputs:
        return self._eval_step(batch)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.lr_scheduler_factory(optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["text2img_config"] = self.run_config
