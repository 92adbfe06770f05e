"""The LightningModule shared by every generator backend: its text conditioner, fusion head and generator, and their
optimisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from text2img.conditioning import TextConditioner, upgrade_state_dict
from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator
from text2img.generators.diffusion import DiffusionGenerator
from text2img.lightning.distributed import mean_over_processes
from text2img.lightning.nonfinite import NonFiniteLossPolicy
from text2img.sampling.runtime import ImageEdit, generate_in_chunks, row_generators
from text2img.types import Batch, EvalOutputs, TextEmbedding
from text2img.utils.checkpoints import load_checkpoint
from text2img.utils.lora import LoraSettings, add_lora

# Where a trainable encoder's weights are in the module's state dict.
ENCODER_PREFIX = "conditioner.encoder."


def _upgrade_old_keys(state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: the keys of a checkpoint written before the conditioner, renamed in place."""
    upgraded = upgrade_state_dict(state, prefix)
    if upgraded.keys() != state.keys():
        state.clear()
        state.update(upgraded)


class Text2ImgModule(L.LightningModule):
    """Trains `generator` conditioned by `fusion` on the text embeddings of `conditioner` (`TextConditioner`):
    cached ones of a frozen encoder, or those an encoder that trains (`encoder.mode=lora` or `full`) computes from
    the batch's captions. `prepare_data` and `setup` prepare the conditioner from the data module's captions.

    The conditioner drops captions to its learned null embedding at rate `caption_dropout` so the same model
    also learns the unconditional branch that classifier-free guidance needs at sampling time.
    Validation and test steps generate images for the batch's prompts with a fixed seed, so grids
    and metrics from different steps and runs are comparable; callbacks turn them into grids and FID.

    With a training encoder, the loss is L_image + text_loss_weight * L_text, where L_text is the LLM's own
    next-token loss on the prompts (it keeps a tuned encoder from drifting away from language); the encoder's
    parameters get `encoder_lr` (e.g. 1e-5 for full fine-tuning) instead of the optimizer's learning rate.
    Checkpoints leave out its frozen base weights, which reload from their source.

    `text_length` is the token length the text is padded to whenever images are generated (the encoder's
    `max_length`): with `generate`'s fixed-size chunks, every image is computed at the same tensor shapes, so its
    bits do not depend on its batch. None (a module built in code, a checkpoint older than the option) keeps the
    text's own width, which makes an image depend on its batch's longest prompt by rounding.

    Checkpoints written before the conditioner existed (`null_tokens`, `encoder.*`) load under its names
    (`conditioner.null_tokens`, `conditioner.encoder.*`).

    `init_from` starts the fusion head, generator and null embedding from a trained checkpoint's weights;
    `generator_lora` then freezes the generator and trains peft LoRA adapters of it (with the fusion head and
    null embedding), e.g. to adapt a trained model to new data cheaply.

    A NaN or inf loss stops training (`nonfinite_loss="stop"`) or skips the update (`"skip"`), see
    `NonFiniteLossPolicy`. With gradient accumulation a skipped batch drops its whole accumulated update.
    """

    # what the progress bars show (text2img.callbacks.progress_bar), read only when they draw
    bar_metrics = ("train/loss",)
    nonfinite_advice = (
        "lower model.optimizer.lr, keep trainer.gradient_clip_val set, or train in trainer.precision=32-true"
    )

    def __init__(
        self,
        fusion: FusionHead,
        generator: Generator,
        conditioner: TextConditioner,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        eval_seed: int = 1234,
        text_length: int | None = None,
        text_loss_weight: float = 0.0,
        encoder_lr: float | None = None,
        init_from: str | None = None,
        generator_lora: LoraSettings | None = None,
        nonfinite_loss: str = "stop",
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__()
        self.nonfinite = NonFiniteLossPolicy(nonfinite_loss, max_consecutive_skips, self.nonfinite_advice)
        # Set by a skipped batch; the next optimiser step then drops the accumulated gradients.
        self._drop_update = False
        if text_loss_weight < 0:
            raise ConfigError(f"model.text_loss_weight={text_loss_weight} must be >= 0 (0: no text loss)")
        if not conditioner.trainable and (text_loss_weight > 0 or encoder_lr is not None):
            raise ConfigError(
                "model.text_loss_weight and model.encoder_lr apply to an encoder that trains, but the encoder is "
                "frozen; use peft=lora or encoder.mode=full, or leave them at 0 and null"
            )
        self.text_loss_weight = text_loss_weight
        self.encoder_lr = encoder_lr
        self.fusion = fusion
        self.generator = generator
        # Built (its null embedding drawn, a trainable encoder loaded) after the fusion head and generator.
        self.conditioner = conditioner
        self._register_load_state_dict_pre_hook(_upgrade_old_keys)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.eval_seed = eval_seed
        self.text_length = text_length
        if init_from is not None:
            self.load_initial_weights(init_from)
        if generator_lora is not None:
            add_lora(generator.lora_module(), generator_lora, "model.generator_lora")
        # The resolved run config, stored in checkpoints so sampling and evaluation can rebuild the model.
        self.run_config: dict[str, Any] | None = None
        # Sampler settings for evaluation (guidance_scale, steps); empty = the generator's defaults.
        self.eval_sampling: dict[str, Any] = {}

    def load_initial_weights(self, path: str) -> None:
        """Fusion head, generator and null embedding from a text2img checkpoint (not its encoder's weights)."""
        weights = upgrade_state_dict(load_checkpoint(path)["state_dict"])
        weights = {k: v for k, v in weights.items() if not k.startswith(ENCODER_PREFIX)}
        missing, unexpected = self.load_state_dict(weights, strict=False)
        missing = [key for key in missing if not key.startswith(ENCODER_PREFIX)]
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise ConfigError(
                f"model.init_from='{path}' does not fit this model: {len(missing)} weights missing and {len(unexpected)} "
                f"unexpected (e.g. {example}); start from a checkpoint of the same fusion head and generator config"
            )

    def upgrade_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state dict (or adapter file) written under older names (before the conditioner, the denoisers), under
        today's."""
        state = upgrade_state_dict(state)
        self.generator.upgrade_state_dict(state, "generator.")
        return state

    def prepare_data(self) -> None:
        # once per node, on the device training will use: large language models run much faster on a GPU
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            self.conditioner.prepare(datamodule.caption_sets(), self.trainer.strategy.root_device)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            self.conditioner.setup(datamodule.caption_sets())

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        prompts = self.conditioner.encode_captions(batch.captions, batch.caption_draws, training=True)
        text = self.conditioner.drop(prompts.text)
        loss = self.generator.training_loss(batch.images, text, self.fusion, latents=batch.latents)
        losses = {"loss": loss}
        if self.text_loss_weight > 0:
            self.log("train/image_loss", loss, batch_size=len(batch))
            text_loss = self.conditioner.text_loss(prompts.texts)
            self.log("train/text_loss", text_loss, batch_size=len(batch))
            losses = {"image loss": loss, "text loss": text_loss}
            loss = loss + self.text_loss_weight * text_loss
        # A device flag, no host sync (NonFiniteLossPolicy); with accumulation a skipped batch drops the whole update.
        self._drop_update = self.nonfinite.check(self, losses, batch_idx) | self._drop_update
        # Averaged over processes (one all-reduce, no barrier): the loss of the global batch, the same curve whatever
        # the number of processes. Not on Lightning's progress bar, which copies its metrics to the host every step:
        # our bars read `bar_metrics` when they draw.
        self.log("train/loss", mean_over_processes(loss), batch_size=len(batch))
        # A skipped loss still goes through backward: Lightning refuses a None step under DDP, and every
        # process must take part in the gradient all-reduce. Its update is dropped at the optimiser step.
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A skipped batch's update is dropped exactly (no step, no weight decay, no change of the moments), on the
        # device or by setting the gradients to None; every process agrees (see NonFiniteLossPolicy).
        self.nonfinite.apply(optimizer, self._drop_update)
        self._drop_update = False

    def on_train_end(self) -> None:
        self.nonfinite.finish(self)  # the last read of the non-finite flags: raises if training halted since

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
        sampler: str | None = None,
    ) -> Tensor:
        """Images in [0, 1] for the given text; image i depends only on its text, `seeds[i]` and its edit input,
        bit for bit: the text is padded to `text_length` and images are generated in chunks of the fixed size
        `text2img.sampling.runtime.GENERATION_CHUNK` (the exported pipeline does the same).

        `edit` turns sampling into text-guided editing of given images (diffusion backends only); `sampler` names
        one of `generator.sampler_names()` (None: the generator's own).
        """
        if len(seeds) != len(text):
            raise ValueError(f"got {len(seeds)} seeds for {len(text)} prompts; give one seed per prompt")
        if edit is not None:
            if not isinstance(self.generator, DiffusionGenerator):
                raise ConfigError(
                    f"{type(self.generator).__name__} cannot edit images (only diffusion backends denoise from a "
                    "noised input); drop init_image, mask and strength, or use a diffusion checkpoint"
                )
            self.generator.check_edit(edit, len(text))  # here, so a message gives the caller's shapes, not a chunk's
        if self.text_length is not None:
            text = text.padded_to(self.text_length)
        sampling = {"guidance_scale": guidance_scale, "steps": steps, "sampler": sampler}

        def generate_chunk(rows: list[int]) -> Tensor:
            null = self.conditioner.unconditional(len(rows))
            chunk = (text[rows], null, self.fusion, row_generators([seeds[row] for row in rows]))
            if edit is None:
                return self.generator.sample(*chunk, **sampling)
            return self.generator.sample(*chunk, **sampling, edit=edit.rows(rows))

        return (generate_in_chunks(len(text), generate_chunk).float() + 1) / 2

    def _eval_step(self, batch: Batch) -> EvalOutputs:
        # The seed of a sample is fixed by its position in the evaluation set: the same images at every
        # validation, whatever the batch size and the number of processes.
        if batch.keys is None:
            raise RuntimeError("evaluation batches must carry keys; the data module attaches them")
        text = self.conditioner.encode_captions(batch.captions).text
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
        params: list[Any] = [p for p in self.parameters() if p.requires_grad]
        encoder = self.conditioner.encoder
        if encoder is not None and self.encoder_lr is not None:
            in_encoder = {id(p) for p in encoder.parameters()}
            params = [
                {"params": [p for p in params if id(p) not in in_encoder]},
                {"params": [p for p in params if id(p) in in_encoder], "lr": self.encoder_lr},
            ]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.lr_scheduler_factory(optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def frozen_encoder_keys(self) -> list[str]:
        """State-dict entries of the encoder's frozen base: reloaded from its source, never saved."""
        return self._frozen_keys({ENCODER_PREFIX: self.conditioner.encoder})

    def frozen_pretrained_keys(self) -> list[str]:
        """State-dict entries that reload from their source when the model is built, so checkpoints leave them out:
        the encoder's frozen base, a pretrained denoiser's frozen weights (`generator.denoiser.source`) and a
        pretrained first stage (`generator.first_stage.source`: e.g. Stable Diffusion's VAE, 84M parameters)."""
        denoiser = getattr(self.generator, "denoiser", None)
        first_stage = getattr(self.generator, "first_stage", None)
        return self._frozen_keys({
            ENCODER_PREFIX: self.conditioner.encoder,
            "generator.denoiser.": denoiser if denoiser is not None and denoiser.source is not None else None,
            "generator.first_stage.": first_stage if first_stage is not None and first_stage.reloads else None,
        })

    def _frozen_keys(self, modules: dict[str, nn.Module | None]) -> list[str]:
        """The state-dict entries under each prefix of `modules` (where its module sits; None: none) that are not
        trained parameters, in one pass over the state dict."""
        prefixes = tuple(prefix for prefix, module in modules.items() if module is not None)
        if not prefixes:
            return []
        trained = {prefix + name for prefix in prefixes for name, p in modules[prefix].named_parameters()
                   if p.requires_grad}
        return [key for key in self.state_dict() if key.startswith(prefixes) and key not in trained]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["text2img_config"] = self.run_config
        frozen = self.frozen_pretrained_keys()
        for state in ("state_dict", "current_model_state"):  # the EMA callback keeps the raw weights in the second
            for key in frozen:
                checkpoint.get(state, {}).pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()
        frozen = {key: own[key] for key in self.frozen_pretrained_keys()}
        for state in ("state_dict", "current_model_state"):
            if state in checkpoint:
                checkpoint[state] = upgrade_state_dict(checkpoint[state])
                checkpoint[state].update(frozen)
