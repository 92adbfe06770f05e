"""Building a fusion head for a generator: the settings a head takes from the generator it drives."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead

if TYPE_CHECKING:  # text2img.generators imports this package
    from text2img.generators.base import Generator


def build_fusion(fusion_cfg: DictConfig, generator: Generator, fusion_name: str, generator_name: str) -> FusionHead:
    """Instantiate `fusion_cfg`; a head with a `film_channels` setting (fusion=film) gets the generator's FiLM
    channels, and the generator then takes its FiLM parameters from the head. The names are the config options
    chosen, for the error of a generator without FiLM layers."""
    if "film_channels" not in fusion_cfg:
        return instantiate(fusion_cfg)
    if not generator.film_channels:
        fields = " or ".join(sorted(generator.requires or generator.consumes))
        instead = f"a head that produces {fields}" if fields else "another fusion head"
        raise ConfigError(
            f"fusion={fusion_name} with generator={generator_name}: the head produces per-layer FiLM scales and "
            f"shifts but the generator has no FiLM layers; use generator=gan or {instead}"
        )
    fusion = instantiate(fusion_cfg, film_channels=list(generator.film_channels))
    generator.use_film_head()
    return fusion
