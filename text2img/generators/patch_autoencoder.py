"""A fixed linear first stage: each p x p RGB patch projected on the top principal components of the training
images' patches, each component scaled to unit variance ("whitened").

It is a diffusers model with `AutoencoderKL`'s interface (`encode(x).latent_dist`, `decode(z).sample`,
`config.latent_channels`, `config.scaling_factor`), so latent diffusion, the latent cache and the exported
pipeline use it as they use a VAE. Its posterior has no spread (log-variance -30, which diffusers' own Gaussian
clamps to): encoding is deterministic. It is not trained but fitted, in one pass over the images (`fit`).

Why: on OpenMoji the small VAE that can be trained within the default's budget turns every hue brown, while this
code, fitted in a second, keeps the colours (experiments/default_model/README.md, "first stage"). The whitening
matters: unscaled, the low-variance components that carry the colours drown in the diffusion noise.

Optionally (`refiner_width` > 0) a small convolutional network adds a correction to the linear decode. It is
trained after the fit (`fit_refiner`, seconds) to map *noisy* latents to the clean image, so that the errors a
denoiser leaves in its samples come out as smooth images, not as speckle of 4x4 blocks: a linear decoder passes
every latent error to the pixels, as a trained VAE's decoder does not.

Standalone (torch and diffusers only): the exported pipeline's loader carries a copy of this module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import Tensor, nn

# The log-variance of the posterior: diffusers' DiagonalGaussianDistribution clamps to [-30, 20], so this is its
# narrowest (std 3e-7), a point mass for every purpose.
DETERMINISTIC_LOGVAR = -30.0
# A component whose variance is below this fraction of the largest one carries no signal, only rounding: whitening
# would blow it up.
MIN_VARIANCE_RATIO = 1e-8
# The refiner's optimiser: AdamW at this peak learning rate on a one-cycle schedule (10% warm-up).
REFINER_LR = 2e-3


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Images [B, in_channels, H, W] <-> latents [B, latent_channels, H/p, W/p], p = `patch_size`.

    encode: z = (patch - mean) . components / scales; decode: patch = (z * scales) . components + mean. The
    components are orthonormal, so decode(encode(x)) is x's projection on their span. `scales` are the components'
    standard deviations to the power `whitening`: 1 gives every latent channel unit variance, 0 keeps the PCA's
    own variances, between them the fine components (small variance) stay smaller than the coarse ones, so that
    diffusion noise drowns them first and the sampler settles them last. Unfitted (zeros) until `fit` runs or
    weights are loaded; `fitted` says which.

    With `refiner_width` > 0, decode adds `PatchRefiner(z)` to the patches; `fit_refiner` trains it on latents
    with Gaussian noise of a standard deviation drawn uniformly in [0, `refiner_noise`] per image, for
    `refiner_steps` steps. Until then (zero-initialised output) it adds nothing.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        patch_size: int = 4,
        whitening: float = 1.0,
        scaling_factor: float = 1.0,
        refiner_width: int = 0,
        refiner_steps: int = 600,
        refiner_noise: float = 1.0,
    ) -> None:
        super().__init__()
        width = in_channels * patch_size**2
        if not 0 < latent_channels <= width:
            raise ValueError(
                f"a patch code of {patch_size}x{patch_size} patches of {in_channels} channels has at most {width} "
                f"latent channels, got latent_channels={latent_channels}; lower it or raise patch_size"
            )
        if refiner_width < 0 or refiner_steps < 0 or refiner_noise < 0:
            raise ValueError(
                f"refiner_width={refiner_width}, refiner_steps={refiner_steps} and refiner_noise={refiner_noise} "
                "must not be negative (refiner_width=0: no refiner, the linear decode alone)"
            )
        # Parameters (frozen by their owner), so that the model has a device and dtype as every diffusers model.
        self.mean = nn.Parameter(torch.zeros(width))
        self.components = nn.Parameter(torch.zeros(latent_channels, width))
        self.scales = nn.Parameter(torch.ones(latent_channels))
        self.refiner = None
        if refiner_width:
            # Built without drawing from the run's random stream (fit_refiner draws its weights anew from its own
            # generator): a run with a refiner initialises and trains its denoiser exactly as one without.
            with torch.random.fork_rng(devices=[]):
                self.refiner = PatchRefiner(latent_channels, width, refiner_width)

    @property
    def fitted(self) -> bool:
        return bool(self.components.detach().abs().sum() > 0)

    @property
    def refiner_trained(self) -> bool:
        """Whether the decode is complete: no refiner, or one trained (an untrained one's output layer is zero)."""
        return self.refiner is None or bool(self.refiner.layers[-1].weight.detach().abs().sum() > 0)

    def encode(self, images: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        patches = F.pixel_unshuffle(images, self.config.patch_size) - self.mean.view(1, -1, 1, 1)
        weight = (self.components / self.scales[:, None])[:, :, None, None]
        mean = F.conv2d(patches, weight)
        moments = torch.cat([mean, torch.full_like(mean, DETERMINISTIC_LOGVAR)], dim=1)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, latents: Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        patches = self._linear_patches(latents)
        if self.refiner is not None:
            patches = patches + self.refiner(latents)
        images = F.pixel_shuffle(patches, self.config.patch_size)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def _linear_patches(self, latents: Tensor) -> Tensor:
        components, scales, mean = (p.to(latents.dtype) for p in (self.components, self.scales, self.mean))
        return F.conv2d(latents, (components * scales[:, None]).T[:, :, None, None]) + mean.view(1, -1, 1, 1)

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor]) -> PatchAutoencoder:
        """Set mean, components and scales from the patches of `batches` of images [B, C, H, W] (one pass; the
        covariance is accumulated in float64, so the result does not depend on how the images are batched).
        Each component's sign is fixed (its largest entry positive), so a refit on the same images is the same."""
        patch, width = self.config.patch_size, self.mean.numel()
        total, outer, count = torch.zeros(width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64), 0
        for images in batches:
            if images.shape[1] != self.config.in_channels or images.shape[-1] % patch or images.shape[-2] % patch:
                raise ValueError(
                    f"the patch code takes images of {self.config.in_channels} channels whose sides are multiples of "
                    f"patch_size={patch}; got a batch of shape {tuple(images.shape)}"
                )
            rows = F.pixel_unshuffle(images.detach().cpu().double(), patch).permute(0, 2, 3, 1).reshape(-1, width)
            total += rows.sum(dim=0)
            outer += rows.T @ rows
            count += len(rows)
        if count < 2:
            raise ValueError("the patch code needs at least two patches to fit; the image set is empty")
        mean = total / count
        covariance = outer / count - torch.outer(mean, mean)
        variances, vectors = torch.linalg.eigh(covariance)  # ascending
        channels = self.config.latent_channels
        variances, vectors = variances.flip(0)[:channels], vectors.flip(1)[:, :channels].T
        if not variances[-1] > MIN_VARIANCE_RATIO * variances[0]:
            useful = int((variances > MIN_VARIANCE_RATIO * variances[0]).sum())
            raise ValueError(
                f"the images' patches vary along only {useful} directions, fewer than latent_channels={channels}; "
                f"lower generator.first_stage.latent_channels to at most {useful}"
            )
        largest = vectors.abs().argmax(dim=1)
        vectors = vectors * vectors.gather(1, largest[:, None]).sign()
        scales = variances.sqrt() ** self.config.whitening
        for parameter, value in ((self.mean, mean), (self.components, vectors), (self.scales, scales)):
            parameter.copy_(value.to(parameter.dtype))
        return self

    def fit_refiner(self, batches: Iterable[Tensor], generator: torch.Generator | None = None) -> PatchAutoencoder:
        """Train the refiner (after `fit`) on `refiner_steps` batches of clean images [B, C, H, W] (its learning-rate
        schedule's length): one AdamW step each, on the L1 error between the image and the decode of its latents
        plus noise. It trains in float32 whatever the weights' dtype, from weights drawn anew; `generator` draws
        them and the noise, so a seeded one makes the fit depend on the images alone, as `fit` does."""
        if self.refiner is None:
            return self
        if not self.fitted:
            raise RuntimeError("fit the patch code before its refiner: the refiner corrects the linear decode")
        refiner = copy.deepcopy(self.refiner).float().reset_parameters(generator).requires_grad_(True).train()
        steps, patch = self.config.refiner_steps, self.config.patch_size
        optimizer = torch.optim.AdamW(refiner.parameters(), lr=REFINER_LR, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, REFINER_LR, total_steps=max(steps, 1), pct_start=0.1)
        with torch.enable_grad():
            for step, images in enumerate(batches):
                if step == steps:
                    raise ValueError(f"fit_refiner takes refiner_steps={steps} batches, its schedule's length; got more")
                images = images.to(self.mean.device, torch.float32)
                with torch.no_grad():
                    latents = self.encode(images.to(self.dtype)).latent_dist.mean.float()
                    spread = self.config.refiner_noise * torch.rand(len(latents), 1, 1, 1, generator=generator)
                    noise = torch.randn(latents.shape, generator=generator)
                    latents = latents + (spread * noise).to(latents.device)
                    linear = self._linear_patches(latents)
                loss = (linear + refiner(latents) - F.pixel_unshuffle(images, patch)).abs().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        self.refiner.load_state_dict(refiner.state_dict())  # cast back to the weights' dtype
        return self


class PatchRefiner(nn.Module):
    """Three 3x3 convolutions over the latent grid (each position sees its neighbours' latents, so block edges can
    be smoothed) that output a correction of every pixel of each patch. The last layer starts at zero: an untrained
    refiner leaves the linear decode as it is."""

    def __init__(self, latent_channels: int, patch_width: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, patch_width, 3, padding=1),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> PatchRefiner:
        """torch's default initialisation of the convolutions (drawn from `generator`), the last one zero."""
        *hidden, last = (layer for layer in self.layers if isinstance(layer, nn.Conv2d))
        for layer in hidden:
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(layer.weight[0].numel())
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return self

    def forward(self, latents: Tensor) -> Tensor:
        return self.layers(latents)
