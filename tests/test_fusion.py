"""Fusion heads pooled_mlp, perceiver, timestep_aware, film and refiner: shapes, masks, gradients, export, the generators
they can drive."""

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_train, smoke_overrides
from text2img.errors import ConfigError
from text2img.export import export_fusion
from text2img.fusion import (
    FiLMHead, FusionHead, PerceiverResampler, PooledMLP, TimestepAwarePerceiver, TokenProjection, TokenRefiner,
)
from text2img.fusion.base import ScaledRMSNorm
from text2img.generators import DiffusionGenerator, GANGenerator, Generator, build_fusion
from text2img.train import train
from text2img.types import Conditioning, TextEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT_DIM, COND_DIM = 24, 32


def text(
    batch: int = 3, length: int = 6, real: tuple[int, ...] = (6, 4, 1), dim: int = TEXT_DIM
) -> TextEmbedding:
    """Captions of different lengths (row i has real[i] tokens), zero at padding as encoders give them."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.arange(length) < torch.tensor(real)[:, None]
    tokens = torch.randn(batch, length, dim, generator=generator) * mask[..., None]
    return TextEmbedding(tokens, mask, torch.randn(batch, dim, generator=generator))


def with_garbage_padding(text: TextEmbedding, extra: int = 5) -> TextEmbedding:
    """The same captions with `extra` more padding positions holding large random features."""
    batch, _, dim = text.tokens.shape
    garbage = 100 * torch.randn(batch, extra, dim, generator=torch.Generator().manual_seed(9))
    return TextEmbedding(
        torch.cat([text.tokens, garbage], dim=1),
        torch.cat([text.mask, torch.zeros(batch, extra, dtype=torch.bool)], dim=1),
        text.pooled,
    )


def heads() -> list[FusionHead]:
    torch.manual_seed(0)
    return [
        PooledMLP(TEXT_DIM, COND_DIM, pooling="mean", hidden_dim=16),
        PooledMLP(TEXT_DIM, COND_DIM, pooling="last"),
        PerceiverResampler(TEXT_DIM, COND_DIM, num_latents=5, depth=2, heads=4),
    ]


HEAD_IDS = ["pooled_mlp-mean", "pooled_mlp-last", "perceiver"]


# --- shapes and masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_mlp_gives_one_vector_and_no_tokens(pooling):
    cond = PooledMLP(TEXT_DIM, COND_DIM, pooling=pooling)(text())
    assert cond.vector.shape == (3, COND_DIM) and torch.isfinite(cond.vector).all()
    assert cond.tokens is None and cond.mask is None


def test_pooled_mlp_mean_ignores_padding_and_last_reads_only_the_pooled_state():
    mean, last = PooledMLP(TEXT_DIM, COND_DIM, pooling="mean"), PooledMLP(TEXT_DIM, COND_DIM, pooling="last")
    captions = text()
    torch.testing.assert_close(mean(with_garbage_padding(captions)).vector, mean(captions).vector)
    # the real tokens matter to the mean, not to last; the pooled state the other way round
    other_tokens = TextEmbedding(captions.tokens.flip(0), captions.mask, captions.pooled)
    other_pooled = TextEmbedding(captions.tokens, captions.mask, captions.pooled.flip(0))
    assert not torch.allclose(mean(other_tokens).vector, mean(captions).vector)
    torch.testing.assert_close(mean(other_pooled).vector, mean(captions).vector)
    torch.testing.assert_close(last(other_tokens).vector, last(captions).vector)
    assert not torch.allclose(last(other_pooled).vector, last(captions).vector)


def test_perceiver_gives_num_latents_tokens_all_attended_and_their_mean():
    head = PerceiverResampler(TEXT_DIM, COND_DIM, num_latents=7, depth=3, heads=4)
    for length, real in [(6, (6, 4, 1)), (11, (2, 11, 5))]:
        cond = head(text(length=length, real=real))
        assert cond.tokens.shape == (3, 7, COND_DIM) and torch.isfinite(cond.tokens).all()
        assert cond.mask.dtype == torch.bool and cond.mask.shape == (3, 7) and cond.mask.all()
        torch.testing.assert_close(cond.vector, cond.tokens.mean(1))
    # different captions give different latents (the queries do read the tokens)
    assert not torch.allclose(cond.tokens[0], cond.tokens[1])


def test_perceiver_output_does_not_depend_on_padding():
    head, captions = PerceiverResampler(TEXT_DIM, COND_DIM, heads=4).eval(), text()
    cond, padded = head(captions), head(with_garbage_padding(captions))
    torch.testing.assert_close(padded.tokens, cond.tokens)
    torch.testing.assert_close(padded.vector, cond.vector)
    # a row alone gives what it gives in a batch padded to a longer caption
    torch.testing.assert_close(head(captions[2:3].trimmed()).tokens, cond.tokens[2:3])


def test_perceiver_is_finite_for_a_caption_without_real_tokens():
    no_tokens = torch.zeros(2, 4, dtype=torch.bool)
    empty = TextEmbedding(torch.randn(2, 4, TEXT_DIM), no_tokens, torch.randn(2, TEXT_DIM))
    assert torch.isfinite(PerceiverResampler(TEXT_DIM, COND_DIM, heads=4)(empty).tokens).all()


# --- gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", heads(), ids=HEAD_IDS)
def test_gradients_reach_every_parameter(head):
    cond = head(text())
    loss = cond.vector.square().sum() + (0 if cond.tokens is None else cond.tokens.square().sum())
    loss.backward()
    missing = [name for name, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


# --- configuration errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "settings", "message"),
    [
        (PooledMLP, {"pooling": "max"}, "fusion.pooling='max' is unknown; use one of: mean, last"),
        (PooledMLP, {"norm": "batch"}, "fusion.norm='batch' is not a normalisation; use one of"),
        (PerceiverResampler, {"heads": 5}, "fusion.heads=5 does not divide fusion.out_dim=32; choose heads"),
    ],
)
def test_bad_settings_are_one_line_config_errors(head, settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        head(TEXT_DIM, COND_DIM, **settings)
    assert "\n" not in str(error.value)


# --- with the generators, built from their debug=smoke configs ----------------------------------------------


def smoke_pair(tmp_path: Path, fusion: str, generator: str, *extra: str) -> tuple[FusionHead, Generator]:
    """Head and generator of a debug=smoke config, built (and checked) as train.build_model builds them."""
    cfg = compose_train(tmp_path, ["debug=smoke", f"fusion={fusion}", f"generator={generator}", *extra])
    torch.manual_seed(0)
    backend = instantiate(cfg.generator)
    return build_fusion(cfg.fusion, backend, fusion, generator), backend


def first_stage(generator: str, tiny_first_stage: Path) -> list[str]:
    return [f"generator.first_stage.source={tiny_first_stage}"] if generator == "ldm" else []


# Generator variants, by their overrides; and the pairings that cannot work, with what their error says.
BACKENDS = {
    "diffusion": [], "diffusion-time_vector": ["generator.time_vector=true"], "ldm": [], "gan": [],
    "dit": [], "dit-time_vector": ["generator.time_vector=true"],
    "gan-attention": ["generator.attention=true", "generator.attention_resolution=8"], "vae": [],
    "vae-unconditional": ["generator.conditional=false"],
}
NO_FILM_LAYERS, NO_TIMESTEPS = "has no FiLM layers; use generator=gan or ", "a timestep-aware head needs a generator"
NO_BLOCKS = "the generator has no blocks that read their own tokens; use generator=dit"
BAD_PAIRS = {
    **{("deep", backend): NO_BLOCKS for backend in BACKENDS if not backend.startswith("dit")},
    ("pooled_mlp", "diffusion"): "consumes ['tokens']; choose a fusion head that produces tokens",
    ("pooled_mlp", "diffusion-time_vector"): "consumes ['tokens', 'vector']; choose a fusion head that produces tokens",
    ("pooled_mlp", "ldm"): "consumes ['tokens']; choose a fusion head that produces tokens",
    ("pooled_mlp", "gan-attention"): "consumes ['tokens', 'vector']; choose a fusion head that produces tokens",
    ("film", "diffusion"): NO_FILM_LAYERS + "a head that produces tokens",
    ("film", "diffusion-time_vector"): NO_FILM_LAYERS + "a head that produces tokens or vector",
    ("film", "ldm"): NO_FILM_LAYERS + "a head that produces tokens",
    ("pooled_mlp", "dit"): "consumes ['tokens']; choose a fusion head that produces tokens",
    ("pooled_mlp", "dit-time_vector"): "consumes ['tokens', 'vector']; choose a fusion head that produces tokens",
    ("film", "dit"): NO_FILM_LAYERS + "a head that produces tokens",
    ("film", "dit-time_vector"): NO_FILM_LAYERS + "a head that produces tokens or vector",
    ("film", "gan-attention"): "consumes ['film', 'tokens']; choose a fusion head that produces tokens",
    ("film", "vae"): NO_FILM_LAYERS + "a head that produces vector",
    ("film", "vae-unconditional"): NO_FILM_LAYERS + "another fusion head",
    ("timestep_aware", "gan"): NO_TIMESTEPS,
    ("timestep_aware", "gan-attention"): NO_TIMESTEPS,
    ("timestep_aware", "vae"): NO_TIMESTEPS,
    ("timestep_aware", "vae-unconditional"): NO_TIMESTEPS,
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "fusion", ["token_projection", "pooled_mlp", "perceiver", "timestep_aware", "film", "refiner", "deep"]
)
def test_compatibility_with_each_backend(fusion, backend, tmp_path, tiny_first_stage):
    """Every pairing that can work builds; every other one fails at build time in one line naming both."""
    generator = backend.split("-")[0]
    overrides = BACKENDS[backend] + first_stage(generator, tiny_first_stage)

    def build() -> None:
        smoke_pair(tmp_path, fusion, generator, *overrides)  # build_fusion checks the pairing

    if (fusion, backend) not in BAD_PAIRS:
        build()
        return
    with pytest.raises(ConfigError) as error:
        build()
    message = str(error.value)
    assert message.startswith(f"fusion={fusion} with generator={generator}: ") and "\n" not in message
    assert BAD_PAIRS[fusion, backend] in message


@pytest.mark.parametrize("generator", ["diffusion", "ldm"])
def test_pooled_mlp_with_a_token_backend_fails_at_build_naming_both(
    generator, tmp_path, imagefolder, tiny_first_stage
):
    overrides = smoke_overrides(imagefolder, "fusion=pooled_mlp", f"generator={generator}")
    cfg = compose_train(tmp_path, overrides + first_stage(generator, tiny_first_stage))
    with pytest.raises(SystemExit) as exc:
        train(cfg)
    assert str(exc.value.code) == (
        f"text2img: error: fusion=pooled_mlp with generator={generator}: the head produces ['vector'] "
        "but the generator consumes ['tokens']; choose a fusion head that produces tokens"
    )
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    ("fusion", "generator", "extra"),
    [
        ("pooled_mlp", "gan", []),
        ("pooled_mlp", "vae", []),
        ("perceiver", "gan", ["generator.attention=true", "generator.attention_resolution=8"]),
        ("perceiver", "vae", []),
        ("perceiver", "diffusion", []),
        ("timestep_aware", "diffusion", []),
        ("token_projection", "diffusion", ["generator.time_vector=true"]),
        ("film", "gan", []),
        ("refiner", "dit", []),
        ("refiner", "diffusion", ["fusion.timestep_conditioned=true", "fusion.norm=rms_scaled"]),
    ],
)
def test_optimisation_steps_train_the_head(fusion, generator, extra, tmp_path):
    head, backend = smoke_pair(tmp_path, fusion, generator, *extra)
    captions = text(dim=head.in_dim)
    size = backend.image_size
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def loss() -> torch.Tensor:
        if isinstance(backend, GANGenerator):
            noise = backend.training_noise(len(captions), torch.device("cpu"))
            return backend.generator_loss(backend.fake(captions, head, noise), captions)
        return backend.training_loss(images, captions, head)

    before = {name: p.detach().clone() for name, p in head.named_parameters()}
    optimizer = torch.optim.Adam([*head.parameters(), *backend.parameters()], lr=1e-3)
    # The GAN's FiLM and attention, the film head's output layers and the timestep modulation start at zero:
    # what feeds them has no gradient until a first step has moved them.
    zero_start = isinstance(backend, GANGenerator) or fusion in ("timestep_aware", "film")
    # The refiner's blocks end at zero: their outputs move first, then what feeds them, then the timestep embedding.
    for _ in range(3 if fusion == "refiner" else 2 if zero_start else 1):
        optimizer.zero_grad()
        value = loss()
        assert torch.isfinite(value)
        value.backward()
        optimizer.step()
    unchanged = [name for name, p in head.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"{fusion} with {generator}: training left {unchanged} unchanged"


# --- export -------------------------------------------------------------------------------------------------


def test_perceiver_exports_with_dynamic_batch_and_length(tmp_path):
    head = PerceiverResampler(TEXT_DIM, COND_DIM, num_latents=5, heads=4).eval()
    path = tmp_path / "fusion" / "fusion.pt2"
    export_fusion(head, torch.int64, path)
    program = torch.export.load(path).module()
    # shapes other than the (2, 3) example the program was traced with
    for batch, length, real in [(3, 6, (6, 4, 1)), (1, 13, (9,)), (4, 1, (1, 1, 1, 1))]:
        captions = text(batch, length, real)
        timestep = torch.zeros(batch, dtype=torch.int64)
        tokens, mask = program(captions.tokens, captions.mask, captions.pooled, timestep)
        expected = head(captions)
        torch.testing.assert_close(tokens, expected.tokens)
        assert torch.equal(mask, expected.mask)


# --- timestep_aware -----------------------------------------------------------------------------------------


def timestep_aware_from(plain: PerceiverResampler) -> TimestepAwarePerceiver:
    """A timestep-aware head holding `plain`'s weights (its own timestep layers freshly initialised)."""
    head = TimestepAwarePerceiver(TEXT_DIM, COND_DIM, num_latents=5, depth=2, heads=4, time_channels=16, time_dim=8)
    missing, unexpected = head.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("modulation" in name or name.startswith("time_") for name in missing)
    return head


