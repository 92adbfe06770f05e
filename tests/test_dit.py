"""generator=dit: the diffusion transformer denoiser, in pixel and latent space, with every fusion head that gives
tokens, its vector path, LoRA, FSDP wrapping, export, sampling and resume; and the denoiser abstraction's upgrade
of configs and checkpoints written before it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_train, smoke_overrides
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.normalization import AdaLayerNormSingle
from hydra.utils import instantiate
from test_resume import Crash, assert_same_state, checkpoint, losses, run_overrides, stop_at

from text2img.conditioning import TextConditioner
from text2img.encoders import TinyEncoder
from text2img.errors import ConfigError
from text2img.export import write_export
from text2img.fusion import DeepFusion, FusionHead, TimestepAwarePerceiver
from text2img.fusion.deep import evenly_spaced
from text2img.generators import DiffusionGenerator, build_fusion
from text2img.generators.denoisers import DiTDenoiser, UNetDenoiser
from text2img.lightning import Text2ImgModule
from text2img.lightning.distributed import BlockWrapPolicy
from text2img.pipeline import Text2ImgPipeline
from text2img.train import train
from text2img.types import TextEmbedding
from text2img.utils.lora import LoraSettings, add_lora, has_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red square", "a blue circle number 7", "", "a yellow triangle number 12 with a long tail"]
SEEDS = [3, 1, 4, 1]
FUSIONS = sorted(path.stem for path in (CONF_DIR / "fusion").glob("*.yaml"))
DiT = partial(PixArtTransformer2DModel, use_additional_conditions=False)


def tiny_dit(channels: int = 3, size: int = 16, patch_size: int = 2, time_vector: bool = False) -> DiTDenoiser:
    torch.manual_seed(0)
    return DiTDenoiser(DiT, depth=2, width=32, heads=2, channels=channels, size=size, cond_dim=24,
                       patch_size=patch_size, time_vector=time_vector)


def tiny_kwargs(**changes) -> dict:
    """generator=dit's arguments on 16-px images with a two-block DiT, conditioning of 32 features."""
    return dict(
        denoiser=partial(DiTDenoiser, DiT, depth=2, width=32, heads=2),
        noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="epsilon"),
        sampler=DPMSolverMultistepScheduler, image_size=16, cond_dim=32, patch_size=2, sample_steps=3,
        guidance_scale=2.0,
    ) | changes


def tiny_generator(time_vector: bool = False) -> DiffusionGenerator:
    torch.manual_seed(0)
    return DiffusionGenerator(**tiny_kwargs(time_vector=time_vector))


def text(batch: int = 4, dim: int = 64) -> TextEmbedding:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, 3:] = False  # padding the model must not attend to
    tokens = torch.randn(batch, 6, dim, generator=generator) * mask[..., None]
    return TextEmbedding(tokens, mask, torch.randn(batch, dim, generator=generator))


def smoke_dit(tmp_path: Path, fusion: str, *extra: str) -> tuple[FusionHead, DiffusionGenerator]:
    cfg = compose_train(tmp_path, ["debug=smoke", "generator=dit", f"fusion={fusion}", *extra])
    torch.manual_seed(0)
    generator = instantiate(cfg.generator)
    return build_fusion(cfg.fusion, generator, fusion, "dit"), generator


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_predictions_have_the_shape_of_their_space(space: str, tmp_path: Path, tiny_first_stage: Path) -> None:
    extra = ["generator=ldm", "generator/denoiser=dit", f"generator.first_stage.source={tiny_first_stage}",
             "generator.latent_scale=1.0"] if space == "latent" else ["generator=dit"]
    cfg = compose_train(tmp_path, ["debug=smoke", "data.source.image_size=32", *extra])
    generator = instantiate(cfg.generator)
    assert isinstance(generator.denoiser, DiTDenoiser)
    shape = (2, 4, 8, 8) if space == "latent" else (2, 3, 32, 32)  # the tiny first stage: 4x8x8 latents of 32 px
    assert (generator.model_channels, generator.model_size, generator.model_size) == shape[1:]
    x, t = torch.randn(shape), torch.tensor([5, 900])
    tokens, mask = torch.randn(2, 5, generator.cond_dim), torch.ones(2, 5, dtype=torch.bool)
    assert generator.denoiser(x, t, tokens, mask, None).shape == shape
    assert generator.denoiser.transformer.config.patch_size == generator.patch_size


