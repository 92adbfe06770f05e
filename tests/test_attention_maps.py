"""Per-token cross-attention maps (text2img.inspect.attention_maps): one map per token, a distribution over tokens at
every pixel, the generated image unchanged by recording, the layers restored, and backends without
cross-attention refused with one line."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from conftest import compose_train, smoke_overrides
from text2img.inspect.attention_maps import (
    AttentionSum,
    RecordingAttnProcessor,
    cross_attention_maps,
    diffusers_attention_probabilities,
    recording_cross_attention,
)
from text2img.errors import ConfigError
from text2img.run.compose import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "red square"
# The tiny encoder's byte tokenizer: a <bos> token, then one token per byte.
PROMPT_TOKENS = ["<bos>", *PROMPT]


def build(tmp_path, imagefolder, *overrides):
    """An untrained smoke model: random weights attend somewhere, which is all these tests need."""
    datamodule, model = build_model(compose_train(tmp_path, smoke_overrides(imagefolder, *overrides)))
    return datamodule, model.eval()


def cross_attention_processors(model) -> list:
    return [m.processor for m in model.generator.denoiser.modules() if isinstance(m, Attention) and m.is_cross_attention]


def assert_distributions(maps: torch.Tensor, tokens: int, size: int) -> None:
    assert maps.shape == (tokens, size, size)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(0), torch.ones(size, size))


def test_diffusion_maps_one_per_token_and_leave_the_image_unchanged(tmp_path, imagefolder):
    datamodule, model = build(tmp_path, imagefolder)
    processors = cross_attention_processors(model)
    result = cross_attention_maps(model, PROMPT, seed=3)

    assert result.tokens == PROMPT_TOKENS and result.encoder_text == PROMPT
    assert_distributions(result.maps, len(PROMPT_TOKENS), 32)
    assert result.maps.std(0).max() > 0  # tokens differ somewhere: not a uniform placeholder
    # The image text2img.sample draws (from the untrimmed embedding).
    text = model.conditioner.sampling([PROMPT]).text
    torch.testing.assert_close(result.image, model.generate(text, [3])[0], rtol=0, atol=1e-5)
    assert cross_attention_processors(model) == processors  # the layers' own processors are back


def test_latent_diffusion_maps_are_upsampled_to_the_image(tmp_path, imagefolder, tiny_first_stage):
    datamodule, model = build(
        tmp_path, imagefolder, "generator=ldm", f"generator.first_stage.source={tiny_first_stage}",
        "generator.latent_scale=1.0",
    )
    result = cross_attention_maps(model, PROMPT, guidance_scale=1.0)
    assert_distributions(result.maps, len(PROMPT_TOKENS), 32)


def test_a_resampling_head_labels_its_latents(tmp_path, imagefolder):
    datamodule, model = build(tmp_path, imagefolder, "fusion=perceiver", "fusion.num_latents=4", "fusion.heads=4")
    result = cross_attention_maps(model, PROMPT)
    assert result.tokens == ["latent 0", "latent 1", "latent 2", "latent 3"]
    assert_distributions(result.maps, 4, 32)


def test_gan_with_attention_records_its_cross_attention(tmp_path, imagefolder):
    datamodule, model = build(tmp_path, imagefolder, "generator=gan", "generator.attention=true")
    result = cross_attention_maps(model, PROMPT)
    assert result.tokens == PROMPT_TOKENS
    assert_distributions(result.maps, len(PROMPT_TOKENS), 32)


@pytest.mark.parametrize("overrides", [["generator=gan"], ["generator=vae"]])
def test_backends_without_cross_attention_are_refused(tmp_path, imagefolder, overrides):
    datamodule, model = build(tmp_path, imagefolder, *overrides)
    with pytest.raises(ConfigError, match="attention maps exist for generator=diffusion, generator=dit, generator=ldm"):
        cross_attention_maps(model, PROMPT)


def test_recorded_probabilities_are_the_layers_and_ignore_padding():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    pixels, tokens = torch.randn(2, 9, 16), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    bias = torch.zeros(2, 1, 3).masked_fill(~mask[:, None], -10_000.0)  # as the UNet passes its mask
    probabilities = diffusers_attention_probabilities(attn, pixels, tokens, bias)
    assert probabilities.shape == (2, 9, 3)
    assert probabilities[0, :, 2].max() < 1e-6
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 9))

    recorded = AttentionSum(rows=1)
    processor = attn.processor
    attn.set_processor(RecordingAttnProcessor(processor, recorded))
    attn(pixels, tokens, bias)
    assert recorded.calls == 1
    torch.testing.assert_close(recorded.sums[9], probabilities[:1])
    attn.set_processor(processor)


def test_layers_are_restored_when_generation_fails(tmp_path, imagefolder):
    _, model = build(tmp_path, imagefolder)
    processors = cross_attention_processors(model)
    with pytest.raises(RuntimeError, match="boom"):
        with recording_cross_attention(model.generator, AttentionSum(rows=1)):
            raise RuntimeError("boom")
    assert cross_attention_processors(model) == processors