def test_timestep_aware_starts_as_the_plain_perceiver_and_learns_to_depend_on_the_timestep():
    torch.manual_seed(0)
    plain = PerceiverResampler(TEXT_DIM, COND_DIM, num_latents=5, depth=2, heads=4)
    head, captions = timestep_aware_from(plain), text()
    early, late = torch.full((3,), 999), torch.tensor([0, 10, 20])
    for timestep in (early, late, torch.tensor([3.5, 700.0, 1.0])):  # the samplers' int64, or floats
        cond = head(captions, timestep)
        torch.testing.assert_close(cond.tokens, plain(captions).tokens, rtol=0, atol=0)
        torch.testing.assert_close(cond.vector, plain(captions).vector, rtol=0, atol=0)
    # one step towards different targets at different timesteps: the output now depends on the timestep
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    loss = head(captions, early).tokens.sub(1).square().mean() + head(captions, late).tokens.add(1).square().mean()
    loss.backward()
    optimizer.step()
    assert not torch.allclose(head(captions, early).tokens, head(captions, late).tokens)


def test_timestep_aware_broadcasts_a_scalar_timestep_and_needs_one():
    head, captions = TimestepAwarePerceiver(TEXT_DIM, COND_DIM, heads=4).eval(), text()
    for parameter in head.parameters():  # away from the zero start, so the timestep matters
        parameter.data.add_(torch.randn_like(parameter) * 0.1)
    expected = head(captions, torch.full((3,), 250)).tokens
    torch.testing.assert_close(head(captions, torch.tensor(250)).tokens, expected)
    torch.testing.assert_close(head(captions, torch.tensor(250).expand(3)).tokens, expected)
    with pytest.raises(ValueError, match="needs the diffusion timestep"):
        head(captions)