def test_sizes_that_do_not_divide_fail_in_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        DiffusionGenerator(**tiny_kwargs(patch_size=3))
    assert str(error.value) == (
        "generator.patch_size=3 does not divide the diffusion space's size 16; use one of 1, 2, 4, 8, 16"
    )
    with pytest.raises(ConfigError) as error:
        DiTDenoiser(DiT, depth=2, width=30, heads=4, channels=3, size=16, cond_dim=24, patch_size=2, time_vector=False)
    assert str(error.value) == (
        "generator.denoiser.width=30 does not split into generator.denoiser.heads=4 heads; use heads in "
        "1, 2, 3, 5, 6, 10, 15, 30 or a width that is a multiple of 4"
    )


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_head_with_tokens_trains_a_step_and_the_others_fail_at_build(fusion: str, tmp_path: Path) -> None:
    """The heads that give tokens (the timestep-aware one included) train with the DiT: a step moves the head and
    every block of the transformer; a head without tokens fails at build time in one line naming both options."""
    if fusion in ("pooled_mlp", "film"):
        with pytest.raises(ConfigError) as error:
            smoke_dit(tmp_path, fusion)
        message = str(error.value)
        assert message.startswith(f"fusion={fusion} with generator=dit: ") and "\n" not in message
        assert "produces tokens" in message
        return
    head, generator = smoke_dit(tmp_path, fusion)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    captions = text(3, head.in_dim)
    modules = {"head": head, "dit": generator.denoiser}
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in modules.items()}
    optimizer = torch.optim.Adam([*head.parameters(), *generator.parameters()], lr=1e-3)
    # the timestep-aware head's timestep modulation starts at zero: it has a gradient after a first step; the
    # refiner's blocks end at zero, so what feeds them moves at the second
    for _ in range(2 if head.timestep_aware or fusion == "refiner" else 1):
        optimizer.zero_grad()
        loss = generator.training_loss(images, captions, head)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    for name, module in modules.items():
        changed = [not torch.equal(p, old) for p, old in zip(module.parameters(), before[name])]
        assert all(changed), f"{fusion}: {changed.count(False)} parameters of the {name} did not train"


def test_the_vector_path_adds_the_vector_to_the_timestep_embedding() -> None:
    plain, vector = tiny_dit(), tiny_dit(time_vector=True)
    assert plain.vector_embedding is None
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 24)
    tokens, mask = torch.randn(2, 4, 24), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        out = vector(x, t, tokens, mask, cond)
        assert not torch.allclose(out, vector(x, t, tokens, mask, cond.flip(0)))
        # the same transformer without the vector: the embedding is added for the call only, then gone
        (adaln,) = [m for m in vector.transformer.modules() if isinstance(m, AdaLayerNormSingle)]
        assert not adaln.emb._forward_hooks
        assert not torch.allclose(out, vector(x, t, tokens, mask, None))
        torch.testing.assert_close(plain(x, t, tokens, mask, None), vector(x, t, tokens, mask, None))


def test_a_tiny_dit_overfits_one_batch(tmp_path: Path) -> None:
    head, generator = smoke_dit(tmp_path, "token_projection")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    captions = text(4, head.in_dim)
    optimizer = torch.optim.Adam([*head.parameters(), *generator.parameters()], lr=3e-3)

    def fixed_loss() -> float:  # the same noise and timesteps every time
        torch.manual_seed(7)
        with torch.no_grad():
            return sum(generator.training_loss(images, captions, head).item() for _ in range(4)) / 4

    start = fixed_loss()
    for _ in range(40):
        optimizer.zero_grad()
        generator.training_loss(images, captions, head).backward()
        optimizer.step()
    assert fixed_loss() < 0.7 * start  # 1.09 -> 0.66 in 40 steps (measured)


def test_sampling_is_deterministic_per_seed() -> None:
    generator, head = tiny_generator(time_vector=True).eval(), TimestepAwarePerceiver(64, 32, num_latents=4, heads=4)
    prompts, null = text(), TextEmbedding(torch.zeros(1, 1, 64), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 64))
    null = TextEmbedding(null.tokens.expand(4, 1, 64), null.mask.expand(4, 1), null.pooled.expand(4, 64))

    def draw(seeds: list[int]) -> torch.Tensor:
        return generator.sample(prompts, null, head, [torch.Generator().manual_seed(s) for s in seeds])

    first = draw(SEEDS)
    assert first.shape == (4, 3, 16, 16) and torch.equal(first, draw(SEEDS))
    assert not torch.allclose(first, draw([s + 10 for s in SEEDS]))


