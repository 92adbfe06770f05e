"""Evaluation entry point: `python -m text2img.evaluate ckpt=PATH [n_samples=N] [split=test] [extractor=...]`.

Rebuilds the checkpoint's model from the run config stored inside it, generates `n_samples` images
for the prompts of a held-out split through a Lightning test loop (so `trainer=ddp_cpu` or a GPU
trainer spreads the work), scores them with the configured metrics, prints a table and writes a JSON
report next to the checkpoint's run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from text2img.callbacks.evaluation import Evaluation
from text2img.run.command_line import run_checked
from text2img.utils.paths import CONF_DIR
from text2img.utils.checkpoints import run_folder
from text2img.run.compose import load_model
from text2img.run.config_checks import GUIDANCE, NULL, SIZE, check_rules, integer, one_of
from text2img.errors import ConfigError
from text2img.run.compose import RUN_ERRORS, one_line_errors

log = logging.getLogger(__name__)

RULES = (
    ("n_samples", SIZE | NULL), ("split", one_of("test", "val")), ("seed", integer(0)), ("batch_size", SIZE),
    ("guidance_scale", GUIDANCE | NULL), ("steps", SIZE | NULL),
)


def report_path(cfg: DictConfig, n_samples: int) -> Path:
    """`<run>/eval/...json` for checkpoints in a run's `checkpoints/` folder, else beside the checkpoint."""
    if cfg.out:
        return Path(cfg.out).expanduser()
    stem = Path(cfg.ckpt).stem
    return run_folder(cfg.ckpt) / "eval" / f"{cfg.split}-{stem}-n{n_samples}-seed{cfg.seed}-{extractor_name(cfg)}.json"


def extractor_name(cfg: DictConfig) -> str:
    """The `extractor=` option chosen (the class name when composed outside the command line)."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("extractor"))
    return str(cfg.extractor._target_).rsplit(".", 1)[-1]


def format_table(figures: dict[str, float]) -> str:
    width = max(len(name) for name in figures)
    return "\n".join(f"{name:<{width}}  {value:.6g}" for name, value in figures.items())


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Generate, score and report; returns the report written as JSON."""
    with one_line_errors():
        check_rules({key: cfg[key] for key, _ in RULES}, RULES)
        if cfg.out and Path(cfg.out).expanduser().is_dir():
            raise ConfigError(f"out='{cfg.out}' is a folder; pass the path of the JSON report, e.g. out=report.json")
        data = {"eval_samples": cfg.n_samples, "test_split": cfg.split, "eval_batch_size": cfg.batch_size}
        checkpoint, datamodule, model = load_model(cfg.ckpt, data)
        metrics = instantiate(cfg.metrics)
    model.eval_seed = cfg.seed
    model.eval_sampling = {
        name: cfg[name] for name in ("guidance_scale", "steps") if cfg[name] is not None
    }
    evaluation = Evaluation(metrics, cache_dir=f"{cfg.paths.cache_dir}/eval")
    trainer = instantiate(cfg.trainer, callbacks=[evaluation], logger=False, enable_checkpointing=False)
    start = time.perf_counter()
    with one_line_errors(RUN_ERRORS):  # the split's images are read here: a bad one (DataError) surfaces now
        trainer.test(model, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - start
    n_samples = len(datamodule.test_set)
    if n_samples == 0:  # the data module warned why
        other = "val" if cfg.split == "test" else "test"
        raise SystemExit(
            f"text2img: error: split={cfg.split}: the checkpoint's {cfg.split} split has "
            f"{len(datamodule.splits[cfg.split].images)} image(s), too few to evaluate (FID and KID need 2); try "
            f"split={other}, or train on data with a larger data.source.{cfg.split}_fraction"
        )
    report = {
        "checkpoint": str(Path(cfg.ckpt).expanduser().absolute()),
        "step": checkpoint.get("global_step"),
        "split": cfg.split,
        "n_samples": n_samples,
        "seed": cfg.seed,
        "extractor": extractor_name(cfg),
        "sampling": model.eval_sampling,
        "seconds": round(seconds, 2),
        "metrics": evaluation.results.get("test", {}),
    }
    if trainer.is_global_zero:
        path = report_path(cfg, n_samples)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{format_table(report['metrics'])}\n({n_samples} images of {cfg.split} in {seconds:.1f} s) -> {path}")
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    run_checked(hydra_main)


if __name__ == "__main__":
    main()