def test_timestep_aware_exports_with_dynamic_batch_and_length(tmp_path):
    head = TimestepAwarePerceiver(TEXT_DIM, COND_DIM, num_latents=5, heads=4).eval()
    for parameter in head.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.1)
    export_fusion(head, torch.int64, tmp_path / "fusion.pt2")
    program = torch.export.load(tmp_path / "fusion.pt2").module()
    outputs = []
    for batch, length, real in [(3, 6, (6, 4, 1)), (1, 13, (9,))]:
        captions = text(batch, length, real)
        for timestep in (torch.full((batch,), 900), torch.arange(batch) * 7):
            tokens, mask = program(captions.tokens, captions.mask, captions.pooled, timestep)
            torch.testing.assert_close(tokens, head(captions, timestep).tokens)
            outputs.append(tokens)
    assert not torch.allclose(outputs[0], outputs[1])  # the program reads the timestep


# --- film ---------------------------------------------------------------------------------------------------


def test_film_head_gives_one_unit_scale_and_zero_shift_per_layer_at_start():
    head = FiLMHead(TEXT_DIM, COND_DIM, film_channels=[8, 8, 16], hidden_dim=16)
    cond = head(text())
    assert cond.tokens is None and cond.vector is None and len(cond.film) == 3
    for (scale, shift), channels in zip(cond.film, [8, 8, 16]):
        assert scale.shape == shift.shape == (3, channels)
        assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(shift, torch.zeros_like(shift))
    with pytest.raises(ConfigError, match="fusion.film_channels is not set; build the head with"):
        FiLMHead(TEXT_DIM, COND_DIM)


