"""Training entry point: `python -m text2img.train [group=option ...] [key=value ...]`."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from text2img.lightning.tracking import finish_wandb_run
from text2img.run.command_line import run_checked
from text2img.run.compose import RUN_ERRORS, Run, build, one_line_errors
from text2img.run.config_checks import check_config
from text2img.run.sweeps import JobResult, SweepJob, finished_result, ranks_stay_in_job, write_result
from text2img.utils.paths import CONF_DIR

log = logging.getLogger(__name__)


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
