"""Every option of every config group composes, and builds with hydra.utils.instantiate."""

import pytest
import torch
from diffusers import DDPMScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_train, write_tiny_autoencoder
from text2img.encoders.base import TextEncoder
from text2img.fusion.base import FusionHead
from text2img.generators.base import Generator
from text2img.lightning import Text2ImgModule
from text2img.metrics import EvalMetric
from text2img.generators import build_fusion
from text2img.run.compose import build_data, build_model

GROUPS = [
    "encoder", "peft", "prompt_expansion", "fusion", "generator", "generator_peft", "model", "data", "trainer",
    "logger", "extractor", "metrics", "callbacks", "debug", "experiment",
]
# Options that need a value only the user can give.
REQUIRED = {
    "encoder=hf": ["encoder.model=some/model", "encoder.hidden_size=64", "encoder.num_layers=2"],
    "model=gan": ["generator=gan"],  # the adversarial module trains only a GAN (generator=gan selects it)
    "fusion=film": ["generator=gan"],  # FiLM layers for its scales and shifts: the GAN's
    "fusion=pooled_mlp": ["generator=vae"],  # one vector, no tokens: the default UNet cross-attends to tokens
    "fusion=deep": ["generator=dit", "encoder.layers=[-3,-2,-1]", "encoder.combine=concat"],  # layers into DiT blocks
    "peft=lora": ["encoder=tiny"],  # builds the model, which loads an encoder that trains
}
# Latent diffusion needs a first stage: a tiny local one here (training without one says how to get one).
NEEDS_FIRST_STAGE = {"generator=ldm"}
NEEDS_GPU = {
    "trainer=gpu", "trainer=ddp", "trainer=fsdp", "experiment=openmoji_gpu", "experiment=webdataset_dit_gpu",
}
# Options whose weights or dependencies cannot exist on the test machine: building them must say what is missing.
UNAVAILABLE = {
    "extractor=inception": "extractor=inception needs torch-fidelity",
    "metrics=clip_score": "metrics.clip_score.model",
    "data=webdataset": "train_shards",  # shards only the user has (tests/test_webdataset.py writes some)
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


ALL = [f"{g}={o}" for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    for group in GROUPS + ["paths", "hydra"]:
        assert (CONF_DIR / group).is_dir(), group
    assert all(options(g) for g in GROUPS)


@pytest.mark.parametrize("override", ALL)
def test_option_composes_and_instantiates(override, tmp_path, imagefolder, tiny_first_stage):
    extra = REQUIRED.get(override, [])
    if override.startswith("data=imagefolder"):
        extra = [f"data.source.path={imagefolder}"]
    if override in NEEDS_FIRST_STAGE:
        extra = [f"generator.first_stage.source={tiny_first_stage}"]
    cfg = compose_train(tmp_path, [override, *extra])
    group = override.split("=")[0]
    if override in NEEDS_GPU:
        # No GPU here: check the composed values instead of building a Trainer.
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        return
    if override in UNAVAILABLE:
        with pytest.raises(Exception, match=UNAVAILABLE[override]):
            instantiate(cfg[group])
        return
    if group == "encoder":
        encoder = instantiate(cfg.encoder)
        assert isinstance(encoder, TextEncoder) and not encoder.is_loaded
        assert encoder.hidden_size == cfg.encoder.hidden_size
    elif group == "fusion":
        assert isinstance(build_fusion(cfg.fusion, instantiate(cfg.generator), override, "generator"), FusionHead)
    elif group == "generator":
        assert isinstance(instantiate(cfg.generator), Generator)
    elif group in ("model", "peft", "generator_peft"):
        datamodule, model = build_model(cfg)
        assert isinstance(model, Text2ImgModule) and model.generator.image_size == cfg.data.source.image_size
    elif group == "extractor":
        extractor = instantiate(cfg.extractor)
        assert extractor(torch.rand(1, 3, 32, 32)).shape == (1, extractor.num_features)
    elif group == "metrics":
        (metric,) = instantiate(cfg.metrics).values()
        assert isinstance(metric, EvalMetric)
    elif group == "data":
        datamodule = build_data(cfg)
        assert len(datamodule.source.split("train")) > 0
    elif group in ("logger", "callbacks"):
        built = [instantiate(v) for v in (cfg.get(group) or {}).values() if v is not None]
        assert len(built) == len([v for v in (cfg.get(group) or {}).values() if v is not None])
    elif group == "trainer":
        trainer = instantiate(cfg.trainer)
        assert trainer.max_steps == cfg.trainer.max_steps
    elif group == "debug":
        assert cfg.trainer.get("fast_dev_run") or cfg.trainer.max_steps < 100


# The generator's own groups (conf/generator/<group>/), each option with the generator that takes it and what it needs.
NESTED = {
    "generator/denoiser=unet": ["generator=diffusion"],
    "generator/denoiser=dit": ["generator=diffusion"],
    "generator/first_stage=autoencoder": ["generator=ldm", "generator.first_stage.source={first_stage}"],
    "generator/first_stage=patch_pca": ["generator=ldm"],
    "generator/noise_scheduler=ddpm": ["generator=diffusion"],
    "generator/noise_scheduler=pretrained": ["generator=diffusion", "generator.noise_scheduler.source={pipeline}"],
}


def test_every_nested_generator_option_is_listed():
    nested = [p.name for p in (CONF_DIR / "generator").iterdir() if p.is_dir()]
    found = {f"generator/{group}={option}" for group in nested for option in options(f"generator/{group}")}
    assert found == set(NESTED)


@pytest.mark.parametrize("override", NESTED)
def test_nested_generator_option_composes_and_instantiates(override, tmp_path, tiny_first_stage):
    DDPMScheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path / "pipeline" / "scheduler")
    extra = [o.format(first_stage=tiny_first_stage, pipeline=tmp_path / "pipeline") for o in NESTED[override]]
    cfg = compose_train(tmp_path, [*extra, override])
    generator = instantiate(cfg.generator)
    assert isinstance(generator, Generator)
    group, option = override.removeprefix("generator/").split("=")
    if group == "denoiser":
        assert type(generator.denoiser).__name__ == {"unet": "UNetDenoiser", "dit": "DiTDenoiser"}[option]
    elif group == "first_stage":
        autoencoder = type(generator.first_stage.autoencoder).__name__
        assert autoencoder == {"autoencoder": "AutoencoderKL", "patch_pca": "PatchAutoencoder"}[option]
    else:  # the pretrained pipeline's betas, or the configured DDPM schedule
        expected = "scaled_linear" if option == "pretrained" else cfg.generator.noise_scheduler.beta_schedule
        assert generator.noise_scheduler.config.beta_schedule == expected


@pytest.mark.parametrize("generator", options("generator"))
def test_every_generator_has_a_small_smoke_variant(generator, tmp_path, tiny_first_stage):
    """debug=smoke shrinks whichever generator is chosen (conf/generator_debug/<generator>_smoke.yaml)."""
    option = [f"generator={generator}"]
    if option[0] in NEEDS_FIRST_STAGE:
        option.append(f"generator.first_stage.source={tiny_first_stage}")
    full = sum(p.numel() for p in instantiate(compose_train(tmp_path, option).generator).parameters())
    cfg = compose_train(tmp_path, [*option, "debug=smoke"])
    smoke = sum(p.numel() for p in instantiate(cfg.generator).parameters())
    assert smoke < full / 4, f"generator={generator} debug=smoke has {smoke} parameters (full size {full})"


def test_the_real_corpus_preset_builds_offline(tmp_path):
    """experiment=webdataset_dit_gpu composes without touching the hub (its first stage is a hub name, loaded
    when the model is built) and, given shards and a local f8 first stage, builds: a DiT-B-sized latent DiT
    over 2x2 patches of 4x32x32 latents of 256-px images, trained with rectified flow, and the streamed data
    module."""
    from test_webdataset import write_shards

    from text2img.generators.denoisers import DiTDenoiser
    from text2img.generators.flow import RectifiedFlow
    from text2img.generators.latent_diffusion import LatentDiffusionGenerator
    from text2img.lightning import WebDataModule

    cfg = compose_train(tmp_path, ["experiment=webdataset_dit_gpu", "trainer.devices=8"])
    assert cfg.generator.first_stage.source == "stabilityai/sd-vae-ft-mse"
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.precision) == (
        "ddp_find_unused_parameters_true", 8, "bf16-mixed")
    assert cfg.generator.first_stage.dtype == "bfloat16"  # the frozen VAE follows trainer.precision

    write_shards(tmp_path / "shards", "train", 2, 4)
    write_shards(tmp_path / "shards", "val", 1, 4)
    first_stage = write_tiny_autoencoder(tmp_path / "first_stage", levels=4)  # f8, as the SD VAE
    cfg = compose_train(tmp_path, [
        "experiment=webdataset_dit_gpu", f"generator.first_stage.source={first_stage}",
        f"data.source.train_shards='{tmp_path}/shards/train-{{00000..00001}}.tar'",
        f"data.source.val_shards={tmp_path}/shards/val-00000.tar",
        f"data.source.test_shards={tmp_path}/shards/val-00000.tar",
    ])
    generator = instantiate(cfg.generator)
    assert isinstance(generator, LatentDiffusionGenerator) and isinstance(generator.flow, RectifiedFlow)
    assert generator.flow.timesteps == "logit_normal"
    assert generator.model_size == 32 and generator.image_size == 256
    denoiser = generator.denoiser
    assert isinstance(denoiser, DiTDenoiser) and denoiser.transformer.config.patch_size == 2
    assert len(denoiser.transformer.transformer_blocks) == 12 and denoiser.transformer.inner_dim == 768
    assert 100e6 < sum(p.numel() for p in denoiser.parameters()) < 160e6  # DiT-B class (DiT-B/2: 130M)
    datamodule = build_data(cfg)
    assert isinstance(datamodule, WebDataModule) and datamodule.source.image_size == 256
    assert len(datamodule.source.split("val")) == 4


