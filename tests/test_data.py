"""Data sources: captions, OpenMoji rendering and cache, caption splits, image folders, augmentation."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from text2img.data import (
    ArrayImageDataset,
    ImageAugment,
    ImageFolderSource,
    OpenMojiSource,
    caption_from_name,
    emoji_caption,
    split_indices,
)
from conftest import write_imagefolder
from text2img.data.splits import caption_bucket, check_fractions, split_of

# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    ("name", "caption"),
    [
        (":man_running_facing_right:", "man running facing right"),
        (":keycap_#:", "keycap #"),
        (":Côte_d\u2019Ivoire:", "Côte d'Ivoire"),
        (":eight_o\u2019clock:", "eight o'clock"),
        (":AB_button_(blood_type):", "AB button (blood type)"),
        (":St._Kitts_&_Nevis:", "St. Kitts & Nevis"),
        (":T-Rex:", "T-Rex"),
        ("flag: United States", "flag of United States"),
        (":woman_medium-dark_skin_tone_blond_hair:", "woman, medium-dark skin tone, blond hair"),
        (":handshake_dark_skin_tone_light_skin_tone:", "handshake, dark skin tone, light skin tone"),
        ("  :red__apple;:  ", "red apple"),
    ],
)
def test_caption_from_name(name: str, caption: str) -> None:
    assert caption_from_name(name) == caption


def test_flags_get_flag_of() -> None:
    assert emoji_caption("\U0001f1ef\U0001f1f5", ":Japan:") == "flag of Japan"
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert emoji_caption(england, ":England:") == "flag of England"
    assert emoji_caption("\U0001f3f3\ufe0f\u200d\U0001f308", ":rainbow_flag:") == "rainbow flag"


# ---------------------------------------------------------------- OpenMoji


@pytest.fixture(scope="module")
def openmoji(asset_cache_dir: Path) -> OpenMojiSource:
    return OpenMojiSource(cache_dir=asset_cache_dir / "openmoji")


@pytest.mark.slow  # renders all of OpenMoji on a cold cache (~1 min)
def test_openmoji_renders_every_drawable_emoji(openmoji: OpenMojiSource) -> None:
    assert 3900 <= len(openmoji) <= 3970
    assert 0 < len(openmoji.skipped) < 60
    assert len(set(openmoji.captions)) == len(openmoji.captions)
    assert "man running facing right" in openmoji.captions
    images = openmoji.images
    assert images.shape == (len(openmoji), 32, 32, 3) and images.dtype == np.uint8
    assert (images.min(axis=(1, 2, 3)) < 128).all(), "every emoji has dark (outline) pixels"
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all(), "background is white"


@pytest.mark.slow  # renders all of OpenMoji on a cold cache (~1 min)
def test_openmoji_items(openmoji: OpenMojiSource) -> None:
    train = openmoji.split("train")
    image, caption = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= image.min() < 0.0 and image.max() == 1.0
    assert caption == train.captions[0] and isinstance(caption, str)


@pytest.mark.slow  # renders all of OpenMoji on a cold cache (~1 min)
def test_openmoji_cache_is_reused(openmoji: OpenMojiSource, asset_cache_dir: Path) -> None:
    start = time.perf_counter()
    again = OpenMojiSource(cache_dir=asset_cache_dir / "openmoji")
    assert time.perf_counter() - start < 1.0
    assert again.cache_path == openmoji.cache_path and again.cache_path.parent == asset_cache_dir / "openmoji"
    assert np.array_equal(again.images, openmoji.images)
    assert again.captions == openmoji.captions and again.codepoints == openmoji.codepoints


# ---------------------------------------------------------------- splits


@pytest.mark.slow  # renders all of OpenMoji on a cold cache (~1 min)
def test_splits_are_deterministic_disjoint_and_sized(openmoji: OpenMojiSource, asset_cache_dir: Path) -> None:
    again = OpenMojiSource(cache_dir=asset_cache_dir / "openmoji")
    splits = {name: openmoji.split(name).captions for name in ("train", "val", "test")}
    assert splits == {name: again.split(name).captions for name in ("train", "val", "test")}
    seen = [set(captions) for captions in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(map(len, splits.values())) == len(openmoji)
    for name in ("val", "test"):
        assert 0.035 < len(splits[name]) / len(openmoji) < 0.065


def test_split_is_a_fixed_function_of_the_caption() -> None:
    # Pinned values: a change here would silently move samples between splits across versions.
    assert caption_bucket("red apple") == pytest.approx(0.2582813967357177)
    assert caption_bucket("  Red   APPLE ") == caption_bucket("red apple")
    assert split_of("man running facing right", 0.05, 0.05) == "train"
    assert split_of("man running facing right", 0.0, 0.99) == "test"
    assert split_of("man running facing right", 0.99, 0.0) == "val"
    indices = split_indices(["a", "b", "a"], 0.3, 0.3)
    assert sorted(i for idx in indices.values() for i in idx) == [0, 1, 2]
    assert [name for name, idx in indices.items() if 0 in idx] == [
        name for name, idx in indices.items() if 2 in idx
    ]


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.05), (0.05, 1.0), (0.5, 0.5)])
def test_bad_fractions_raise(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        check_fractions(val, test)


def test_unknown_split_and_train_only_augmentation(tmp_path: Path) -> None:
    augment = ImageAugment(hflip=1.0)
    folder = write_imagefolder(tmp_path / "data", n=24)
    source = ImageFolderSource(folder, image_size=32, val_fraction=0.2, test_fraction=0.2, augment=augment)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        source.split("valid")
    assert source.split("train").transform is augment
    assert source.split("val").transform is None and source.split("test").transform is None
    image, _ = source.split("train")[0]
    assert torch.equal(image, source.split("train").load_image(0).flip(-1))


# ---------------------------------------------------------------- image folder


def _write_folder(root: Path, rows: list[dict[str, str] | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 0)).save(tmp_path / "clear.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "sub" / "black.png")
    return _write_folder(
        tmp_path,
        [
            {"file_name": "red.png", "text": "a red block"},
            {"file_name": "clear.png", "text": "nothing at all"},
            {"file_name": "sub/black.png", "text": " a  black square "},
        ],
    )


def test_imagefolder_items(folder: Path) -> None:
    source = ImageFolderSource(str(folder), image_size=8, val_fraction=0.0, test_fraction=0.0)
    train = source.split("train")
    assert train.captions == ["a red block", "nothing at all", "a black square"]
    assert len(source.split("val")) == len(source.split("test")) == 0
    expected = {
        "a red block": (1.0, -1.0, -1.0),
        "nothing at all": (1.0, 1.0, 1.0),
        "a black square": (-1.0, -1.0, -1.0),
    }
    for image, caption in (train[i] for i in range(len(train))):
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert torch.allclose(image, torch.tensor(expected[caption]).view(3, 1, 1).expand(3, 8, 8))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (None, r"no metadata.jsonl in data.source.path=.*add one"),
        ([], r"lists no images"),
        (
            [{"file_name": "missing.png", "text": "a cat"}],
            r"none of the 1 samples .* is usable \(missing image: line 1\)",
        ),
    ],
)
def test_imagefolder_bad_metadata_raises(tmp_path: Path, rows: list | None, match: str) -> None:
    if rows is None:
        tmp_path.mkdir(exist_ok=True)
    else:
        _write_folder(tmp_path, rows)
    with pytest.raises(ValueError if rows is not None else FileNotFoundError, match=match) as info:
        ImageFolderSource(tmp_path, image_size=8)
    assert "\n" not in str(info.value)


def test_imagefolder_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"data.source.path='.*nope' does not exist; point data.source.path at a folder"
    ):
        ImageFolderSource(str(tmp_path / "nope"), image_size=8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"file.png' is not a folder; point data.source.path"):
        ImageFolderSource(tmp_path / "file.png", image_size=8)


def test_imagefolder_skips_and_counts_bad_samples(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with (folder / "metadata.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": "corrupt.png", "text": "broken"}) + "\n")
        f.write(json.dumps({"file_name": "red.png", "text": "   "}) + "\n")
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(folder, image_size=8)
    assert len(source) == 3
    assert (
        f"imagefolder: skipped 2 of 5 samples of {folder / 'metadata.jsonl'} (unreadable image: line 4; "
        "empty caption: line 5)"
    ) in caplog.messages


# ---------------------------------------------------------------- augmentation


def test_augment_off_is_identity() -> None:
    image = torch.rand(3, 8, 8) * 2 - 1
    assert ImageAugment()(image) is image


def test_augment_keeps_shape_and_range_and_is_seeded() -> None:
    augment = ImageAugment(hflip=0.5, random_crop_scale=0.5, color_jitter=0.5)
    image = torch.rand(3, 16, 16) * 2 - 1

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [augment(image) for _ in range(8)]

    first = run(0)
    for out in first:
        assert out.shape == image.shape and out.min() >= -1 and out.max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(first, run(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, run(1), strict=True))
    assert torch.equal(ImageAugment(hflip=1.0)(image), image.flip(-1))


@pytest.mark.parametrize("kwargs", [{"hflip": 1.5}, {"random_crop_scale": 0.0}, {"color_jitter": -0.1}])
def test_augment_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"augment\."):
        ImageAugment(**kwargs)


def test_array_dataset_applies_transform() -> None:
    images = np.zeros((2, 4, 4, 3), np.uint8)
    dataset = ArrayImageDataset(images, ["a", "b"], transform=lambda x: x + 1)
    image, caption = dataset[1]
    assert caption == "b" and torch.equal(image, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="one caption each"):
        ArrayImageDataset(images, ["a"])


# ---------------------------------------------------------------- caption augmentation: data module and conditioner


def _augmenting(folder: Path, cache_dir: Path, **options):
    """A data module and the text conditioner of an augmenting run (TinyEncoder with `options`)."""
    from text2img.conditioning import TextConditioner, caption_draws
    from text2img.data.caption_augment import CaptionAugment
    from text2img.encoders import TinyEncoder
    from text2img.lightning import Text2ImgDataModule

    source = ImageFolderSource(folder, image_size=32, val_fraction=0.2, test_fraction=0.2)
    augment = CaptionAugment(word_dropout=0.3, templates=["{caption}", "an emoji of {caption}"], variants=3)
    encoder = TinyEncoder(max_length=64, **options)
    reference = TinyEncoder(max_length=64) if encoder.trainable else None
    draws = caption_draws(augment, on_the_fly=encoder.trainable)
    datamodule = Text2ImgDataModule(source, batch_size=8, caption_draws=draws)
    return datamodule, TextConditioner(encoder, cache_dir, caption_augment=augment, reference_encoder=reference)


def test_frozen_encoder_caches_the_variants_once(imagefolder: Path, tmp_path: Path, monkeypatch) -> None:
    datamodule, text = _augmenting(imagefolder, tmp_path / "emb")
    encoded: list[list[str]] = []
    original = text.text_encoder.encode
    monkeypatch.setattr(text.text_encoder, "encode", lambda texts: encoded.append(list(texts)) or original(texts))
    text.prepare(datamodule.caption_sets())
    train = sorted(set(datamodule.source.split("train").captions))
    evaluation = {c for name in ("val", "test") for c in datamodule.source.split(name).captions}
    variants = {v for c in train for v in text.caption_augment.variants_of(c)}
    assert len(encoded) == 1 and set(encoded[0]) == variants | evaluation
    assert len(encoded[0]) == len(set(encoded[0]))

    datamodule, again = _augmenting(imagefolder, tmp_path / "emb")
    datamodule.setup()
    again.setup(datamodule.caption_sets())
    assert again.cache.stats.misses == 0 and not again.text_encoder.is_loaded
    torch.manual_seed(0)
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch.captions) <= set(train)  # the originals: the conditioner turns them into what the encoder reads
    assert len(batch.caption_draws) == 8 and set(batch.caption_draws) <= {0, 1, 2}
    prompts = again.encode_captions(batch.captions, batch.caption_draws, training=True)
    assert prompts.texts == [text.caption_augment.variants_of(c)[d] for c, d in zip(batch.captions, batch.caption_draws)]
    assert any(prompt != caption for caption, prompt in zip(batch.captions, prompts.texts))
    plain = again.text_encoder.encode(batch.captions)
    assert not torch.equal(prompts.text.pooled, plain.pooled)  # training embeddings change...
    val = next(iter(datamodule.val_dataloader()))
    assert val.caption_draws is None
    evaluated = again.encode_captions(val.captions)
    assert evaluated.texts == val.captions  # ...validation's never do
    torch.testing.assert_close(evaluated.text.pooled, again.text_encoder.encode(val.captions).pooled, atol=1e-5, rtol=1e-4)


def test_trainable_encoder_gets_fresh_augmentations_and_no_cache(imagefolder: Path, tmp_path: Path, monkeypatch) -> None:
    from text2img.encoders import EmbeddingCache

    def no_lookup(*args, **kwargs):
        raise AssertionError("the embedding cache was consulted")

    monkeypatch.setattr(EmbeddingCache, "lookup", no_lookup)
    datamodule, text = _augmenting(imagefolder, tmp_path / "emb", mode="full")
    text.prepare(datamodule.caption_sets())
    datamodule.setup()
    text.setup(datamodule.caption_sets())
    assert text.table is None and not (tmp_path / "emb").exists()
    torch.manual_seed(0)
    batch = next(iter(datamodule.train_dataloader()))
    prompts = text.texts(batch.captions, batch.caption_draws, training=True)
    assert len(prompts) == len(batch.captions) == 8
    assert any(prompt != caption for caption, prompt in zip(batch.captions, prompts))
    torch.manual_seed(0)
    again = next(iter(datamodule.train_dataloader()))  # the draws are seeded by the loader
    assert again.caption_draws == batch.caption_draws
    assert text.texts(again.captions, again.caption_draws, training=True) == prompts


def test_a_trainable_encoder_is_evaluated_with_its_frozen_reference(imagefolder: Path, tmp_path: Path) -> None:
    """The alignment metrics' text side stays the base model's, however far training moves the encoder."""
    datamodule, text = _augmenting(imagefolder, tmp_path / "emb", mode="full")
    text.prepare(datamodule.caption_sets())
    before = text.reference(datamodule.captions("val"))
    torch.testing.assert_close(before.text.pooled, text.reference_encoder.encode(before.captions).pooled)
    encoder = text.encoder
    encoder.eval()  # no dropout
    with torch.no_grad():
        untrained = encoder.encode(before.captions).pooled
        for param in encoder.parameters():
            param.add_(0.1 * torch.randn_like(param))  # what training does to it
        assert not torch.allclose(encoder.encode(before.captions).pooled, untrained)
    torch.testing.assert_close(before.text.pooled, untrained)  # the reference is the base
    torch.testing.assert_close(text.reference(datamodule.captions("val")).text.pooled, before.text.pooled)
