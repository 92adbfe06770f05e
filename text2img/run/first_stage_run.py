"""Latent diffusion's first stage, trained by a nested `text2img.train` run when a config gives none.

A config with `generator.first_stage.source: null` and a `first_stage_run` entry (the preset
`experiment=openmoji_ldm` has one) gets its first stage from the run

    python -m text2img.train <first_stage_run.overrides> [debug=<the outer run's debug mode>]

made once and kept in `<first_stage_run.cache_dir>/<hash of the run's resolved config>/`: later runs, and
sweep jobs or DDP ranks that start together, reuse its `checkpoints/last.ckpt` (a file lock makes one of
them train, the others wait). The nested run is a separate process, so it has its own Hydra run and
frees its memory before latent diffusion starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from text2img.utils.paths import CONF_DIR
from text2img.errors import ConfigError
from text2img.utils.files import build_once

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "last.ckpt"


def ensure_first_stage(cfg: DictConfig) -> None:
    """Set `generator.first_stage.source` to a trained first stage when the config leaves it null."""
    first_stage = cfg.generator.get("first_stage")
    if first_stage is None or "source" not in first_stage or first_stage.source is not None:
        return  # not latent diffusion, a first stage given, or one fitted to the data (patch_pca)
    run = cfg.get("first_stage_run")
    if run is None:
        raise ConfigError(
            "generator.first_stage.source is not set: give a text2img checkpoint of generator=vae "
            "generator.conditional=false, a diffusers AutoencoderKL folder or a hub name, or use "
            "experiment=openmoji_ldm, which trains one first"
        )
    overrides = list(run.overrides)
    debug = HydraConfig.get().runtime.choices.get("debug") if HydraConfig.initialized() else None
    if debug is not None:
        overrides.append(f"debug={debug}")  # a smoke run's first stage is a smoke run too, not minutes of training
    first_stage.source = str(trained_first_stage(overrides, Path(run.cache_dir), cfg.paths.cache_dir))


def compose_train_config(overrides: list[str]) -> DictConfig:
    """The config `python -m text2img.train <overrides>` would run, without its Hydra node."""
    if GlobalHydra.instance().is_initialized():  # inside a @hydra.main app: use its config search path
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def config_digest(overrides: list[str]) -> str:
    """A hash of the resolved config of the run `overrides` describe, without what does not change its
    weights: where it writes (`paths`) and how it is logged (`logger`)."""
    cfg = compose_train_config(overrides)
    with open_dict(cfg):
        for key in list(cfg.paths):
            cfg.paths[key] = f"<{key}>"  # also avoids resolving ${hydra:...} outside a Hydra run
        cfg.pop("logger", None)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def trained_first_stage(overrides: list[str], cache_dir: Path, shared_cache_dir: str) -> Path:
    """The checkpoint of the run `overrides` describe: trained on the first call, reused afterwards.

    `shared_cache_dir` is the outer run's `paths.cache_dir`, given to the nested run so that both share
    rendered data, text embeddings and evaluators.
    """
    folder = cache_dir.expanduser() / config_digest(overrides)
    command = " ".join(overrides)
    if folder.exists():
        log.info("first stage: reusing %s (python -m text2img.train %s)", folder / CHECKPOINT, command)
        return folder / CHECKPOINT

    def train_to(run_dir: Path) -> None:
        log.info("first stage: training it with python -m text2img.train %s (in %s)", command, folder)
        start = time.perf_counter()
        args = [*overrides, f"hydra.run.dir='{run_dir}'", f"paths.cache_dir='{shared_cache_dir}'"]
        returncode = run_relayed([sys.executable, "-m", "text2img.train", *args], prefix="first stage |")
        if returncode != 0:
            raise ConfigError(
                f"the first-stage run (python -m text2img.train {command}) failed with exit code {returncode}; "
                "its output is above; fix it or set generator.first_stage.source"
            )
        if not (run_dir / CHECKPOINT).is_file():
            raise ConfigError(f"the first-stage run ({command}) wrote no {CHECKPOINT}; let it train and validate")
        log.info("first stage: trained in %.0f s", time.perf_counter() - start)

    build_once(folder, train_to)
    return folder / CHECKPOINT


# A line of Hydra's default console format: [time][logger][LEVEL] - message
HYDRA_LOG_LINE = re.compile(r"^\[[^]]*\]\[[^]]*\]\[(?P<level>[A-Z]+)\] - (?P<message>.*)$")


def run_relayed(command: list[str], prefix: str) -> int:
    """Run `command` and log each line of its output (stdout and stderr) as `<prefix> <line>`, at the level it was
    logged with; returns its exit code.

    So a nested run's progress reaches this run's console and log file (`train.log`), marked as the nested run's.
    Its output is a pipe, so it reports progress as periodic log lines rather than a live bar; of a line redrawn
    with carriage returns (a tqdm bar), only the last state is kept.
    """
    levels = logging.getLevelNamesMapping()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line as it is written, not a block at a time
    # Bytes, not text mode: text mode would turn each carriage return into a line of its own.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment) as child:
        assert child.stdout is not None
        for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip().rpartition("\r")[2]
            if not line:
                continue
            match = HYDRA_LOG_LINE.match(line)
            if match:
                log.log(levels.get(match["level"], logging.INFO), "%s %s", prefix, match["message"])
            else:
                log.info("%s %s", prefix, line)
    return child.returncode
