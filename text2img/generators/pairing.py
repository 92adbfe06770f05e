"""Building a fusion head for a generator: the settings a head takes from the generator it drives."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator


def build_fusion(fusion_cfg: DictConfig, generator: Generator, fusion_name: str, generator_name: str) -> FusionHead:
    """Instantiate `fusion_cfg` and check that it can drive `generator` (`check_compatible`); a head with a
    `film_channels` setting (fusion=film) gets the generator's FiLM channels, and the generator then takes its
    FiLM parameters from the head. The names are the config options chosen, for the errors."""
    fusion = _instantiate_for(fusion_cfg, generator, fusion_name, generator_name)
    check_compatible(fusion, generator, fusion_name, generator_name)
    return fusion


def _instantiate_for(fusion_cfg: DictConfig, generator: Generator, fusion_name: str, generator_name: str) -> FusionHead:
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


def check_compatible(fusion: FusionHead, generator: Generator, fusion_name: str, generator_name: str) -> None:
    """Fail at build time, naming both config options, when a fusion head cannot drive a generator."""
    pair = f"fusion={fusion_name} with generator={generator_name}"
    if fusion.out_dim != generator.cond_dim:
        raise ConfigError(
            f"{pair}: the fusion head outputs {fusion.out_dim} features but the generator expects "
            f"{generator.cond_dim}; leave fusion.out_dim at its default ${{generator.cond_dim}} or make them equal"
        )
    missing = generator.requires - fusion.produces
    if missing:
        raise ConfigError(
            f"{pair}: the head produces {sorted(fusion.produces)} but the generator consumes "
            f"{sorted(generator.requires)}; choose a fusion head that produces {' and '.join(sorted(missing))}"
        )
    blocks = fusion.text_blocks
    if blocks is not None and blocks != generator.text_blocks:
        if not blocks or generator.text_blocks is None:
            raise ConfigError(
                f"{pair}: the head routes one LLM layer into each transformer block, but the generator has no blocks "
                "that read their own tokens; use generator=dit"
            )
        raise ConfigError(
            f"{pair}: the head routes LLM layers into {blocks} blocks but the transformer has {generator.text_blocks}; "
            "leave fusion.blocks at its default ${generator.denoiser.depth}"
        )
    if fusion.timestep_aware and not generator.has_timesteps:
        raise ConfigError(f"{pair}: a timestep-aware head needs a generator with timesteps; choose a diffusion generator")
