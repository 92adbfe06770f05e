"""LoRA with peft: default targets per architecture, freezing, merging, adapter files, export and the callback."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_train, smoke_overrides, write_imagefolder
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import PROMPTS, SEEDS, TOLERANCE, one_line, tiny_latent_module
from torch import Tensor, nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from text2img.callbacks import EMA, AdapterCheckpoint
from text2img.encoders import HFTextEncoder
from text2img.errors import ConfigError
from text2img.export import write_export
from text2img.generators import GANGenerator, VAEGenerator
from text2img.utils.lora import (
    LoraSettings,
    add_lora,
    default_targets,
    has_lora,
    is_lora_parameter,
    load_adapters,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    merged_copy,
    save_adapters,
)
from text2img.pipeline import SETTINGS_FILE, Text2ImgPipeline
from text2img.run.compose import build, build_model
from text2img.types import Conditioning

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64


def tiny_llama() -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaModel(config).eval()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        pad_token_id=0,
    )
    return BertModel(config).eval()


def tiny_gpt2() -> GPT2Model:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
    return GPT2Model(config).eval()


def tiny_unet() -> UNet2DConditionModel:
    """conf/generator_debug/diffusion_smoke.yaml's UNet."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, cross_attention_dim=32, block_out_channels=(16, 32),
        layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_gan() -> GANGenerator:
    torch.manual_seed(0)
    return GANGenerator(
        image_size=16, cond_dim=32, text_dim=64, width=8, max_width_multiplier=2, noise_dim=16, attention=True,
        attention_resolution=8, attention_heads=2, discriminator_width=8, discriminator_text_features=16,
    )


def tiny_vae() -> VAEGenerator:
    """A conditional VAE whose autoencoder has a mid-block attention."""
    torch.manual_seed(0)
    autoencoder = partial(
        AutoencoderKL, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
    )
    return VAEGenerator(autoencoder, image_size=16, cond_dim=32, cond_channels=8, prior_hidden=16)


TOKENS = torch.tensor([[1, 5, 9, 13, 2], [1, 7, 3, 2, 0]])
TEXT_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])


def text_output(model: nn.Module) -> Tensor:
    return model(input_ids=TOKENS, attention_mask=TEXT_MASK).last_hidden_state


def unet_output(unet: nn.Module) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    x, tokens = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 5, 32, generator=generator)
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=tokens).sample


def gan_output(net: nn.Module) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    cond = Conditioning(
        tokens=torch.randn(2, 3, 32, generator=generator), mask=torch.ones(2, 3, dtype=torch.bool),
        vector=torch.randn(2, 32, generator=generator),
    )
    return net(torch.randn(2, 16, generator=generator), cond)


# architecture -> (the module add_lora adapts, its default targets)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "bert": (tiny_bert, ["query", "key", "value", "attention.output.dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "attn.c_proj"]),
    "unet": (tiny_unet, ["to_q", "to_k", "to_v", "to_out.0"]),
    "gan": (lambda: tiny_gan().lora_module(), ["mlp.0", "mlp.2"]),
    "vae": (
        lambda: tiny_vae().lora_module(),
        ["to_q", "to_k", "to_v", "to_out.0", "text_to_map.0", "text_to_map.2", "text_to_prior.0", "text_to_prior.2"],
    ),
}


def targeted_layers(module: nn.Module, targets: list[str]) -> list[nn.Module]:
    return [
        layer for name, layer in module.named_modules()
        if any(name == target or name.endswith(f".{target}") for target in targets)
    ]