def test_film_head_drives_the_gans_film_layers(tmp_path):
    cfg = compose_train(tmp_path, ["debug=smoke", "fusion=film", "generator=gan"])
    torch.manual_seed(0)
    gan = instantiate(cfg.generator)
    vector_gan = copy.deepcopy(gan)  # the same weights, its FiLM predicted from the vector
    head = build_fusion(cfg.fusion, gan, "film", "gan")
    assert head.film_channels == gan.film_channels and len(gan.film_channels) == 4 * len(gan.net.blocks)
    assert gan.requires == {"film"} and not any(".mlp." in name for name, _ in gan.net.named_parameters())
    captions, noise = text(dim=head.in_dim), torch.randn(3, gan.noise_dim, generator=torch.Generator().manual_seed(2))
    unmodulated = Conditioning(film=tuple((torch.ones(3, c), torch.zeros(3, c)) for c in gan.film_channels))
    # zero-initialised: exactly the unmodulated generator, which is also where the vector-driven GAN starts
    start = gan.net(noise, head(captions))
    assert torch.equal(start, gan.net(noise, unmodulated))
    vector = Conditioning(vector=torch.randn(3, gan.cond_dim))
    torch.testing.assert_close(start, vector_gan.net(noise, vector))
    # the head's parameters do reach the image, one layer at a time
    with torch.no_grad():
        head.to_film[-1].bias[0] = 0.5
    assert not torch.allclose(gan.net(noise, head(captions)), start)
    # and every parameter of head and generator network trains (no predictor is left unused)
    optimizer = torch.optim.SGD([*head.parameters(), *gan.net.parameters()], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        gan.generator_loss(gan.fake(captions, head, noise), captions).backward()
        optimizer.step()
    params = [*head.named_parameters(), *gan.net.named_parameters()]
    missing = [name for name, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


# --- generator.time_vector ----------------------------------------------------------------------------------


def test_time_vector_adds_the_vector_to_the_unets_timestep_embedding(tmp_path):
    _, plain = smoke_pair(tmp_path, "token_projection", "diffusion")
    head, generator = smoke_pair(tmp_path, "token_projection", "diffusion", "generator.time_vector=true")
    assert isinstance(generator, DiffusionGenerator) and generator.requires == {"tokens", "vector"}
    assert plain.denoiser.unet.config.class_embed_type is None
    assert generator.denoiser.unet.config.class_embed_type == "projection"
    unet = generator.denoiser.unet.eval()
    size = unet.config.sample_size
    x, t = torch.randn(2, unet.config.in_channels, size, size), torch.tensor([10, 500])
    cond = head(text(2, 6, (6, 3), dim=head.in_dim))

    def predict(vector: torch.Tensor) -> torch.Tensor:
        return unet(x, t, cond.tokens, encoder_attention_mask=cond.mask, class_labels=vector).sample

    assert not torch.allclose(predict(cond.vector), predict(cond.vector.flip(0)))
    with pytest.raises(ValueError, match="class_labels should be provided"):
        unet(x, t, cond.tokens, encoder_attention_mask=cond.mask)


# --- refiner ------------------------------------------------------------------------------------------------


def moved(head: FusionHead) -> FusionHead:
    """`head` with every weight nudged away from its start (a refiner starts as the identity)."""
    generator = torch.Generator().manual_seed(3)
    for parameter in head.parameters():
        parameter.data.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return head


def test_refiner_starts_as_the_token_projection_with_the_same_weights():
    torch.manual_seed(0)
    refiner = TokenRefiner(TEXT_DIM, COND_DIM, depth=2, heads=4)
    projection = TokenProjection(TEXT_DIM, COND_DIM)
    projection.norm.load_state_dict(refiner.norm.state_dict())
    projection.proj[1].load_state_dict(refiner.proj.state_dict())
    captions = text()
    torch.testing.assert_close(refiner(captions).tokens, projection(captions).tokens, rtol=0, atol=0)


def test_refined_tokens_read_the_whole_caption_and_ignore_padding():
    head, captions = moved(TokenRefiner(TEXT_DIM, COND_DIM, depth=2, heads=4)).eval(), text()
    cond = head(captions)
    assert cond.tokens.shape == (3, 6, COND_DIM) and torch.equal(cond.mask, captions.mask)
    assert not cond.tokens[~captions.mask].any()
    padded = head(with_garbage_padding(captions))
    torch.testing.assert_close(padded.tokens[:, :6], cond.tokens)
    torch.testing.assert_close(padded.vector, cond.vector)
    # bidirectional: the first token's output changes when a later token does (a causal LLM's state would not)
    later = TextEmbedding(captions.tokens.clone(), captions.mask, captions.pooled)
    later.tokens[0, 5] = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(5))
    assert (head(later).tokens[0, 0] - cond.tokens[0, 0]).abs().max() > 1e-3


def test_timestep_conditioned_refiner_depends_on_the_timestep_and_exports(tmp_path):
    head, captions = moved(TokenRefiner(TEXT_DIM, COND_DIM, heads=4, timestep_conditioned=True)).eval(), text()
    assert head.timestep_aware
    with pytest.raises(ValueError, match="needs the diffusion timestep"):
        head(captions)
    early, late = head(captions, torch.full((3,), 900)).tokens, head(captions, torch.tensor(10)).tokens
    assert not torch.allclose(early, late)
    export_fusion(head, torch.int64, tmp_path / "fusion.pt2")
    program = torch.export.load(tmp_path / "fusion.pt2").module()
    for batch, length, real in [(3, 6, (6, 4, 1)), (1, 13, (9,))]:
        captions = text(batch, length, real)
        timestep = torch.arange(batch) * 7
        tokens, _ = program(captions.tokens, captions.mask, captions.pooled, timestep)
        torch.testing.assert_close(tokens, head(captions, timestep).tokens)


def test_a_timestep_conditioned_refiner_needs_a_generator_with_timesteps(tmp_path):
    with pytest.raises(ConfigError, match="fusion=refiner with generator=gan: a timestep-aware head needs"):
        smoke_pair(tmp_path, "refiner", "gan", "fusion.timestep_conditioned=true")


def test_rms_scaled_starts_at_a_hundredth_of_the_rms_norm_and_learns_its_scale():
    norm, features = ScaledRMSNorm(TEXT_DIM), text().tokens
    torch.testing.assert_close(norm(features), torch.nn.functional.rms_norm(features, (TEXT_DIM,)) * 0.01)
    head = TokenProjection(TEXT_DIM, COND_DIM, norm="rms_scaled")
    head(text()).tokens.square().sum().backward()
    assert head.norm.scale.grad is not None and head.norm.scale.grad.abs() > 0


# --- a learned average of the layers --------------------------------------------------------------------------


def three_layers(batch: int = 3) -> TextEmbedding:
    """Text whose features are three layers of TEXT_DIM side by side (encoder.combine=concat)."""
    captions = text(batch, dim=3 * TEXT_DIM)
    return captions


@pytest.mark.parametrize(
    "head",
    [
        partial(TokenProjection), partial(TokenRefiner, heads=4), partial(PerceiverResampler, num_latents=5, heads=4),
        partial(PooledMLP, pooling="mean"),
    ],
    ids=["token_projection", "refiner", "perceiver", "pooled_mlp"],
)
def test_layer_mix_starts_as_the_plain_average_of_the_layers_and_learns_its_weights(head):
    torch.manual_seed(0)
    mixed = head(3 * TEXT_DIM, COND_DIM, layer_mix="softmax", layer_width=TEXT_DIM)
    plain = head(TEXT_DIM, COND_DIM)
    assert mixed.text_dim == TEXT_DIM
    own = {name: value for name, value in mixed.state_dict().items() if not name.startswith("layer_mix.")}
    plain.load_state_dict(own)
    captions = three_layers()
    layers = captions.tokens.unflatten(-1, (3, TEXT_DIM))
    average = TextEmbedding(layers.mean(-2), captions.mask, captions.pooled.unflatten(-1, (3, TEXT_DIM)).mean(-2))
    out, expected = mixed(captions), plain(average)
    field = "vector" if out.tokens is None else "tokens"
    torch.testing.assert_close(getattr(out, field), getattr(expected, field))
    # a step moves the weights, which stay a softmax
    getattr(mixed(captions), field).square().sum().backward()
    torch.optim.SGD(mixed.layer_mix.parameters(), lr=1.0).step()
    weights = mixed.layer_mix.weights()
    assert not torch.allclose(weights, torch.full((3,), 1 / 3)) and float(weights.sum()) == pytest.approx(1.0)


def test_layer_mix_needs_several_layers_side_by_side():
    with pytest.raises(ConfigError, match="fusion.layer_mix=softmax averages several layers, but the text has 24"):
        TokenProjection(TEXT_DIM, COND_DIM, layer_mix="softmax", layer_width=TEXT_DIM)
    with pytest.raises(ConfigError, match="fusion.layer_mix='max' is unknown; use one of: none, softmax"):
        TokenProjection(TEXT_DIM, COND_DIM, layer_mix="max")


def test_a_mixed_head_on_concatenated_layers_starts_as_the_head_on_their_mean():
    """encoder.combine=concat + fusion.layer_mix=softmax starts where encoder.combine=mean is: the two paths agree."""
    from text2img.encoders import TinyEncoder

    captions = ["a red circle", "two blue squares at the top", ""]
    joined = TinyEncoder(layers="all", combine="concat", num_layers=2).encode(captions)
    averaged = TinyEncoder(layers="all").encode(captions)
    torch.manual_seed(0)
    mixed = TokenProjection(2 * 64, COND_DIM, layer_mix="softmax", layer_width=64)
    plain = TokenProjection(64, COND_DIM)
    plain.load_state_dict({k: v for k, v in mixed.state_dict().items() if not k.startswith("layer_mix.")})
    torch.testing.assert_close(mixed(joined).tokens, plain(averaged).tokens)
