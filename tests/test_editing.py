"""Text-guided editing with diffusion backends: inpainting and image-to-image (SDEdit), in any model space."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict
from torch import Tensor

from conftest import compose_train
from text2img.conditioning import TextConditioner
from text2img.errors import ConfigError
from text2img.generators import DiffusionGenerator, Generator
from text2img.generators.diffusion import ImageEdit
from text2img.lightning import Text2ImgModule
from text2img.types import TextEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
STEPS = 20  # enough timesteps for strengths 0.2 / 0.5 / 0.9 to start at different noise levels


class FoldedSpaceDiffusion(DiffusionGenerator):
    """Diffusion in a space of another size and depth than the image's (2x2 pixel blocks as 12 channels at
    half size), overriding only the model-space hooks, as latent diffusion does with its first stage; its
    decoder is, like a VAE's, not exactly the encoder's inverse."""

    def to_model_space(self, images: Tensor, latents: Tensor | None = None) -> Tensor:
        return F.pixel_unshuffle(images, 2)

    def from_model_space(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(x, 2) * 0.9


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    return compose_train(tmp_path_factory.mktemp("editing"), ["debug=smoke"])


def module_with(cfg, generator: Generator) -> Text2ImgModule:
    torch.manual_seed(0)
    model_cfg = cfg.model.copy()
    with open_dict(model_cfg):
        text_dim, caption_dropout = model_cfg.pop("text_dim"), model_cfg.pop("caption_dropout")
    fusion = instantiate(cfg.fusion)
    conditioner = TextConditioner(instantiate(cfg.encoder), "unused", text_dim, caption_dropout=caption_dropout)
    return instantiate(model_cfg, fusion=fusion, generator=generator, conditioner=conditioner).eval()


@pytest.fixture(scope="module")
def pixel_model(cfg) -> Text2ImgModule:
    """The smoke-sized pixel diffusion model of the configs (untrained: editing is mechanics, not quality)."""
    torch.manual_seed(0)
    return module_with(cfg, instantiate(cfg.generator))


@pytest.fixture(scope="module")
def folded_model(cfg) -> Text2ImgModule:
    torch.manual_seed(0)
    factory = instantiate(cfg.generator, _partial_=True)
    return module_with(cfg, FoldedSpaceDiffusion(**factory.keywords, model_channels=12, model_size=SIZE // 2))


def prompts(model: Text2ImgModule, count: int) -> TextEmbedding:
    generator = torch.Generator().manual_seed(3)
    dim = model.conditioner.null_tokens.shape[1]
    return TextEmbedding(torch.randn(count, 5, dim, generator=generator), torch.ones(count, 5, dtype=torch.bool),
                         torch.randn(count, dim, generator=generator))


def disc(colour: tuple[float, float, float], count: int) -> Tensor:
    """A coloured disc on white, [count, 3, SIZE, SIZE] in [-1, 1]."""
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    inside = ((ys - SIZE / 2) ** 2 + (xs - SIZE / 2) ** 2) < (SIZE / 3) ** 2
    image = torch.where(inside, torch.tensor(colour)[:, None, None], torch.ones(3, 1, 1))
    return (image * 2 - 1).expand(count, -1, -1, -1)


def lower_half_mask(count: int) -> Tensor:
    mask = torch.zeros(count, 1, SIZE, SIZE)
    mask[..., SIZE // 2 :, :] = 1
    return mask


def edit(model: Text2ImgModule, images: Tensor, strength: float = 1.0, mask: Tensor | None = None,
         seeds: list[int] | None = None, text: TextEmbedding | None = None, **sampling) -> Tensor:
    seeds = list(range(len(images))) if seeds is None else seeds
    text = prompts(model, len(seeds)) if text is None else text
    return model.generate(text, seeds, steps=STEPS, edit=ImageEdit(images, strength, mask), **sampling)


@pytest.mark.parametrize("space", ["pixel", "folded"])
@pytest.mark.parametrize("sampler", ["DPMSolverMultistepScheduler", "DDIMScheduler"])
def test_inpainting_keeps_unmasked_pixels_exactly_and_changes_masked_ones(
    space: str, sampler: str, pixel_model: Text2ImgModule, folded_model: Text2ImgModule,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = pixel_model if space == "pixel" else folded_model
    monkeypatch.setattr(model.generator, "sampler", getattr(__import__("diffusers"), sampler))
    images, mask = disc((0.9, 0.1, 0.1), 3), lower_half_mask(3)
    out = edit(model, images, mask=mask)
    assert out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.float32
    keep = ~mask.bool().expand_as(out)
    assert torch.equal(out[keep], ((images + 1) / 2)[keep])
    assert (out - (images + 1) / 2)[~keep].abs().mean() > 0.05
    assert 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("space", ["pixel", "folded"])
def test_the_regenerated_region_is_drawn_in_the_context_of_the_kept_one(
    space: str, pixel_model: Text2ImgModule, folded_model: Text2ImgModule
) -> None:
    """The kept region, noised to each timestep, replaces the model's own there at every step: two images that
    differ only outside the mask give different fills (were it pasted in at the end only, the fills would be the
    same: at strength 1 the start keeps 5e-5 of the input)."""
    model = pixel_model if space == "pixel" else folded_model
    mask = lower_half_mask(3)
    red, blue = disc((0.9, 0.1, 0.1), 3), disc((0.1, 0.1, 0.9), 3)
    blue = torch.where(mask.bool(), red, blue)  # the same lower half as red
    fill_red, fill_blue = (edit(model, x, mask=mask)[mask.bool().expand(-1, 3, -1, -1)] for x in (red, blue))
    assert (fill_red - fill_blue).abs().mean() > 0.01


@pytest.mark.parametrize("space", ["pixel", "folded"])
def test_img2img_moves_further_from_the_input_as_strength_grows(
    space: str, pixel_model: Text2ImgModule, folded_model: Text2ImgModule
) -> None:
    model = pixel_model if space == "pixel" else folded_model
    images = disc((0.1, 0.7, 0.2), 4)  # four seeds, averaged
    distance = [(edit(model, images, strength) - (images + 1) / 2).abs().mean().item() for strength in (0.2, 0.5, 0.9)]
    assert distance[0] < distance[1] < distance[2], distance
    plain = model.generate(prompts(model, 4), list(range(4)), steps=STEPS)
    assert distance[2] < (plain - (images + 1) / 2).abs().mean().item()


def test_strength_one_is_text_to_image_of_the_same_seed(pixel_model: Text2ImgModule) -> None:
    """At strength 1 sampling starts at the first timestep, where the cosine schedule keeps sqrt(alpha_bar) = 5e-5
    of the input: the input's content is gone, the prompt and the seed decide (as in diffusers' img2img)."""
    red, blue = disc((0.9, 0.1, 0.1), 3), disc((0.1, 0.1, 0.9), 3)
    plain = pixel_model.generate(prompts(pixel_model, 3), [0, 1, 2], steps=STEPS)
    from_red, from_blue = edit(pixel_model, red, 1.0), edit(pixel_model, blue, 1.0)
    assert (from_red - plain).abs().max() < 1e-3 and (from_blue - plain).abs().max() < 1e-3  # measured 1.4e-4
    # whereas at 0.9 (sqrt(alpha_bar) = 0.23 at the first of the last 18 of 20 timesteps) the input still shows
    assert (edit(pixel_model, red, 0.9) - edit(pixel_model, blue, 0.9)).abs().mean() > 0.01  # measured 0.034


def test_an_edited_image_depends_on_its_own_seed_only(pixel_model: Text2ImgModule) -> None:
    images, mask = disc((0.9, 0.6, 0.1), 3), lower_half_mask(3)
    text = prompts(pixel_model, 3)
    together = edit(pixel_model, images, 0.7, mask, seeds=[5, 6, 7], text=text)
    alone = edit(pixel_model, images[1:2], 0.7, mask[1:2], seeds=[6], text=text[1:2])
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=0)  # CPU kernels round by batch size
    assert (together[0] - together[1]).abs().max() > 0.05


def test_guidance_applies_when_editing(pixel_model: Text2ImgModule) -> None:
    images = disc((0.9, 0.1, 0.1), 2)
    assert (edit(pixel_model, images, 0.8, guidance_scale=1.0) - edit(pixel_model, images, 0.8, guidance_scale=5.0)
            ).abs().mean() > 1e-3


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_strength_out_of_range_is_one_clear_line(pixel_model: Text2ImgModule, strength: float) -> None:
    with pytest.raises(ConfigError, match=rf"^strength={strength} is out of range; use 0 < strength <= 1$"):
        edit(pixel_model, disc((1, 0, 0), 1), strength)


def test_malformed_edit_inputs_are_refused(pixel_model: Text2ImgModule) -> None:
    with pytest.raises(ValueError, match=r"edit images have shape \(1, 3, 16, 16\); expected \(1, 3, 32, 32\)"):
        edit(pixel_model, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="mask must hold 0 \\(keep\\) and 1 \\(regenerate\\) only"):
        edit(pixel_model, disc((1, 0, 0), 1), mask=torch.full((1, 1, SIZE, SIZE), 0.5))


class NoTimesteps(Generator):
    """A backend that draws images in one pass (as a GAN or a VAE does)."""

    consumes = frozenset({"vector"})

    def training_loss(self, images, text, fusion, latents=None) -> Tensor:
        return torch.zeros(())

    def sample(self, text, null_text, fusion, generators, guidance_scale=None, steps=None, sampler=None) -> Tensor:
        return torch.zeros(len(text), 3, self.image_size, self.image_size)


def test_a_backend_without_timesteps_refuses_editing_in_one_line(cfg) -> None:
    model = module_with(cfg, NoTimesteps(SIZE, cfg.generator.cond_dim))
    assert model.generate(prompts(model, 1), [0]).shape == (1, 3, SIZE, SIZE)  # sampling still works
    with pytest.raises(ConfigError, match="^NoTimesteps cannot edit images .*; drop init_image, mask and strength"):
        edit(model, disc((1, 0, 0), 1), 0.5)


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory: pytest.TempPathFactory) -> Text2ImgModule:
    """The smoke-sized pixel model with `generator.objective=flow` (rectified flow, Euler sampling), untrained."""
    cfg = compose_train(tmp_path_factory.mktemp("flow"), ["debug=smoke", "generator.objective=flow"])
    torch.manual_seed(0)
    return module_with(cfg, instantiate(cfg.generator))


@pytest.mark.parametrize("sampler", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_flow_inpainting_keeps_unmasked_pixels_exactly_and_changes_masked_ones(
    sampler: str, flow_model: Text2ImgModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flow schedulers noise the kept region with `scale_noise` (they have no `add_noise`); Heun's two calls a
    step index their sigmas as the runtime's `timesteps[i + 1]` does."""
    monkeypatch.setattr(flow_model.generator, "sampler", getattr(__import__("diffusers"), sampler))
    images, mask = disc((0.9, 0.1, 0.1), 2), lower_half_mask(2)
    out = edit(flow_model, images, mask=mask, guidance_scale=1.0)  # unguided: half the time, the same mechanics
    keep = ~mask.bool().expand_as(out)
    assert torch.equal(out[keep], ((images + 1) / 2)[keep])
    assert (out - (images + 1) / 2)[~keep].abs().mean() > 0.05


def test_flow_img2img_follows_strength_from_the_input_to_text_to_image(flow_model: Text2ImgModule) -> None:
    """On the straight path the last of 20 Euler steps starts at sigma 1/1000: the input comes back almost as it
    went in; at strength 1 the input is weighted by 1 - sigma = 0, so the image is text-to-image's, bit for bit."""
    images, unguided = disc((0.1, 0.7, 0.2), 2), {"guidance_scale": 1.0}
    distance = [(edit(flow_model, images, s, **unguided) - (images + 1) / 2).abs() for s in (0.05, 0.5, 0.9)]
    assert distance[0].max() < 0.01, distance[0].max()
    assert distance[0].mean() < distance[1].mean() < distance[2].mean()
    plain = flow_model.generate(prompts(flow_model, 2), [0, 1], steps=STEPS, **unguided)
    assert torch.equal(edit(flow_model, images, 1.0, **unguided), plain)