def tiny_dit_module(time_vector: bool) -> tuple[Text2ImgModule, TinyEncoder]:
    """A timestep-aware head and the tiny DiT in a module, weights randomised away from their zero starts."""
    head = TimestepAwarePerceiver(64, 32, num_latents=4, heads=4, time_channels=16)
    encoder = TinyEncoder(hidden_size=64, max_length=24)
    model = Text2ImgModule(head, tiny_generator(time_vector), TextConditioner(encoder, "unused"),
                           optimizer=torch.optim.AdamW)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval(), encoder


def test_a_dit_exports_to_a_transformer_folder_with_the_same_images(tmp_path: Path) -> None:
    """A timestep-aware head and the vector path: the fusion program runs at every step and returns the vector."""
    model, encoder = tiny_dit_module(time_vector=True)
    out = write_export(model, encoder, tmp_path / "model")
    assert (out / "transformer" / "config.json").is_file() and not (out / "unet").exists()
    assert (out / "transformer" / "vector_embedding.safetensors").is_file()
    assert PixArtTransformer2DModel.from_pretrained(out / "transformer").state_dict().keys() == (
        model.generator.denoiser.transformer.state_dict().keys()
    )
    pipe = Text2ImgPipeline.from_folder(out)
    images = pipe(PROMPTS, seed=SEEDS, output_type="pt")
    expected = model.generate(encoder.encode(PROMPTS), SEEDS)
    assert images.shape == expected.shape == (4, 3, 16, 16)
    assert torch.equal(images, expected)


def test_lora_adapts_the_dits_attention_and_exports_merged(tmp_path: Path) -> None:
    model, encoder = tiny_dit_module(time_vector=False)
    add_lora(model.generator.lora_module(), LoraSettings(rank=4), "model.generator_lora")
    trainable = [name for name, p in model.generator.named_parameters() if p.requires_grad]
    # both attentions of every block, self and cross: q, k, v and out, A and B
    assert len(trainable) == 2 * 2 * 4 * 2 and all(".attn" in name and "lora_" in name for name in trainable)
    with torch.no_grad():  # LoRA's B starts at zero: move it, so that the adapters change the images
        for name, parameter in model.generator.named_parameters():
            if "lora_B" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    out = write_export(model, encoder, tmp_path / "model")
    assert has_lora(model.generator.denoiser)  # the training model keeps its adapters
    assert not (out / "transformer" / "vector_embedding.safetensors").exists()
    plain = PixArtTransformer2DModel.from_pretrained(out / "transformer")
    assert not any("lora" in name or "base_layer" in name for name in plain.state_dict())
    images = Text2ImgPipeline.from_folder(out)(PROMPTS, seed=SEEDS, output_type="pt")
    expected = model.generate(encoder.encode(PROMPTS), SEEDS)
    assert (images - expected).abs().max() <= 1e-5  # merged weights round differently from base + adapter