def test_default_config_wires_dimensions(tmp_path):
    """Switching encoder= (or concatenating its layers) changes the fusion head's input size and nothing else needs
    editing."""
    cases = [(["encoder=smollm2"], 576), (["encoder=minilm"], 384), (["encoder=tiny"], 64)]
    cases.append((["encoder=smollm2", "encoder.layers=[10,20,30]", "encoder.combine=concat"], 3 * 576))
    for overrides, features in cases:
        cfg = compose_train(tmp_path, overrides)
        assert cfg.fusion.in_dim == cfg.encoder.features == cfg.model.text_dim == features
        assert instantiate(cfg.encoder).features == features
        assert cfg.fusion.out_dim == cfg.generator.cond_dim
        fusion, generator = instantiate(cfg.fusion), instantiate(cfg.generator)
        text = torch.randn(2, 5, features)
        from text2img.types import TextEmbedding

        cond = fusion(TextEmbedding(text, torch.ones(2, 5, dtype=torch.bool), text[:, 0]))
        assert cond.tokens.shape == (2, 5, generator.cond_dim)


def test_cli_prints_composed_config(entry_point):
    out = entry_point("train", "--cfg", "job", "encoder=minilm")
    assert out.returncode == 0, out.stderr
    assert "_target_: text2img.encoders.MiniLMEncoder" in out.stdout
    assert "in_dim: ${encoder.features}" in out.stdout


