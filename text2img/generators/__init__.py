from text2img.generators.base import Generator, check_compatible
from text2img.generators.diffusion import DiffusionGenerator

__all__ = ["DiffusionGenerator", "Generator", "check_compatible"]