def randomise_lora(module: nn.Module) -> None:
    """LoRA's B starts at zero (the adapter starts as the identity); make every adapter matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if is_lora_parameter(name):
                parameter.normal_(0.0, 0.1)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_targets_and_trainable_counts(architecture: str) -> None:
    build_module, targets = ARCHITECTURES[architecture]
    module = build_module()
    assert default_targets(module, "peft") == targets
    # rank x (in + out) per targeted layer: every default target is a Linear (or GPT-2's Conv1D), whose
    # weight's two sides are its input and output widths
    layers = targeted_layers(module, targets)
    assert layers and all(layer.weight.dim() == 2 for layer in layers)
    expected = 4 * sum(sum(layer.weight.shape) for layer in layers)
    assert add_lora(module, LoraSettings(rank=4), "peft") == expected
    for name, parameter in module.named_parameters():
        assert parameter.requires_grad == is_lora_parameter(name), name


def test_the_llama_count_by_hand() -> None:
    # 2 layers x (q 32->32, k 32->16, v 32->16, o 32->32; one 16-wide key/value head) at rank 8
    assert add_lora(tiny_llama(), LoraSettings(rank=8), "peft") == 2 * 8 * (64 + 48 + 48 + 64)


def test_the_gan_discriminator_keeps_training() -> None:
    gan = tiny_gan()
    add_lora(gan.lora_module(), LoraSettings(rank=2), "model.generator_lora")
    assert all(parameter.requires_grad for parameter in gan.discriminator.parameters())
    assert not any(parameter.requires_grad for parameter in gan.net.stem.parameters())


@pytest.mark.parametrize(
    ("build_module", "run"), [(tiny_unet, unet_output), (tiny_gpt2, text_output), (tiny_llama, text_output),
                              (lambda: tiny_gan().net, gan_output)],
    ids=["unet", "gpt2", "llama", "gan"],
)
def test_merged_output_equals_the_adapted_output(build_module: Callable[[], nn.Module], run) -> None:
    module = build_module()
    base = run(module)
    add_lora(module, LoraSettings(rank=4, alpha=8.0), "peft")
    assert torch.equal(run(module), base)  # B = 0: an adapter starts as the identity
    randomise_lora(module)
    adapted = run(module)
    assert (adapted - base).abs().max() > 1e-3
    merged = merged_copy(module)
    assert has_lora(module) and not has_lora(merged) and merged is not module
    assert (run(merged) - adapted).abs().max() <= 1e-5
    merge_lora(module)  # in place
    assert not has_lora(module) and (run(module) - adapted).abs().max() <= 1e-5


def test_a_merged_unet_saves_and_loads_as_a_plain_unet(tmp_path: Path) -> None:
    unet = tiny_unet()
    add_lora(unet, LoraSettings(rank=4), "model.generator_lora")
    randomise_lora(unet)
    expected = unet_output(unet)
    merged = merged_copy(unet)
    merged.save_pretrained(tmp_path / "unet")
    weights = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == tiny_unet().state_dict().keys()  # no lora_ or base_layer keys
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert (unet_output(reloaded) - expected).abs().max() <= 1e-5


def test_lora_state_dict_round_trip_is_strict() -> None:
    trained = tiny_unet()
    settings = LoraSettings(rank=4, targets=["to_q", "to_v"])
    add_lora(trained, settings, "model.generator_lora")
    randomise_lora(trained)
    state = lora_state_dict(trained)
    assert state and all(is_lora_parameter(name) for name in state)
    fresh = tiny_unet()
    add_lora(fresh, settings, "model.generator_lora")
    load_lora_state_dict(fresh, state)
    assert torch.equal(unet_output(fresh), unet_output(trained))
    missing = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match="1 missing"):
        load_lora_state_dict(fresh, missing)
    with pytest.raises(ValueError, match="1 unexpected"):
        load_lora_state_dict(fresh, {**state, "extra.lora_A.weight": torch.zeros(1)})


def test_a_target_matching_nothing_is_one_line_naming_the_option() -> None:
    with pytest.raises(ConfigError) as error:
        add_lora(tiny_unet(), LoraSettings(targets=["to_q", "to_query"]), "model.generator_lora")
    message = one_line(error)
    assert message.startswith(
        "model.generator_lora.targets=['to_q', 'to_query'] matches no module of UNet2DConditionModel ('to_query' "
    )
    assert "candidates: " in message and "to_q" in message


def test_a_target_lora_cannot_adapt_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        add_lora(tiny_unet(), LoraSettings(targets=["to_out"]), "model.generator_lora")
    assert "'to_out' selects down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out, a ModuleList" in one_line(
        error
    )


def test_no_default_targets_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        add_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), LoraSettings(), "peft")
    assert one_line(error) == "no default LoRA targets for Sequential; set peft.targets=[...] (module names such as 0)"


def lora_latent_module() -> tuple[nn.Module, HFTextEncoder]:
    """tests/test_export.py's tiny latent diffusion model with LoRA on its UNet, every adapter non-zero."""
    model, encoder = tiny_latent_module()
    add_lora(model.generator.lora_module(), LoraSettings(rank=4), "model.generator_lora")
    randomise_lora(model)
    return model, encoder


def test_adapter_file_holds_the_trainable_weights_only(tmp_path: Path) -> None:
    model, encoder = lora_latent_module()
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    with safe_open(str(path), framework="pt") as file:
        assert set(file.keys()) == trainable
        lora = json.loads(file.metadata()["lora"])
    assert lora == {"generator.denoiser": {"rank": 4, "alpha": 16.0, "dropout": 0.0,
                                           "targets": ["to_k", "to_out.0", "to_q", "to_v"]}}
    assert {"conditioner.null_tokens", "conditioner.null_pooled"} <= trainable and any(name.startswith("fusion.") for name in trainable)
    assert not any(name.startswith("generator.first_stage.") for name in trainable)
    # a fresh model with the same LoRA settings gives the same images once the file is loaded
    fresh, _ = tiny_latent_module()
    add_lora(fresh.generator.lora_module(), LoraSettings(rank=4), "model.generator_lora")
    text = encoder.encode(PROMPTS)
    assert not torch.equal(fresh.generate(text, SEEDS), model.generate(text, SEEDS))
    load_adapters(fresh, path)
    assert torch.equal(fresh.generate(text, SEEDS), model.generate(text, SEEDS))
    # other settings: one line naming the mismatch
    other, _ = tiny_latent_module()
    add_lora(other.generator.lora_module(), LoraSettings(rank=2), "model.generator_lora")
    with pytest.raises(ConfigError, match="has shape"):
        load_adapters(other, path)
    plain, _ = tiny_latent_module()
    with pytest.raises(ConfigError) as error:
        load_adapters(plain, path)
    assert "missing" in one_line(error) and "unexpected" in one_line(error)