def test_fsdp_wraps_each_transformer_block() -> None:
    generator = tiny_generator()
    units = BlockWrapPolicy().units(generator)
    blocks = [m for m in generator.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 2 and all(block in units for block in blocks)


def test_attention_maps_record_the_dits_cross_attention(tmp_path: Path, imagefolder: Path) -> None:
    from text2img.inspect.attention_maps import cross_attention_maps
    from text2img.run.compose import build_model

    _, model = build_model(compose_train(tmp_path, smoke_overrides(imagefolder, "generator=dit")))
    result = cross_attention_maps(model.eval(), "a red square", seed=3)
    assert result.maps.shape[1:] == (32, 32) and len(result.maps) == len(result.tokens)
    torch.testing.assert_close(result.maps.sum(0), torch.ones(32, 32))


def test_configs_and_weights_from_before_denoisers_still_load() -> None:
    """A run config with `generator.unet` (what checkpoints carry) builds the UNet denoiser, and a state dict
    with the UNet at `unet.` loads into it."""
    unet = partial(
        UNet2DConditionModel, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    old = DiffusionGenerator(**tiny_kwargs(denoiser=None, unet=unet))
    assert isinstance(old.denoiser, UNetDenoiser)
    state = {key.replace("denoiser.unet.", "unet."): value.clone() + 1 for key, value in old.state_dict().items()}
    old.load_state_dict(state)
    assert torch.equal(old.denoiser.unet.conv_in.bias, state["unet.conv_in.bias"])
    with pytest.raises(ConfigError, match="give generator.denoiser"):
        DiffusionGenerator(**tiny_kwargs(unet=unet))


def test_a_crashed_dit_run_resumes_at_its_step_with_the_same_weights(tmp_path: Path, imagefolder: Path) -> None:
    reference = tmp_path / "reference"
    train(compose_train(reference, run_overrides(imagefolder, "generator=dit")))
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(compose_train(run, run_overrides(imagefolder, "generator=dit", *stop_at(5))))
    assert checkpoint(run)["global_step"] == 4
    train(compose_train(run, run_overrides(imagefolder, "generator=dit", "ckpt_path=last")))
    assert losses(run) == losses(reference)
    assert_same_state(checkpoint(run), checkpoint(reference))


# --- deep fusion ----------------------------------------------------------------------------------------------


def test_blocks_spread_evenly_over_the_layers_read() -> None:
    assert evenly_spaced(6, 6) == [0, 1, 2, 3, 4, 5]
    assert evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced(3, 6) == [0, 0, 1, 1, 2, 2] and evenly_spaced(4, 1) == [3]
    head = DeepFusion(3 * 16, 24, layer_width=16, blocks=2)
    assert head.layers == 3 and head.block_layers == [0, 2]
    with pytest.raises(ConfigError, match=r"fusion.block_layers=\[0, 3\] must give each of the 2 blocks one of the 3"):
        DeepFusion(3 * 16, 24, layer_width=16, blocks=2, block_layers=[0, 3])
    with pytest.raises(ConfigError, match="fusion.in_dim=40 is not a whole number of layers of fusion.layer_width=16"):
        DeepFusion(40, 24, layer_width=16, blocks=2)


def block_inputs(transformer: PixArtTransformer2DModel) -> tuple[list[torch.Tensor], list]:
    """What each block's cross-attention reads, recorded by forward pre-hooks (and the hooks, to remove)."""
    seen: list[torch.Tensor] = []
    hooks = [
        block.attn2.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
        )
        for block in transformer.transformer_blocks
    ]
    return seen, hooks


def test_each_block_cross_attends_to_its_own_layer() -> None:
    generator = tiny_generator()
    head = DeepFusion(3 * 16, 32, layer_width=16, blocks=2, block_layers=[2, 0])
    captions = text(dim=3 * 16)
    cond = head(captions)
    assert cond.tokens.shape == (4, 6, 2 * 32)
    transformer = generator.denoiser.transformer
    seen, hooks = block_inputs(transformer)
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 50)
    generator.denoiser(x, t, cond.tokens, cond.mask, None)
    for hook in hooks:
        hook.remove()
    layers = captions.tokens.unflatten(-1, (3, 16))
    for block, (layer, norm, projection) in enumerate(zip([2, 0], head.norms, head.projections)):
        expected = projection(norm(layers[..., layer, :])) * captions.mask[..., None]
        torch.testing.assert_close(seen[block], expected)
        torch.testing.assert_close(seen[block], cond.tokens[..., block * 32 : (block + 1) * 32])


def test_deep_fusion_with_one_shared_projection_is_the_plain_dit() -> None:
    """Every block reading the same tokens through the per-block path gives the plain call's prediction."""
    generator = tiny_generator()
    tokens, mask = torch.randn(4, 6, 32), text().mask
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 50)
    plain = generator.denoiser(x, t, tokens, mask, None)
    torch.testing.assert_close(generator.denoiser(x, t, torch.cat([tokens, tokens], -1), mask, None), plain)
    assert not torch.allclose(generator.denoiser(x, t, torch.cat([tokens, -tokens], -1), mask, None), plain)


def test_a_deep_fusion_dit_trains_every_projection_and_exports_with_the_same_images(tmp_path: Path) -> None:
    head = DeepFusion(2 * 64, 32, layer_width=64, blocks=2)
    encoder = TinyEncoder(hidden_size=64, max_length=24, layers=[1, 2], combine="concat")
    model = Text2ImgModule(head, tiny_generator(), TextConditioner(encoder, "unused"), optimizer=torch.optim.AdamW)
    before = [p.detach().clone() for p in head.projections.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model.generator.training_loss(images, encoder.encode(PROMPTS), head).backward()
    optimizer.step()
    assert all(not torch.equal(p, old) for p, old in zip(head.projections.parameters(), before))
    model.eval()
    pipe = Text2ImgPipeline.from_folder(write_export(model, encoder, tmp_path / "model"))
    assert torch.equal(pipe(PROMPTS, seed=SEEDS, output_type="pt"), model.generate(encoder.encode(PROMPTS), SEEDS))


def test_deep_fusion_needs_a_dit_of_its_depth(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fusion=deep with generator=dit: the head routes LLM layers into 3 blocks but the"):
        smoke_dit(tmp_path, "deep", "fusion.blocks=3")
