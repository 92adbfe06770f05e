"""The text conditioner: cache, expansion, caption variants, null embedding, caption dropout, old checkpoint keys."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
import torch

from text2img.conditioning import SEED_DRAWS, CaptionSets, TextConditioner, upgrade_state_dict
from text2img.data.caption_augment import CaptionAugment
from text2img.encoders import TinyEncoder
from text2img.fusion import TokenProjection
from text2img.lightning import Text2ImgModule
from text2img.types import Batch, TextEmbedding
from test_model import COND_DIM, tiny_generator

CAPTIONS = CaptionSets(train=["flag of Japan", "red heart", "rocket"], evaluation=["grinning face", "red apple"])


class FakeExpander:
    """A `PromptExpander` without a language model: "<caption>, in detail"."""

    def __init__(self, train: bool = True, sample: bool = True) -> None:
        self.train, self.sample = train, sample
        self.calls: list[list[str]] = []

    def enabled_for(self, training: bool) -> bool:
        return self.train if training else self.sample

    def expand(self, captions: Sequence[str], device="cpu") -> list[str]:
        self.calls.append(list(captions))
        return [f"{caption}, in detail" for caption in captions]

    def unload(self) -> None:
        pass


def counting(encoder: TinyEncoder) -> list[list[str]]:
    """The caption lists `encoder.encode` is called with, from now on."""
    calls: list[list[str]] = []
    original = encoder.encode
    encoder.encode = lambda texts: calls.append(list(texts)) or original(texts)
    return calls


def conditioner(tmp_path: Path, encoder: TinyEncoder | None = None, **options) -> TextConditioner:
    encoder = encoder if encoder is not None else TinyEncoder(max_length=32)
    if encoder.trainable:
        options.setdefault("reference_encoder", TinyEncoder(max_length=32))
    return TextConditioner(encoder, tmp_path / "emb", **options)


def test_the_cache_is_filled_once_and_read_once(tmp_path: Path) -> None:
    text = conditioner(tmp_path)
    encoded = counting(text.text_encoder)
    text.prepare(CAPTIONS)
    assert sorted(encoded[0]) == sorted(CAPTIONS.train + CAPTIONS.evaluation) and not text.text_encoder.is_loaded
    text.prepare(CAPTIONS)  # another process of the node, a second run: nothing to encode
    assert len(encoded) == 1
    text.setup(CAPTIONS)
    table = text.table
    text.setup(CAPTIONS)
    assert text.table is table and len(encoded) == 1 and not text.text_encoder.is_loaded
    # the steps read the cached rows, trimmed to the batch's longest caption
    batch = text.encode_captions(["rocket", "red heart"], training=True)
    assert batch.texts == ["rocket", "red heart"] and len(encoded) == 1
    assert batch.text.tokens.shape[1] == int(batch.text.mask.sum(1).max())
    assert torch.equal(batch.text.tokens, text.table[batch.texts].trimmed().tokens)  # what the data module served
    fresh = TinyEncoder(max_length=32).encode(["rocket", "red heart"]).trimmed()
    torch.testing.assert_close(batch.text.tokens, fresh.tokens, atol=1e-5, rtol=1e-4)


def test_a_cold_cache_does_not_change_the_runs_random_draws(tmp_path: Path) -> None:
    """Filling the cache may initialise a model randomly (transformers does before loading weights, the GGUF
    conversion too): the draws after `prepare` must be those of a run whose cache was already warm."""
    encoder = TinyEncoder(max_length=32)
    encode = encoder.encode

    def encode_after_a_random_init(texts: Sequence[str]) -> TextEmbedding:
        torch.randn(1000)  # what loading a model does to the global stream
        return encode(texts)

    encoder.encode = encode_after_a_random_init
    text = conditioner(tmp_path, encoder)
    draws = []
    for _ in ("cold cache", "warm cache"):
        torch.manual_seed(0)
        text.prepare(CAPTIONS)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


def test_expansion_applies_to_training_evaluation_and_sampling_as_configured(tmp_path: Path) -> None:
    text = conditioner(tmp_path, expander=FakeExpander(train=False, sample=True))
    text.prepare(CAPTIONS)
    text.setup(CAPTIONS)
    assert text.texts(["rocket"], training=True) == ["rocket"]
    assert text.texts(["red apple"]) == ["red apple, in detail"]
    sampled = text.sampling(["blue car"])
    assert sampled.captions == ["blue car"] and sampled.texts == ["blue car, in detail"]
    assert sampled.text.tokens.shape[1] == 32  # padded to max_length: an image does not depend on its batch
    reference = text.reference(["red apple"])
    assert reference.texts == ["red apple, in detail"]
    off = conditioner(tmp_path / "off", expander=FakeExpander(sample=False))
    assert off.sampling(["blue car"]).texts == ["blue car"]


def test_a_training_item_draws_a_cached_variant_or_an_augmentation_seed(tmp_path: Path) -> None:
    augment = CaptionAugment(word_dropout=0.4, templates=["{caption}", "an emoji of {caption}"], variants=3)
    text = conditioner(tmp_path, caption_augment=augment)
    assert text.caption_draws == 3
    text.prepare(CAPTIONS)
    text.setup(CAPTIONS)
    variants = augment.variants_of("flag of Japan")
    assert text.texts(["flag of Japan"] * 3, [0, 1, 2], training=True) == variants
    assert text.texts(["red apple"]) == ["red apple"]  # evaluation captions are never augmented
    # every variant is cached: the training step never encodes
    encoded = counting(text.text_encoder)
    text.encode_captions(["flag of Japan"] * 3, [0, 1, 2], training=True)
    assert not encoded
    trainable = conditioner(tmp_path, TinyEncoder(max_length=32, mode="full"), caption_augment=augment)
    assert trainable.caption_draws == SEED_DRAWS
    seeded = trainable.texts(["flag of Japan", "flag of Japan"], [5, 5], training=True)
    assert seeded[0] == seeded[1] == augment("flag of Japan", torch.Generator().manual_seed(5))


def test_unconditional_is_the_learned_null_embedding(tmp_path: Path) -> None:
    text = conditioner(tmp_path)
    null = text.unconditional(3)
    assert null.tokens.shape == (3, 1, 64) and null.mask.all() and null.pooled.shape == (3, 64)
    (null.tokens.sum() + null.pooled.sum()).backward()
    assert text.null_tokens.grad.abs().sum() > 0 and text.null_pooled.grad.abs().sum() > 0
    assert {name for name, _ in text.named_parameters()} == {"null_tokens", "null_pooled"}  # a frozen encoder: none


def rows(n: int, dim: int = 64) -> TextEmbedding:
    return TextEmbedding(torch.randn(n, 5, dim), torch.ones(n, 5, dtype=torch.bool), torch.randn(n, dim))


def test_caption_dropout_replaces_rows_with_the_null_embedding(tmp_path: Path) -> None:
    batch = rows(256)
    assert conditioner(tmp_path, caption_dropout=0.0).drop(batch) is batch
    text = conditioner(tmp_path, caption_dropout=0.5)
    torch.manual_seed(0)
    dropped = text.drop(batch)
    is_null = (dropped.mask.sum(1) == 1) & torch.all(dropped.tokens[:, 0] == text.null_tokens[0], dim=1)
    assert 0.35 < is_null.float().mean() < 0.65
    assert torch.equal(dropped.tokens[~is_null], batch.tokens[~is_null])
    assert torch.all(dropped.tokens[is_null, 1:] == 0)
    dropped.tokens.sum().backward()  # the null embedding is learned: gradients reach it through the dropped rows
    assert text.null_tokens.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="caption_dropout=1.0 must be in"):
        conditioner(tmp_path, caption_dropout=1.0)


def test_a_trainable_encoder_is_the_model_s_and_gets_gradients(tmp_path: Path) -> None:
    text = conditioner(tmp_path, TinyEncoder(max_length=32, mode="full"))
    text.prepare(CAPTIONS)
    assert not (tmp_path / "emb").exists()  # nothing cached: its embeddings change as it trains
    encoded = text.encode_captions(["rocket", "red heart"], training=True)
    encoded.text.tokens.sum().backward()
    assert all(p.grad is not None for p in text.encoder.parameters())
    assert any(name.startswith("encoder.") for name in text.state_dict())
    with pytest.raises(ValueError, match="reference_encoder"):
        TextConditioner(TinyEncoder(mode="full"), tmp_path)


def model(tmp_path: Path, encoder: TinyEncoder) -> Text2ImgModule:
    torch.manual_seed(0)
    fusion, generator = TokenProjection(64, COND_DIM), tiny_generator()
    return Text2ImgModule(fusion, generator, conditioner(tmp_path, encoder), partial(torch.optim.AdamW, lr=1e-3))


def test_checkpoints_from_before_the_conditioner_load(tmp_path: Path) -> None:
    trained = model(tmp_path, TinyEncoder(max_length=32, mode="full"))
    state = trained.state_dict()
    old = {key.removeprefix("conditioner."): value for key, value in state.items()}
    assert "null_tokens" in old and any(key.startswith("encoder.") for key in old)
    assert upgrade_state_dict(old).keys() == state.keys()
    fresh = model(tmp_path, TinyEncoder(max_length=32, mode="full", seed=1))
    fresh.load_state_dict(old)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    # a Lightning checkpoint: on_load_checkpoint renames, and the EMA callback's raw weights too
    checkpoint = {"state_dict": dict(old), "current_model_state": dict(old)}
    fresh.on_load_checkpoint(checkpoint)
    assert checkpoint["state_dict"].keys() == checkpoint["current_model_state"].keys() == state.keys()


def test_the_training_step_reads_the_conditioner(tmp_path: Path) -> None:
    text = model(tmp_path, TinyEncoder(max_length=32))
    text.conditioner.prepare(CAPTIONS)
    text.conditioner.setup(CAPTIONS)
    batch = Batch(images=torch.rand(2, 3, 16, 16) * 2 - 1, captions=["rocket", "red heart"])
    text.training_step(batch, 0).backward()
    assert text.conditioner.null_tokens.grad is not None  # caption dropout in the step (rate 0.1: possibly zero)
    assert text.frozen_encoder_keys() == [] and not any("encoder" in key for key in text.state_dict())