def test_an_adapter_file_from_before_the_denoisers_loads(tmp_path: Path) -> None:
    """Adapter files written when the UNet was `generator.unet` (before denoisers) load under today's names."""
    model, encoder = lora_latent_module()
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name.replace("generator.denoiser.unet.", "generator.unet."): file.get_tensor(name) for name in file.keys()}
    assert any(name.startswith("generator.unet.") for name in tensors)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    fresh, _ = tiny_latent_module()
    add_lora(fresh.generator.lora_module(), LoraSettings(rank=4), "model.generator_lora")
    load_adapters(fresh, tmp_path / "old.safetensors")
    text = encoder.encode(PROMPTS)
    assert torch.equal(fresh.generate(text, SEEDS), model.generate(text, SEEDS))


def test_a_lora_model_exports_merged_and_gives_the_same_images(tmp_path: Path) -> None:
    model, encoder = lora_latent_module()
    out = write_export(model, encoder, tmp_path / "out")
    assert has_lora(model.generator.denoiser)  # the training model keeps its adapters
    plain = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not any("lora" in name or "base_layer" in name for name in plain.state_dict())
    images = Text2ImgPipeline.from_folder(out)(PROMPTS, seed=SEEDS, output_type="pt")
    expected = model.generate(encoder.encode(PROMPTS), SEEDS)
    assert (images - expected).abs().max() <= TOLERANCE


def test_a_tuned_encoder_is_exported_with_its_tuning(tmp_path: Path) -> None:
    """An encoder with a reference (a local folder) trained with LoRA: copied, merged, even with copy_encoder=false."""
    model, tiny = tiny_latent_module()
    tiny.load()
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    encoder = HFTextEncoder(model=str(tmp_path / "base"), hidden_size=64, max_length=24, layer=-2)
    encoder.load()
    add_lora(encoder.model, LoraSettings(rank=4), "peft")
    randomise_lora(encoder)
    model.conditioner.encoder = encoder
    out = write_export(model, tiny, tmp_path / "out", copy_encoder=False)
    settings = json.loads((out / SETTINGS_FILE).read_text())["text_encoder"]
    assert settings["tuned"] is True and settings["weights"] == "text_encoder"
    assert settings["reference"]["model"] == str(tmp_path / "base")
    assert "LoRA merged" in (out / "README.md").read_text()
    pipe = Text2ImgPipeline.from_folder(out)
    tokens, _, _ = pipe.encode(PROMPTS)
    text = encoder.encode(PROMPTS)
    assert (tokens - text.tokens).abs().max() <= TOLERANCE
    assert (tokens - tiny.encode(PROMPTS).tokens).abs().max() > 1e-3  # not the base encoder's
    images = pipe(PROMPTS, seed=SEEDS, output_type="pt")
    assert (images - model.generate(text, SEEDS)).abs().max() <= TOLERANCE


def test_adapter_checkpoints_are_written_during_a_fit(tmp_path: Path) -> None:
    data = write_imagefolder(tmp_path / "data", n=24)
    overrides = [
        "test=false", "callbacks.sample_grid=null", "callbacks.evaluation=null", "callbacks.best_checkpoint=null"
    ]
    cfg = compose_train(tmp_path / "run", smoke_overrides(data, *overrides))
    run = build(cfg)
    add_lora(run.model.generator.lora_module(), LoraSettings(rank=2), "model.generator_lora")
    run.trainer.fit(run.model, datamodule=run.datamodule)
    folder = tmp_path / "run" / "checkpoints" / "adapters"
    assert sorted(path.name for path in folder.iterdir()) == [
        "last.safetensors", "step=000003.safetensors", "step=000006.safetensors"
    ]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    adapters = load_file(folder / "last.safetensors")
    assert all(torch.equal(value, checkpoint["state_dict"][name]) for name, value in adapters.items())
    full_size = (tmp_path / "run" / "checkpoints" / "last.ckpt").stat().st_size
    assert (folder / "last.safetensors").stat().st_size < full_size / 3
    _, fresh = build_model(cfg)
    add_lora(fresh.generator.lora_module(), LoraSettings(rank=2), "model.generator_lora")
    load_adapters(fresh, folder / "last.safetensors")
    state = fresh.state_dict()
    assert all(torch.equal(state[name], value) for name, value in adapters.items())


def test_the_adapter_checkpoint_must_come_after_ema(tmp_path: Path) -> None:
    adapters = AdapterCheckpoint(str(tmp_path))
    trainer = L.Trainer(callbacks=[adapters, EMA()], logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError) as error:
        adapters.setup(trainer, nn.Module(), "fit")
    assert one_line(error).endswith("list it after ema")
    adapters.setup(L.Trainer(callbacks=[EMA(), adapters], logger=False, enable_checkpointing=False), nn.Module(), "fit")
