"""Pretrained diffusers networks (a Stable Diffusion-class pipeline's unet/, transformer/, scheduler/) as parts of a
text2img generator: their configs read before any weights load, and their weights, each with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from diffusers import DDPMScheduler, ModelMixin

from text2img.errors import ConfigError
from text2img.utils.files import names_a_path

USAGE = "give a diffusers pipeline folder (unet/ or transformer/, vae/, scheduler/) written by save_pretrained, or a hub name"
# Config file names: models keep config.json, schedulers scheduler_config.json.
CONFIG_FILES = ("config.json", "scheduler_config.json")

Network = TypeVar("Network", bound=ModelMixin)


def pretrained_config(source: str, subfolder: str | None = None, key: str | None = "generator.denoiser") -> dict[str, Any]:
    """The diffusers config (config.json or scheduler_config.json) of `source`/`subfolder`, a local folder or a hub
    repository, without loading weights. `key` is the config node that names `source`, for messages."""
    where = f"{source}/{subfolder}" if subfolder else source
    named = f"{key}.source: '{where}'" if key else f"the pretrained folder '{where}'"
    if names_a_path(source):
        folder = Path(source).expanduser() / (subfolder or "")
        if not folder.is_dir():
            raise ConfigError(f"{named} is not a folder; {USAGE}")
        for name in CONFIG_FILES:
            if (folder / name).is_file():
                return json.loads((folder / name).read_text())
        hint = " (a pipeline folder: set the subfolder, e.g. unet)" if (folder / "model_index.json").is_file() else ""
        raise ConfigError(f"{named} holds no diffusers config.json{hint}; {USAGE}")
    from huggingface_hub import hf_hub_download  # hub names only

    for name in CONFIG_FILES:
        try:
            path = hf_hub_download(source, name, subfolder=subfolder)
        except (OSError, ValueError):  # the hub's not-found, offline and bad-name errors: the next name, then one line
            continue
        return json.loads(Path(path).read_text())
    raise ConfigError(
        f"{named} is no local folder and its config cannot be fetched from the hub (offline, or no such "
        f"repository); {USAGE}"
    )


def config_value(source: str, subfolder: str | None, name: str) -> Any:
    """One entry of `pretrained_config` (for `${diffusers_config:...}`): the model's cross_attention_dim, the VAE's
    scaling_factor, the scheduler's prediction_type..."""
    config = pretrained_config(source, subfolder, key=None)
    if name not in config:
        where = f"{source}/{subfolder}" if subfolder else source
        raise ConfigError(f"the diffusers config of '{where}' has no '{name}'; set the value that reads it by hand")
    return config[name]


def load_network(cls: type[Network], source: str, subfolder: str | None, key: str = "generator.denoiser") -> Network:
    """`cls.from_pretrained(source, subfolder=...)` after checking that the folder holds a `cls`."""
    kind = pretrained_config(source, subfolder, key).get("_class_name")
    if kind is not None and kind != cls.__name__:
        where = f"{source}/{subfolder}" if subfolder else source
        raise ConfigError(f"{key}.source: '{where}' holds a {kind}, not a {cls.__name__}; {USAGE}")
    location = str(Path(source).expanduser()) if names_a_path(source) else source
    # low_cpu_mem_usage=False: the default asks for `accelerate`, and says so on every load
    return cls.from_pretrained(location, subfolder=subfolder, low_cpu_mem_usage=False)


def load_scheduler(source: str, subfolder: str | None = "scheduler", prediction_type: str = "epsilon") -> DDPMScheduler:
    """A pretrained pipeline's noise schedule (betas, timesteps) as a `DDPMScheduler` for training, predicting
    `prediction_type` (the generator's objective); whatever scheduler class the pipeline samples with."""
    config = pretrained_config(source, subfolder, "generator.noise_scheduler")
    return DDPMScheduler.from_config(config, prediction_type=prediction_type)
