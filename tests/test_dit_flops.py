"""experiments/bench/dit_flops.py: the FLOP count behind the README's sizing table (counted on the meta
device)."""

import sys

import pytest

from conftest import REPO_ROOT, compose_train, write_tiny_autoencoder

sys.path.insert(0, str(REPO_ROOT / "experiments" / "bench"))
import dit_flops  # noqa: E402

TOKENS, COND, WIDTH, PATCH = 8, 32, 64, 2


def tiny_ldm(tmp_path, depth: int, *extra: str):
    """A latent DiT on a 3-level (f4) tiny first stage: 32-px images -> 4x8x8 latents -> 16 positions."""
    first_stage = tmp_path / "first_stage"
    if not first_stage.is_dir():
        write_tiny_autoencoder(first_stage)
    return compose_train(tmp_path, [
        "generator=ldm", "generator/denoiser=dit", f"generator.first_stage.source={first_stage}",
        f"generator.denoiser.depth={depth}", f"generator.denoiser.width={WIDTH}",
        "generator.denoiser.heads=4",
        f"generator.patch_size={PATCH}", f"generator.cond_dim={COND}", f"encoder.max_length={TOKENS}", *extra,
    ])


def block_forward_flops(positions: int, width: int, tokens: int, cond: int) -> int:
    """A PixArt block's matrix products for one sample, 2 FLOPs per multiply-add: self-attention (q, k, v, o
    and the two attention products), cross-attention (q, o on the positions, k, v on the text tokens, the two
    products) and the 4x MLP."""
    n, d, length = positions, width, tokens
    self_attention = 4 * n * d * d + 2 * n * n * d
    cross_attention = 2 * n * d * d + 2 * length * cond * d + 2 * n * length * d
    mlp = 8 * n * d * d
    return 2 * (self_attention + cross_attention + mlp)


def test_a_dit_block_costs_three_forward_passes_of_its_matrix_products(tmp_path):
    """Each added block adds its forward matrix products x 3 (forward, and backward's input and weight
    gradients): the count sees every product of the block, attention included, and the backward."""
    flops = {depth: dit_flops.step_flops(tiny_ldm(tmp_path, depth), text_encoder=False) for depth in (2, 4)}
    positions = (8 // PATCH) ** 2
    per_block = (flops[4].denoiser - flops[2].denoiser) / 2
    assert per_block == pytest.approx(3 * block_forward_flops(positions, WIDTH, TOKENS, COND), rel=0.02)
    assert flops[4].denoiser_parameters > flops[2].denoiser_parameters
    # the frozen first stage runs forward only, the same for any denoiser
    assert flops[2].first_stage == flops[4].first_stage > 0


def test_cached_latents_drop_the_first_stage_and_rates_follow_the_flops(tmp_path):
    streamed = dit_flops.step_flops(tiny_ldm(tmp_path, 2), text_encoder=False)
    cached = dit_flops.step_flops(tiny_ldm(tmp_path, 2, "generator.cache_latents=true"), text_encoder=False)
    assert cached.first_stage == 0 and cached.denoiser == streamed.denoiser and cached.total < streamed.total
    assert cached.images_per_s(0.4, 1000.0) == pytest.approx(0.4 * 1000e12 / cached.total)
    table = dit_flops.sizing_table(streamed, [0.35], 989.0, gpus=8, images=1e6)
    assert table.count("\n| ") == 2 and "1M images on 8 GPUs at 35%" in table


def test_the_preset_counts_without_the_network(tmp_path):
    """experiment=webdataset_dit_gpu names its first stage by hub name: the count reads the known architecture
    (HF_HUB_OFFLINE=1 in tests), f8 latents of 256 px (32x32), and a DiT-B-sized denoiser."""
    cfg = compose_train(tmp_path, ["experiment=webdataset_dit_gpu"])
    config = dit_flops.first_stage_config(cfg)
    assert config == dit_flops.KNOWN_FIRST_STAGES["stabilityai/sd-vae-ft-mse"]
    _, channels, size = dit_flops.first_stage_flops(config, cfg.data.source.image_size)
    assert (channels, size) == (4, 32)
