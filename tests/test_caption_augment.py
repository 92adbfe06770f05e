"""Caption augmentation: word dropout, shuffled parts and templates, seeded; training captions only."""

from __future__ import annotations

import pytest
import torch

from text2img.data.caption_augment import CaptionAugment

CAPTION = "woman, medium-dark skin tone, blond hair"


def draws(augment: CaptionAugment, seed: int, count: int = 32) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [augment(CAPTION, generator) for _ in range(count)]


def test_off_by_default_is_identity() -> None:
    assert not CaptionAugment().enabled
    assert CaptionAugment()(CAPTION) is CAPTION


def test_word_dropout_never_empties_a_caption() -> None:
    augment = CaptionAugment(word_dropout=1.0)
    assert all(len(out.split()) == 1 and out in CAPTION.split() for out in draws(augment, 0))
    half = draws(CaptionAugment(word_dropout=0.5), 0)
    assert all(set(out.split()) <= set(CAPTION.split()) and out for out in half)
    assert len(set(half)) > 1


def test_shuffling_keeps_the_multiset_of_parts() -> None:
    parts = sorted(part.strip() for part in CAPTION.split(","))
    out = draws(CaptionAugment(shuffle_parts=1.0), 0)
    assert all(sorted(o.split(", ")) == parts for o in out)
    assert len(set(out)) > 1


def test_templates_are_drawn_per_caption_and_need_the_caption() -> None:
    augment = CaptionAugment(templates=["an emoji of {caption}", "{caption}, flat icon"])
    assert set(draws(augment, 0)) == {f"an emoji of {CAPTION}", f"{CAPTION}, flat icon"}
    with pytest.raises(ValueError, match=r"^data.caption_augment.templates entry 'an emoji' lacks '\{caption\}'; add it"):
        CaptionAugment(templates=["{caption}", "an emoji"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"word_dropout": 1.5}, "word_dropout=1.5 is a probability"), ({"shuffle_parts": -0.1}, "shuffle_parts"),
     ({"variants": 0}, "variants=0 must be at least 1")],
)
def test_bad_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CaptionAugment(**kwargs)


def test_deterministic_per_seed() -> None:
    augment = CaptionAugment(word_dropout=0.3, shuffle_parts=0.5, templates=["{caption}", "an emoji of {caption}"])
    assert draws(augment, 0) == draws(augment, 0) and draws(augment, 0) != draws(augment, 1)
    variants = augment.variants_of(CAPTION, seed=0)
    assert len(variants) == augment.variants and variants == augment.variants_of(CAPTION, seed=0)
    assert variants != augment.variants_of(CAPTION, seed=1)
    torch.manual_seed(0)  # the global generator, as a trainable encoder's on-the-fly draws use
    first = [augment(CAPTION) for _ in range(8)]
    torch.manual_seed(0)
    assert first == [augment(CAPTION) for _ in range(8)]
