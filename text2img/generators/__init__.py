from text2img.generators.base import Generator
from text2img.generators.diffusion import DiffusionGenerator
from text2img.generators.gan import GANGenerator
from text2img.generators.latent_diffusion import LatentDiffusionGenerator
from text2img.generators.pairing import build_fusion, check_compatible
from text2img.generators.vae import VAEGenerator

__all__ = [
    "DiffusionGenerator",
    "GANGenerator",
    "Generator",
    "LatentDiffusionGenerator",
    "VAEGenerator",
    "build_fusion",
    "check_compatible",
]
