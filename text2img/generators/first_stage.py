"""The frozen image autoencoder that latent diffusion runs in: a diffusers `AutoencoderKL` (trained or pretrained),
or a `PatchAutoencoder` fitted to the training images when the run is built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import Tensor

from text2img.data.base import ImageCaptionSource
from text2img.errors import ConfigError
from text2img.generators.patch_autoencoder import PatchAutoencoder
from text2img.generators.vae import VAEGenerator
from text2img.networks.frozen import FrozenNetwork
from text2img.utils.checkpoints import load_checkpoint
from text2img.utils.files import names_a_path
from text2img.utils.paths import CONF_DIR
from text2img.utils.precision import WEIGHT_DTYPES
from text2img.utils.progress import Progress

# Images read at once when fitting a patch code (bounds memory, not results: the fit accumulates in float64).
FIT_BATCH = 256
# Images in each training step of a patch code's refiner, and the seed of their draws and noise.
REFINER_BATCH = 64
REFINER_SEED = 0
# The autoencoder classes a first stage can be, by the `_class_name` of their diffusers config.
AUTOENCODERS: dict[str, type[AutoencoderKL | PatchAutoencoder]] = {
    "AutoencoderKL": AutoencoderKL, "PatchAutoencoder": PatchAutoencoder,
}


class FirstStage(FrozenNetwork):
    """A frozen `AutoencoderKL` or `PatchAutoencoder`: images in [-1, 1] <-> unscaled latents [B, C, H/f, W/f].

    `source` says where the weights came from (a text2img VAE checkpoint, a diffusers folder, a hub name, or
    "fitted" for a patch code fitted by `fit_to`); `identity()` keys caches of its latents. Its weights may be in
    a low precision (`load_first_stage`'s `dtype`): it takes inputs of any float dtype and returns float32, with
    or without autocast.
    """

    def __init__(self, autoencoder: AutoencoderKL | PatchAutoencoder, source: str) -> None:
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.source = source

    @property
    def reloads(self) -> bool:
        """Whether building the model loads these weights again (a diffusers folder or hub name), so checkpoints
        can leave them out; a fitted patch code and a VAE run's checkpoint (which may be deleted) are kept."""
        return self.source != "fitted" and not self.source.endswith(".ckpt")

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        """How many pixels one latent position covers along each side."""
        if isinstance(self.autoencoder, PatchAutoencoder):
            return int(self.autoencoder.config.patch_size)
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.autoencoder.dtype

    @torch.no_grad()
    def moments(self, images: Tensor) -> Tensor:
        """Posterior parameters [B, 2C, h, w]: mean and log-variance, what a latent cache stores."""
        return self.autoencoder.encode(images.to(self.dtype)).latent_dist.parameters.float()

    @staticmethod
    def sample_posterior(moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A latent drawn from posterior parameters (as `AutoencoderKL`'s own distribution clamps them)."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents.to(self.dtype)).sample.float()

    def identity(self) -> dict[str, Any]:
        config = dict(self.autoencoder.config)
        return {"class": type(self.autoencoder).__name__, "source": self.source, "config": config}

    def fit_to(self, source: Any) -> None:
        """Fit what a patch code lacks on `source`'s un-augmented training images: the code unless it is fitted or
        loaded, then its refiner unless trained (a fitted or loaded part is kept); nothing for a trained
        autoencoder."""
        code = self.autoencoder
        if not isinstance(code, PatchAutoencoder) or (code.fitted and code.refiner_trained):
            return
        if not isinstance(source, ImageCaptionSource):
            raise ConfigError(
                f"generator/first_stage=patch_pca is fitted on the training images of a data source with splits, "
                f"and {type(source).__name__} streams its images; fit it on another run's data and pass that run's "
                "exported vae/ folder as generator.first_stage.source (with generator/first_stage=autoencoder)"
            )
        images = source.split("train", augmented=False)
        if not code.fitted:
            self._fit_code(images)
        if not code.refiner_trained:
            self._fit_refiner(images)

    def _fit_code(self, images: Any) -> None:
        with Progress("fitting the patch code to the training images", len(images), "images") as progress:

            def batches():
                for start in range(0, len(images), FIT_BATCH):
                    indices = range(start, min(start + FIT_BATCH, len(images)))
                    yield torch.stack([images[i][0] for i in indices])
                    progress.advance(len(indices))

            self.autoencoder.fit(batches())

    def _fit_refiner(self, images: Any) -> None:
        steps = self.autoencoder.config.refiner_steps
        generator = torch.Generator().manual_seed(REFINER_SEED)
        with Progress("training the patch code's refiner", steps, "steps") as progress:

            def batches():
                for _ in range(steps):
                    indices = torch.randint(len(images), (REFINER_BATCH,), generator=generator).tolist()
                    yield torch.stack([images[i][0] for i in indices])
                    progress.advance(1)

            self.autoencoder.fit_refiner(batches(), generator)


def patch_pca_first_stage(
    latent_channels: int, patch_size: int, whitening: float = 1.0, dtype: str = "float32",
    refiner_width: int = 0, refiner_steps: int = 600, refiner_noise: float = 1.0,
) -> FirstStage:
    """An unfitted patch code (`PatchAutoencoder`) of `latent_channels` x H/`patch_size` x W/`patch_size` latents,
    with a refiner of `refiner_width` channels (0: none); the run's builder fits it to the training images
    (`FirstStage.fit_to`), a checkpoint restores its fit."""
    weights_dtype = _weights_dtype(dtype)
    try:
        autoencoder = PatchAutoencoder(
            latent_channels=latent_channels, patch_size=patch_size, whitening=whitening, refiner_width=refiner_width,
            refiner_steps=refiner_steps, refiner_noise=refiner_noise,
        )
    except ValueError as exc:
        raise ConfigError(f"generator/first_stage=patch_pca: {exc}") from exc
    return FirstStage(torch.nn.Module.to(autoencoder, weights_dtype), "fitted")


def _weights_dtype(name: str) -> torch.dtype:
    if name not in WEIGHT_DTYPES:
        raise ConfigError(f"generator.first_stage.dtype={name!r} is unknown; use one of {', '.join(WEIGHT_DTYPES)}")
    return getattr(torch, name)


def load_first_stage(source: str, subfolder: str | None = None, dtype: str = "float32") -> FirstStage:
    """A frozen first stage from a text2img checkpoint (`*.ckpt` of an unconditional `generator=vae` run), a
    diffusers `AutoencoderKL` or `PatchAutoencoder` folder (an export's vae/), or a hub name (`subfolder`: e.g.
    "vae" in a pipeline's repository), its weights in `dtype` (float32, bfloat16 or float16; the config derives
    it from trainer.precision)."""
    weights_dtype = _weights_dtype(dtype)
    if source.endswith(".ckpt"):
        autoencoder, name = _autoencoder_of_checkpoint(source), source
    else:
        autoencoder = _pretrained_autoencoder(source, subfolder)
        name = source if subfolder is None else f"{source}:{subfolder}"
    # The latent cache's key hashes the weights, so latents encoded in another dtype are never reused.
    # (torch's `to`: diffusers' own warns on every dtype cast, even with no modules to keep in float32.)
    return FirstStage(torch.nn.Module.to(autoencoder, weights_dtype), name)


def _generator_option(target: str) -> str:
    """The `generator=` option whose config builds `target` (for messages), else the class path itself."""
    for path in sorted((CONF_DIR / "generator").glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return f"generator={path.stem}"
    return f"generator._target_={target}"


def _autoencoder_of_checkpoint(path: str) -> AutoencoderKL:
    checkpoint = load_checkpoint(path)
    generator = checkpoint["text2img_config"]["generator"]
    target = str(generator.get("_target_"))
    try:
        is_vae = issubclass(get_class(target), VAEGenerator)
    except (ImportError, ValueError, TypeError):  # a generator class that no longer exists
        is_vae = False
    need = "the first stage must be a generator=vae run with generator.conditional=false"
    if not is_vae:
        raise ConfigError(f"ckpt={path} is a {_generator_option(target)} checkpoint; {need}")
    if generator.get("conditional", True):
        raise ConfigError(f"ckpt={path} is a conditional generator=vae run (its decoder reads text); {need}")
    # Only the autoencoder's shapes are needed: skip building the perceptual loss's network.
    autoencoder = instantiate({**generator, "perceptual": None}).autoencoder
    prefix = "generator.autoencoder."
    weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    for name, expected in autoencoder.state_dict().items():
        found = weights.get(name)
        if found is None or found.shape != expected.shape:
            shape = "missing" if found is None else f"of shape {list(found.shape)}"
            raise ConfigError(
                f"ckpt={path} does not match its own generator config: {prefix}{name} is {shape}, the config "
                f"builds {list(expected.shape)}; the checkpoint was altered: pass the run's original .ckpt"
            )
    autoencoder.load_state_dict(weights)
    return autoencoder


def _pretrained_autoencoder(source: str, subfolder: str | None) -> AutoencoderKL | PatchAutoencoder:
    folder = Path(source).expanduser()
    usage = "pass a generator=vae run's .ckpt, a folder saved by AutoencoderKL.save_pretrained, or a hub name"
    kind = "AutoencoderKL"
    if folder.is_dir():
        model = folder / subfolder if subfolder else folder
        config = model / "config.json"
        if not config.is_file():
            pipeline = (folder / "model_index.json").is_file()
            hint = " (a pipeline folder: add subfolder=vae)" if pipeline else ""
            raise ConfigError(
                f"first stage '{model}' holds no AutoencoderKL: it has no config.json{hint}; {usage}"
            )
        kind = json.loads(config.read_text()).get("_class_name")
        if kind not in AUTOENCODERS:
            raise ConfigError(f"first stage '{model}' holds a {kind}, not an {' or '.join(AUTOENCODERS)}; {usage}")
    elif names_a_path(source):
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"first stage '{source}' {problem}; {usage}")
    try:
        # low_cpu_mem_usage=False: the default asks for `accelerate`, and says so on every load
        return AUTOENCODERS[kind].from_pretrained(str(folder) if folder.is_dir() else source, subfolder=subfolder,
                                                  low_cpu_mem_usage=False)
    except RuntimeError as exc:  # weights that do not fit the config: report the first mismatch
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ConfigError(
            f"first stage '{source}' has weights that do not match its config.json "
            f"({(details or [exc])[0]}); pass an unaltered AutoencoderKL folder"
        ) from exc
    except (OSError, ValueError) as exc:  # no hub access, unknown repository, missing weights
        raise ConfigError(
            f"first stage '{source}' (subfolder={subfolder}) could not be loaded ({type(exc).__name__}); "
            f"{usage}"
        ) from exc
