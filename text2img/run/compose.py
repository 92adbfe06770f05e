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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

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


def build_model(cfg: DictConfig) -> tuple[Text2ImgDataModule, Text2ImgModule]:
    """Data and model of a run config (also used to rebuild a checkpoint's model for evaluation)."""
    encoder = instantiate(cfg.encoder)
    expander = instantiate(cfg.prompt_expansion) if cfg.get("prompt_expansion") else None
    # An encoder that trains is evaluated against its frozen base (the alignment metrics' text side).
    reference = None
    if encoder.trainable:
        reference = instantiate(cfg.encoder, mode="frozen", lora=None, gradient_checkpointing=False)
    datamodule = instantiate(cfg.data, encoder=encoder, expander=expander, reference_encoder=reference)
    generator = instantiate(cfg.generator)
    names = _choice(cfg, "fusion"), _choice(cfg, "generator")
    fusion = build_fusion(cfg.fusion, generator, *names)
    if isinstance(generator, LatentDiffusionGenerator) and generator.cache_latents:
        datamodule.cache_latents(generator.first_stage, f"{cfg.paths.cache_dir}/latents")
    # An encoder that trains is part of the model; a frozen one only fills the data module's embedding cache.
    model = instantiate(cfg.model, fusion=fusion, generator=generator, encoder=encoder if encoder.trainable else None)
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
    datamodule, model = build_model(run_cfg)
    model.on_load_checkpoint(checkpoint)  # as Lightning does: restores what the checkpoint leaves out
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint, datamodule, model
