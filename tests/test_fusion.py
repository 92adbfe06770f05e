"""Fusion heads pooled_mlp and perceiver: shapes, masks, gradients, export, the generators they can drive."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_train, smoke_overrides
from text2img.errors import ConfigError
from text2img.export import export_fusion
from text2img.fusion import FusionHead, PerceiverResampler, PooledMLP
from text2img.generators import GANGenerator, Generator, check_compatible
from text2img.train import train
from text2img.types import TextEmbedding

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
    cfg = compose_train(tmp_path, ["debug=smoke", f"fusion={fusion}", f"generator={generator}", *extra])
    torch.manual_seed(0)
    return instantiate(cfg.fusion), instantiate(cfg.generator)


def first_stage(generator: str, tiny_first_stage: Path) -> list[str]:
    return [f"generator.first_stage.source={tiny_first_stage}"] if generator == "ldm" else []


@pytest.mark.parametrize("generator", ["diffusion", "ldm", "gan", "vae"])
@pytest.mark.parametrize("fusion", ["pooled_mlp", "perceiver"])
def test_compatibility_with_each_backend(fusion, generator, tmp_path, tiny_first_stage):
    head, backend = smoke_pair(tmp_path, fusion, generator, *first_stage(generator, tiny_first_stage))
    if fusion == "pooled_mlp" and generator in ("diffusion", "ldm"):
        expected = r"produces \['vector'\] but the generator consumes \['tokens'\]"
        with pytest.raises(ConfigError, match=expected):
            check_compatible(head, backend, fusion, generator)
    else:
        check_compatible(head, backend, fusion, generator)


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
        "but the generator consumes ['tokens']; choose a fusion head that produces one of those"
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
    # The GAN's FiLM and attention start as the identity (zero last layers): the text has no gradient until
    # a first step has moved them.
    for _ in range(2 if isinstance(backend, GANGenerator) else 1):
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
