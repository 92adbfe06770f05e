"""Prompt expansion: deterministic greedy rewrites in the chat format, cached on disk so a second run never loads
the model; the data module encodes the expansions and keeps the original captions."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from text2img.encoders import TinyEncoder
from text2img.encoders.tiny import BOS, EOS, PAD, VOCAB_SIZE, byte_tokenizer
from text2img.prompts import PromptExpander

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}|{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
CAPTIONS = ["red apple", "grinning face", "a much longer caption, with parts"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer GPT-2 causal LM with the byte tokenizer and a chat template, saved as a local folder."""
    folder = tmp_path_factory.mktemp("tiny_lm") / "tiny-chat-lm"
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=VOCAB_SIZE,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def expander(tiny_lm: Path, cache_dir: Path, **options) -> PromptExpander:
    return PromptExpander(cache_dir=cache_dir, model=str(tiny_lm), **{"max_new_tokens": 8, **options})


def never_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self):
        raise AssertionError("the expander's model was loaded")

    monkeypatch.setattr(PromptExpander, "_load_pretrained", fail)


def test_greedy_expansion_is_deterministic_and_batch_independent(tiny_lm: Path, tmp_path: Path) -> None:
    first = expander(tiny_lm, tmp_path / "a")
    out = first.generate(CAPTIONS)
    assert out == first.generate(CAPTIONS)
    # left padding: a caption's expansion does not depend on the others in its batch
    assert out == [first.generate([caption])[0] for caption in CAPTIONS]
    assert all("\n" not in text and text == text.strip() for text in out)


def test_prompt_is_the_chat_formatted_instruction(tiny_lm: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []
    model = expander(tiny_lm, tmp_path, instruction="Expand: {caption}", system_prompt="be vivid")
    model.load()
    original = model.tokenizer.__call__

    def spy(texts, **kwargs):
        seen.extend(texts)
        return original(texts, **kwargs)

    monkeypatch.setattr(type(model.tokenizer), "__call__", lambda self, texts, **kw: spy(texts, **kw))
    model.generate(["red apple"])
    assert seen == ["[system]be vivid|[user]Expand: red apple|[assistant]"]
    assert model.tokenizer.padding_side == "left"


def test_second_expander_reads_the_cache_without_loading(tiny_lm: Path, tmp_path: Path, monkeypatch) -> None:
    first = expander(tiny_lm, tmp_path)
    expanded = first.expand(CAPTIONS)
    assert first.is_loaded
    folder = tmp_path / first.cache_key
    assert json.loads((folder / "identity.json").read_text()) == first.identity()
    assert not list(folder.glob(".*.tmp"))
    never_load(monkeypatch)
    second = expander(tiny_lm, tmp_path)
    assert second.expand(list(reversed(CAPTIONS))) == list(reversed(expanded))
    assert not second.is_loaded


@pytest.mark.parametrize(
    "change", [{"instruction": "Detail: {caption}"}, {"max_new_tokens": 4}, {"system_prompt": "be brief"}]
)
def test_changing_the_expander_changes_the_key(tiny_lm: Path, tmp_path: Path, change: dict) -> None:
    assert expander(tiny_lm, tmp_path, **change).cache_key != expander(tiny_lm, tmp_path).cache_key


def test_empty_output_falls_back_to_the_caption(tiny_lm: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    model = expander(tiny_lm, tmp_path)
    monkeypatch.setattr(model, "generate", lambda captions, device="cpu": ["", "a big grin"])
    with caplog.at_level(logging.WARNING):
        assert model.expand(["red apple", "grinning face"]) == ["red apple", "a big grin"]
    assert "prompt expansion: 1 of 2 outputs were empty (e.g. for 'red apple')" in caplog.text


def test_bad_settings_raise_one_line_errors(tiny_lm: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^prompt_expansion.instruction='Describe' lacks '\{caption\}'; add it"):
        expander(tiny_lm, tmp_path, instruction="Describe")
    with pytest.raises(ValueError, match=r"prompt_expansion.max_new_tokens=0 .* must be >= 1"):
        PromptExpander(cache_dir=tmp_path, model=str(tiny_lm), max_new_tokens=0)


def test_the_conditioner_encodes_expansions_and_the_batches_keep_captions(
    tiny_lm: Path, imagefolder: Path, tmp_path: Path
) -> None:
    from text2img.conditioning import TextConditioner
    from text2img.data import ImageFolderSource
    from text2img.lightning import Text2ImgDataModule

    source = ImageFolderSource(imagefolder, image_size=32, val_fraction=0.2, test_fraction=0.2)
    datamodule = Text2ImgDataModule(source, batch_size=4)
    datamodule.setup()
    captions = datamodule.caption_sets()
    plain = TextConditioner(TinyEncoder(max_length=64), tmp_path / "emb")
    plain.setup(captions)
    prompts = expander(tiny_lm, tmp_path / "exp", sample=False)
    expanding = TextConditioner(TinyEncoder(max_length=64), tmp_path / "emb", expander=prompts)
    expanding.prepare(captions)
    assert not prompts.is_loaded  # unloaded once every caption is expanded
    expanding.setup(captions)
    train_captions = captions.train
    expansions = prompts.expand(train_captions)
    assert expansions != train_captions
    # the embedding cache holds the expansions: they are what the table rows embed
    assert set(expansions) <= set(expanding.table.row_of) and not set(train_captions) & set(expanding.table.row_of)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.captions[0] in train_captions  # the data module serves captions; the conditioner expands them
    assert expanding.texts(batch.captions, training=True) == [dict(zip(train_captions, expansions))[c] for c in batch.captions]
    # sample=false: validation reads the captions as they are, with the embeddings of a plain run
    val = next(iter(datamodule.val_dataloader()))
    assert expanding.texts(val.captions) == val.captions
    torch.testing.assert_close(expanding.encode_captions(val.captions).text.tokens, plain.encode_captions(val.captions).text.tokens)
    assert expanding.sampling(["red apple"]).texts == ["red apple"]


@pytest.mark.slow
def test_packaged_smollm2_expands_a_caption(tmp_path: Path, asset_cache_dir: Path) -> None:
    smollm2 = PromptExpander(cache_dir=tmp_path, models_dir=asset_cache_dir / "models")
    start = time.perf_counter()
    [expanded] = smollm2.expand(["grinning face with sweat"])
    print(f"\nSmolLM2 expansion ({time.perf_counter() - start:.1f} s): {expanded!r}")
    assert expanded and expanded != "grinning face with sweat" and "\n" not in expanded


def test_sampling_prompts_are_expanded_when_sample_is_on(
    tiny_lm: Path, imagefolder: Path, tmp_path: Path, monkeypatch
) -> None:
    from text2img.conditioning import TextConditioner

    prompts = expander(tiny_lm, tmp_path / "exp", train=False)
    conditioner = TextConditioner(TinyEncoder(max_length=64), tmp_path / "emb", expander=prompts)
    [expected] = prompts.expand(["red apple"])
    never_load(monkeypatch)  # cached now: sampling reads the expansion
    sampled = conditioner.sampling(["red apple"])
    texts, text = sampled.texts, sampled.text
    assert texts == [expected] != ["red apple"]
    torch.testing.assert_close(text.pooled, TinyEncoder(max_length=64).encode([expected]).pooled, atol=1e-5, rtol=1e-4)
