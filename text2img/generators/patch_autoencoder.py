"""A fixed linear first stage: each p x p RGB patch projected on the top principal components of the training
images' patches, each component scaled to unit variance ("whitened").

It is a diffusers model with `AutoencoderKL`'s interface (`encode(x).latent_dist`, `decode(z).sample`,
`config.latent_channels`, `config.scaling_factor`), so latent diffusion, the latent cache and the exported
pipeline use it as they use a VAE. Its posterior has no spread (log-variance -30, which diffusers' own Gaussian
clamps to): encoding is deterministic. It is not trained but fitted, in one pass over the images (`fit`).

Why: on OpenMoji the small VAE that can be trained within the default's budget turns every hue brown, while this
code, fitted in a second, keeps the colours (experiments/default_model/README.md, "first stage"). The whitening
matters: unscaled, the low-variance components that carry the colours drown in the diffusion noise.

Standalone (torch and diffusers only): the exported pipeline's loader carries a copy of this module.
"""

from __future__ import annotations

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


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Images [B, in_channels, H, W] <-> latents [B, latent_channels, H/p, W/p], p = `patch_size`.

    encode: z = (patch - mean) . components / scales; decode: patch = (z * scales) . components + mean. The
    components are orthonormal, so decode(encode(x)) is x's projection on their span. `scales` are the components'
    standard deviations to the power `whitening`: 1 gives every latent channel unit variance, 0 keeps the PCA's
    own variances, between them the fine components (small variance) stay smaller than the coarse ones, so that
    diffusion noise drowns them first and the sampler settles them last. Unfitted (zeros) until `fit` runs or
    weights are loaded; `fitted` says which.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        patch_size: int = 4,
        whitening: float = 1.0,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        width = in_channels * patch_size**2
        if not 0 < latent_channels <= width:
            raise ValueError(
                f"a patch code of {patch_size}x{patch_size} patches of {in_channels} channels has at most {width} "
                f"latent channels, got latent_channels={latent_channels}; lower it or raise patch_size"
            )
        # Parameters (frozen by their owner), so that the model has a device and dtype as every diffusers model.
        self.mean = nn.Parameter(torch.zeros(width))
        self.components = nn.Parameter(torch.zeros(latent_channels, width))
        self.scales = nn.Parameter(torch.ones(latent_channels))

    @property
    def fitted(self) -> bool:
        return bool(self.components.detach().abs().sum() > 0)

    def encode(self, images: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        patches = F.pixel_unshuffle(images, self.config.patch_size) - self.mean.view(1, -1, 1, 1)
        weight = (self.components / self.scales[:, None])[:, :, None, None]
        mean = F.conv2d(patches, weight)
        moments = torch.cat([mean, torch.full_like(mean, DETERMINISTIC_LOGVAR)], dim=1)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, latents: Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        weight = (self.components * self.scales[:, None]).T[:, :, None, None]
        patches = F.conv2d(latents, weight) + self.mean.view(1, -1, 1, 1)
        images = F.pixel_shuffle(patches, self.config.patch_size)
        return DecoderOutput(sample=images) if return_dict else (images,)

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