def test_the_openmoji_ldm_flow_preset_is_openmoji_ldm_on_openmoji_dits_objective_and_sampler(tmp_path):
    """experiment=openmoji_ldm_flow changes openmoji_ldm's objective and sampling only, to openmoji_dit's: the
    backends study's UNet and DiT then differ in the denoiser alone."""
    presets = ("openmoji_ldm", "openmoji_ldm_flow", "openmoji_dit")
    ldm, flow, dit = (compose_train(tmp_path, [f"experiment={name}"]) for name in presets)
    sampling = ("objective", "sample_steps", "guidance_scale")
    assert [flow.generator[key] for key in sampling] == ["flow", 20, 5.0]
    assert [dit.generator[key] for key in sampling] == [flow.generator[key] for key in sampling]

    def rest(cfg):
        generator = OmegaConf.to_container(cfg.generator)
        return {key: value for key, value in generator.items() if key not in sampling}

    assert rest(flow) == rest(ldm)
    assert flow.trainer == ldm.trainer and flow.first_stage_run == ldm.first_stage_run


def test_the_budget_preset_is_openmoji_ldm_flow_on_a_patch_code_with_a_dit(tmp_path):
    """experiment=openmoji_ldm_budget (make train's) changes openmoji_ldm_flow's first stage, its denoiser (the UNet
    for the DiT over 2x2 latent patches), the guidance, the learning rate and the length only: the same encoder,
    fusion head, objective, sampler and schedule, so the two compare at their own budgets."""
    from text2img.generators.denoisers import DiTDenoiser
    from text2img.generators.patch_autoencoder import PatchAutoencoder

    flow, budget = (compose_train(tmp_path, [f"experiment={name}"]) for name in ("openmoji_ldm_flow", "openmoji_ldm_budget"))
    assert (budget.trainer.max_steps, budget.trainer.val_check_interval) == (1000, 1000)
    assert (budget.generator.patch_size, flow.generator.patch_size) == (2, 1)
    assert (budget.model.optimizer.lr, flow.model.optimizer.lr) == (3e-3, 1e-3)
    assert (budget.generator.guidance_scale, flow.generator.guidance_scale) == (3.0, 5.0)
    code = instantiate(budget.generator.first_stage).autoencoder
    assert isinstance(code, PatchAutoencoder) and code.config.latent_channels == 8 and code.config.refiner_width == 96
    generator = instantiate(budget.generator)
    assert isinstance(generator.denoiser, DiTDenoiser)
    dit = generator.denoiser.transformer.config
    assert (dit.num_layers, dit.num_attention_heads * dit.attention_head_dim, dit.patch_size) == (6, 128, 2)
    assert (dit.in_channels, dit.sample_size) == (8, 8)  # 8x8 latents of 8 channels: 16 tokens
    for cfg in (flow, budget):
        del cfg.generator.first_stage, cfg.generator.denoiser, cfg.generator.patch_size, cfg.generator.guidance_scale
        del cfg.model.optimizer.lr
        del cfg.trainer.max_steps, cfg.trainer.val_check_interval
    assert budget == flow


