"""Training entry point: `python -m text2img.train [group=option ...] [key=value ...]`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from text2img.cli import CONF_DIR, run_checked
from text2img.config_checks import check_config
from text2img.errors import ConfigError, DataError, message_of, root_cause
from text2img.first_stage_run import ensure_first_stage
from text2img.fusion import build_fusion
from text2img.generators import LatentDiffusionGenerator
from text2img.lightning import Text2ImgDataModule, Text2ImgModule
from text2img.sweeps import JobResult, SweepJob, finished_result, ranks_stay_in_job, write_result
from text2img.tracking import finish_wandb_run

log = logging.getLogger(__name__)

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


def _report(run: Run, cfg: DictConfig) -> None:
    """Tell the user where the run's products are."""
    trainer = run.trainer
    lines = [f"run folder: {cfg.paths.output_dir}"]
    for checkpoint in trainer.checkpoint_callbacks:
        if checkpoint.last_model_path:
            lines.append(f"checkpoint: {checkpoint.last_model_path}")
        if checkpoint.monitor and checkpoint.best_model_path:
            score = float(checkpoint.best_model_score)
            lines.append(f"best checkpoint: {checkpoint.best_model_path} ({checkpoint.monitor} {score:.2f})")
    grids = [cb.last_path for cb in trainer.callbacks if getattr(cb, "last_path", None)]
    lines += [f"sample grid: {path}" for path in grids]
    for name, value in sorted(trainer.callback_metrics.items()):
        if name.startswith(("val/", "test/")):
            lines.append(f"{name}: {float(value):.4g}")
    for logger in trainer.loggers:
        if logger.log_dir:
            lines.append(f"{type(logger).__name__}: {logger.log_dir}")
    print("\n".join(lines))


def train(cfg: DictConfig) -> float | None:
    """Train (and test) the configured model; returns `cfg.optimized_metric` for sweepers.

    In a multirun, a job that already finished in this sweep folder returns its stored value without
    training, and one that was interrupted resumes from its last checkpoint.
    """
    job = SweepJob.current()
    if job is not None:
        if (previous := finished_result(job)) is not None:
            log.info("sweep job %d already finished in %s; skipping it (%s=%s)", job.num, job.folder,
                     previous.optimized_metric, previous.value)
            return previous.value
        if cfg.get("ckpt_path") is None and job.last_checkpoint.exists():
            log.info("sweep job %d resumes from %s", job.num, job.last_checkpoint)
            cfg.ckpt_path = str(job.last_checkpoint)
    try:
        with ranks_stay_in_job(job):
            value = _fit_and_test(cfg)
    finally:
        finish_wandb_run()  # Lightning's WandbLogger never ends its run: the next job would log into it
    if job is not None and rank_zero_only.rank == 0:
        write_result(job, JobResult(job.overrides, cfg.optimized_metric, value))
    return value


def _fit_and_test(cfg: DictConfig) -> float | None:
    with one_line_errors():
        check_config(cfg)  # every value the user can type, before the first stage, the data or a model is built
        L.seed_everything(cfg.seed, workers=True)
        run = build(cfg)
    for logger in run.trainer.loggers:
        logger.log_hyperparams(run.model.run_config)
    # data are read as the fit and the test run: a bad sample or shard (DataError) surfaces only there
    with one_line_errors(RUN_ERRORS):
        run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
        # read before testing: `trainer.test` replaces the callback metrics
        value = run.trainer.callback_metrics.get(cfg.optimized_metric)
        if cfg.get("test"):
            run.trainer.test(run.model, datamodule=run.datamodule)
    if run.trainer.is_global_zero:
        _report(run, cfg)
    return None if value is None else float(value)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    return train(cfg)


def main() -> None:
    run_checked(hydra_main)


if __name__ == "__main__":
    main()
