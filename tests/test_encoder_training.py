"""Encoder training modes (frozen, lora, full), the joint text loss and gradient checkpointing."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from text2img.conditioning import TextConditioner
from text2img.encoders import TinyEncoder
from text2img.errors import ConfigError, root_cause
from text2img.fusion import TokenProjection
from text2img.lightning import Text2ImgModule
from text2img.types import Batch
from test_model import COND_DIM, tiny_generator

CAPTIONS = ["red heart", "grinning face with big eyes", "flag of Japan", "rocket"]


def module(encoder: TinyEncoder | None, **options) -> Text2ImgModule:
    """A module whose conditioner has `encoder` (None: a frozen TinyEncoder)."""
    torch.manual_seed(0)
    fusion, generator = TokenProjection(64, COND_DIM), tiny_generator()
    encoder = TinyEncoder() if encoder is None else encoder
    reference = TinyEncoder() if encoder.trainable else None
    conditioner = TextConditioner(
        encoder, "unused", reference_encoder=reference, next_token_loss=options.get("text_loss_weight", 0) > 0
    )
    return Text2ImgModule(fusion, generator, conditioner, partial(torch.optim.AdamW, lr=1e-3), **options)


def batch(captions: list[str] = CAPTIONS) -> Batch:
    return Batch(images=torch.rand(len(captions), 3, 16, 16) * 2 - 1, captions=captions)


def test_full_mode_trains_every_encoder_weight_with_its_own_learning_rate() -> None:
    model = module(TinyEncoder(mode="full"), encoder_lr=1e-5)
    loss = model.training_step(batch(), 0)
    loss.backward()
    encoder_params = list(model.conditioner.encoder.parameters())
    assert encoder_params and all(p.grad is not None for p in encoder_params)
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in encoder_params}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_a_frozen_encoder_stays_out_of_the_module() -> None:
    model = module(None)
    assert model.conditioner.encoder is None and not any("encoder." in name for name in model.state_dict())


@pytest.mark.parametrize("options", [{"text_loss_weight": 0.5}, {"encoder_lr": 1e-5}])
def test_encoder_options_need_an_encoder_that_trains(options) -> None:
    with pytest.raises(ConfigError, match="frozen; use peft=lora or encoder.mode=full"):
        module(None, **options)


def test_text_loss_needs_a_causal_model() -> None:
    from text2img.encoders import MiniLMEncoder

    with pytest.raises(ConfigError, match="bidirectional and has no next-token loss"):
        module(MiniLMEncoder(mode="full", hidden_size=384, max_length=8), text_loss_weight=1.0)


def text_loss_after(weight: float, steps: int = 8) -> tuple[float, float]:
    """L_text on a fixed batch before and after `steps` optimisation steps of the joint loss."""
    model = module(TinyEncoder(mode="full"), text_loss_weight=weight, encoder_lr=3e-3)
    optimizer = model.configure_optimizers()["optimizer"]
    model.log = lambda *args, **kwargs: None  # no trainer attached
    fixed = batch()
    with torch.no_grad():
        before = float(model.conditioner.text_loss(CAPTIONS))
    for _ in range(steps):
        optimizer.zero_grad()
        model.training_step(fixed, 0).backward()
        optimizer.step()
    with torch.no_grad():
        return before, float(model.conditioner.text_loss(CAPTIONS))


def test_joint_loss_reduces_the_text_loss() -> None:
    before, with_text_loss = text_loss_after(1.0)
    _, without = text_loss_after(0.0)
    # a random byte-level LM starts near ln(259) = 5.56 nats per token
    assert 5.0 < before < 6.0
    assert with_text_loss < before - 0.5 and with_text_loss < without - 0.5


def test_next_token_loss_ignores_padding() -> None:
    encoder = TinyEncoder(mode="full").eval()  # no dropout
    short, long = "rocket", "flag of Japan"
    with torch.no_grad():
        both = encoder.next_token_loss([short, long])
        alone = [encoder.next_token_loss([caption]) for caption in (short, long)]
    # The batch loss is the token-weighted mean of each caption's loss (one prediction per byte after <bos>):
    # the padding of the short caption adds nothing.
    expected = (alone[0] * len(short) + alone[1] * len(long)) / (len(short) + len(long))
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        encoder = TinyEncoder(mode="full", gradient_checkpointing=checkpointing)
        encoder.load()
        assert encoder.model.is_gradient_checkpointing == checkpointing and encoder.model.training
        for layer in encoder.model.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0  # both runs then compute the same function
        encoder.encode(CAPTIONS).tokens.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# ---- end to end: short real runs on a small image folder ----


def test_lora_run_saves_adapters_not_the_base_and_resumes_at_the_saved_step(tmp_path, imagefolder) -> None:
    from conftest import compose_train, smoke_overrides
    from test_train import FirstStep
    from text2img.run.compose import load_model
    from text2img.utils.lora import has_lora
    from text2img.run.compose import build
    from text2img.train import train

    lora = smoke_overrides(imagefolder, "peft=lora", "test=false")
    first = compose_train(tmp_path / "a", [*lora, "trainer.max_steps=3"])
    train(first)
    ckpt_path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    saved = [key for key in ckpt["state_dict"] if key.startswith("conditioner.encoder.")]
    assert saved and all("lora_" in key for key in saved)  # the adapters, not the frozen GPT-2 they adapt
    # rebuilt from the checkpoint alone, for evaluation: the base comes back from its source
    _, _, model = load_model(str(ckpt_path))
    assert has_lora(model.conditioner.encoder.model)
    for key in saved:
        torch.testing.assert_close(model.state_dict()[key], ckpt["state_dict"][key])

    resumed = compose_train(tmp_path / "b", [*lora, f"ckpt_path={ckpt_path}"])
    run = build(resumed)
    probe = FirstStep()
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=str(ckpt_path))
    assert probe.first == 3 and run.trainer.global_step == 6


def test_a_bert_encoder_trains_with_lora_under_ema(tmp_path, imagefolder) -> None:
    """MiniLM (BERT) carries int64 buffers (position and token-type ids) that the EMA must copy, not lerp."""
    from conftest import compose_train, smoke_overrides
    from text2img.run.compose import build

    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "encoder=minilm", "peft=lora", "trainer.max_steps=3"))
    run = build(cfg)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 3
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any("lora_" in key for key in saved)


def test_generator_lora_starts_from_a_checkpoint_and_writes_adapter_files(tmp_path, imagefolder) -> None:
    from conftest import compose_train, smoke_overrides
    from text2img.utils.lora import load_adapters
    from text2img.run.compose import build
    from text2img.train import train

    train(compose_train(tmp_path / "base", smoke_overrides(imagefolder, "test=false", "trainer.max_steps=3")))
    base = tmp_path / "base" / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        tmp_path / "lora", smoke_overrides(imagefolder, "test=false", "generator_peft=lora", f"model.init_from={base}")
    )
    run = build(cfg)
    # the generator starts from the base run's (EMA) weights and only its adapters train
    base_weights = torch.load(base, weights_only=True)["state_dict"]
    conv = "generator.denoiser.unet.conv_in.weight"
    torch.testing.assert_close(run.model.state_dict()[conv], base_weights[conv])
    trained = [name for name, p in run.model.generator.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    adapters = tmp_path / "lora" / "checkpoints" / "adapters" / "last.safetensors"
    assert adapters.is_file() and adapters.stat().st_size < base.stat().st_size / 4
    fresh = build(cfg).model
    load_adapters(fresh, adapters)
    name = next(n for n in trained)
    assert not torch.equal(fresh.generator.get_parameter(name), build(cfg).model.generator.get_parameter(name))


def test_init_from_a_checkpoint_of_another_model_is_one_line(tmp_path, imagefolder) -> None:
    from conftest import compose_train, smoke_overrides
    from text2img.run.compose import build
    from text2img.train import train

    train(compose_train(tmp_path / "base", smoke_overrides(imagefolder, "test=false", "trainer.max_steps=3")))
    base = tmp_path / "base" / "checkpoints" / "last.ckpt"
    cfg = compose_train(tmp_path / "x", smoke_overrides(imagefolder, "fusion=perceiver", f"model.init_from={base}"))
    with pytest.raises(Exception) as error:
        build(cfg)
    cause = root_cause(error.value)  # Hydra wraps constructor errors; the CLI prints the cause
    assert isinstance(cause, ConfigError) and "does not fit this model" in str(cause) and "\n" not in str(cause)


def test_a_frozen_encoder_with_a_complete_cache_is_never_loaded(tmp_path, imagefolder, monkeypatch) -> None:
    from conftest import compose_train, smoke_overrides
    from text2img.train import train

    overrides = smoke_overrides(imagefolder, "trainer.max_steps=3", f"paths.cache_dir={tmp_path / 'cache'}")
    train(compose_train(tmp_path / "first", overrides))

    def refuse(self):
        raise AssertionError("the language model was loaded although every caption is cached")

    monkeypatch.setattr(TinyEncoder, "_load_pretrained", refuse)
    assert train(compose_train(tmp_path / "second", overrides)) is not None  # training, validation and test