def test_the_long_preset_is_the_budget_preset_trained_longer(tmp_path):
    """experiment=openmoji_ldm_long is make train's model for 3,000 steps with no time bound, validated once at the
    end as the runs its README figures come from."""
    budget, long = (compose_train(tmp_path, [f"experiment={name}"]) for name in ("openmoji_ldm_budget", "openmoji_ldm_long"))
    assert (long.trainer.max_steps, long.trainer.val_check_interval, long.trainer.max_time) == (3000, 3000, None)
    for cfg in (budget, long):
        del cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.trainer.max_time
    assert long == budget


def test_the_openmoji_dit_preset_is_openmoji_ldm_with_a_flow_dit(tmp_path, tiny_first_stage):
    """experiment=openmoji_dit swaps openmoji_ldm's UNet for a DiT on the flow objective and keeps the rest: the
    same nested first-stage run (so both presets share one cached first stage), latent cache and budget."""
    from text2img.generators.denoisers import DiTDenoiser
    from text2img.generators.flow import RectifiedFlow
    from text2img.run.first_stage_run import config_digest

    ldm, dit = (compose_train(tmp_path, [f"experiment={name}"]) for name in ("openmoji_ldm", "openmoji_dit"))
    assert list(dit.first_stage_run.overrides) == list(ldm.first_stage_run.overrides)
    assert config_digest(list(dit.first_stage_run.overrides)) == config_digest(list(ldm.first_stage_run.overrides))
    assert (dit.trainer.max_steps, dit.trainer.max_time, dit.generator.cache_latents) == (
        ldm.trainer.max_steps, ldm.trainer.max_time, ldm.generator.cache_latents)
    cfg = compose_train(tmp_path, ["experiment=openmoji_dit", f"generator.first_stage.source={tiny_first_stage}"])
    generator = instantiate(cfg.generator)
    assert isinstance(generator.denoiser, DiTDenoiser) and isinstance(generator.flow, RectifiedFlow)
    assert generator.flow.timesteps == "logit_normal" and generator.patch_size == 1
