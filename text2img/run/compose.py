"""The composition root: a run's objects built from its config, a trained model rebuilt from its checkpoint, and
the one-line exit for the user's mistakes. The entry points (`text2img.train`, `sample`, `evaluate`, `export`)
start here; nothing below them builds a run another way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from text2img.conditioning import TextConditioner, caption_draws
from text2img.errors import ConfigError, DataError, message_of, root_cause
from text2img.generators import LatentDiffusionGenerator, build_fusion
from text2img.lightning import Text2ImgDataModule, Text2ImgModule
from text2img.run.first_stage_run import ensure_first_stage
from text2img.utils.checkpoints import load_checkpoint

# Errors that mean "the user's config or data is wrong", reported as one line: while the run is built, any
# ValueError or FileNotFoundError (constructors check their arguments); once training or testing runs, only text2img's
# own, raised on purpose (a ValueError from deep inside a fit is more likely a bug, which keeps its traceback).
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError)
RUN_ERRORS = (ConfigError, DataError)


@dataclass
class Run:
    """Everything `train` builds from a config."""

    datamodule: Text2ImgDataModule
    model: Text2ImgModule
    trainer: L.Trainer


def _choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for a config group (e.g. "token_projection"), for error messages."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group, cfg[group]._target_))
    return str(cfg[group]._target_)


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-objects group (callbacks, loggers), skipping nulls."""
    return [instantiate(item) for item in (group or {}).values() if item is not None]


def _without(node: DictConfig, *keys: str) -> tuple[DictConfig, dict[str, Any]]:
    """A copy of a config node (its interpolations still resolve) without `keys`, and those keys' values."""
    rest = node.copy()
    with open_dict(rest):
        return rest, {key: rest.pop(key) for key in keys if key in rest}


# Keys of the `data` and `model` groups that configure the text side (the model's `TextConditioner`).
TEXT_DATA_KEYS = ("embedding_cache_dir", "caption_augment")
TEXT_MODEL_KEYS = ("text_dim", "caption_dropout")


def build_data(cfg: DictConfig, caption_draws: int = 1) -> Text2ImgDataModule:
    """The data module of a run config: its `data` group less the text side's keys; `caption_draws`: see
    `TextConditioner.caption_draws` (1: training items draw nothing)."""
    return instantiate(_without(cfg.data, *TEXT_DATA_KEYS)[0], caption_draws=caption_draws)


def build_model(cfg: DictConfig, fit_first_stage: bool = True) -> tuple[Text2ImgDataModule, Text2ImgModule]:
    """Data and model of a run config (also used to rebuild a checkpoint's model for evaluation).

    A patch-code first stage is fitted to the training images and its latents cached, unless `fit_first_stage` is
    false: a checkpoint's weights are about to replace the fit (its refiner takes seconds to train), and a loaded
    model does not train.

    The text side's keys stay where users set them (`encoder`, `prompt_expansion`, `data.caption_augment`,
    `data.embedding_cache_dir`, `model.caption_dropout`, `model.text_dim`): they build the model's
    `TextConditioner`, not the data module. Objects are built in the order runs always had (encoders, data,
    generator, fusion head, then the null embedding), so that their random inits are the same."""
    text_data = {key: cfg.data.get(key) for key in TEXT_DATA_KEYS}
    model_cfg, text_model = _without(cfg.model, *TEXT_MODEL_KEYS)
    encoder = instantiate(cfg.encoder)
    expander = instantiate(cfg.prompt_expansion) if cfg.get("prompt_expansion") else None
    # An encoder that trains is evaluated against its frozen base (the alignment metrics' text side).
    reference = None
    if encoder.trainable:
        reference = instantiate(cfg.encoder, mode="frozen", lora=None, gradient_checkpointing=False)
    streamed = getattr(get_class(cfg.data._target_), "streams_training_captions", False)
    if streamed and expander is not None and expander.enabled_for(training=True):
        raise ConfigError(
            "data=webdataset streams its training captions, which prompt expansion would rewrite with a "
            "language model at every step; set prompt_expansion.train=false"
        )
    augment = instantiate(text_data.get("caption_augment"))
    datamodule = build_data(cfg, caption_draws(augment, streamed or encoder.trainable))
    generator = instantiate(cfg.generator)
    names = _choice(cfg, "fusion"), _choice(cfg, "generator")
    fusion = build_fusion(cfg.fusion, generator, *names)
    if isinstance(generator, LatentDiffusionGenerator) and fit_first_stage:
        generator.first_stage.fit_to(datamodule.source)  # a patch code, fitted before its latents are cached
        if generator.cache_latents:
            datamodule.cache_latents(generator.first_stage, f"{cfg.paths.cache_dir}/latents")
    conditioner = TextConditioner(
        encoder, text_data["embedding_cache_dir"], text_model.get("text_dim"), expander, augment, reference,
        caption_dropout=text_model.get("caption_dropout", 0.1),
        next_token_loss=model_cfg.get("text_loss_weight", 0.0) > 0, augment_on_the_fly=streamed,
    )
    model = instantiate(model_cfg, fusion=fusion, generator=generator, conditioner=conditioner)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    return datamodule, model


def user_error(exc: BaseException, errors: tuple[type[Exception], ...] = USER_ERRORS) -> SystemExit | None:
    """A one-line exit for mistakes in the user's config, data or arguments (`errors`); None for bugs."""
    cause = root_cause(exc)  # Hydra wraps constructor errors
    return SystemExit(f"text2img: error: {message_of(cause)}") if isinstance(cause, errors) else None


@contextmanager
def one_line_errors(errors: tuple[type[Exception], ...] = USER_ERRORS) -> Iterator[None]:
    """Inside, the user's mistakes (`errors`) end the program with one line; anything else keeps its traceback."""
    try:
        yield
    except Exception as exc:
        if (error := user_error(exc, errors)) is not None:
            raise error from exc
        raise


def trainer_clip_value(model: L.LightningModule, configured: float | None) -> float | None:
    """The Trainer's gradient_clip_val: Lightning refuses one with manual optimisation (model=gan), whose
    module clips with the configured value itself."""
    return configured if model.automatic_optimization else None


def build(cfg: DictConfig) -> Run:
    """Build data, model and trainer; every user mistake surfaces here, before any training."""
    ensure_first_stage(cfg)  # latent diffusion without a first stage: train one first (a nested run)
    datamodule, model = build_model(cfg)
    trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=_instantiate_all(cfg.get("logger")),
        gradient_clip_val=trainer_clip_value(model, cfg.trainer.gradient_clip_val),
    )
    return Run(datamodule, model, trainer)


def load_model(
    path: str, data: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Text2ImgDataModule, Text2ImgModule]:
    """The checkpoint, and its run's data module and model with the saved (EMA) weights loaded.

    The model is rebuilt from the run config stored in the checkpoint; `data` overrides entries of its
    `data` config (e.g. which split to evaluate).
    """
    checkpoint = load_checkpoint(path)
    run_cfg = OmegaConf.create(checkpoint["text2img_config"])
    with open_dict(run_cfg):
        for key, value in (data or {}).items():
            run_cfg.data[key] = value
        run_cfg.model.init_from = None  # the checkpoint holds every weight the run started from
    try:
        datamodule, model = build_model(run_cfg, fit_first_stage=False)
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            raise ConfigError(
                f"{path} was trained with an option this text2img no longer has ({cause}); load it with the "
                f"text2img version that trained it, or train it again"
            ) from exc
        raise
    model.on_load_checkpoint(checkpoint)  # as Lightning does: restores what the checkpoint leaves out
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint, datamodule, model
