"""The text conditioner: everything between a caption and the text embedding a fusion head reads."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from text2img.data.caption_augment import CaptionAugment
from text2img.encoders.base import TextEncoder
from text2img.encoders.cache import EmbeddingCache
from text2img.errors import ConfigError
from text2img.prompts import PromptExpander
from text2img.types import TextEmbedding
from text2img.utils.rng import random_state_kept

# With augmentation on the fly, each training item's draw (`Batch.caption_draws`) seeds its augmentation.
SEED_DRAWS = 2**62

# State-dict names before the conditioner existed (the module held them) -> its names now.
RENAMED = {
    "null_tokens": "conditioner.null_tokens", "null_pooled": "conditioner.null_pooled", "encoder.": "conditioner.encoder.",
}

T = TypeVar("T")


def caption_draws(augment: CaptionAugment | None, on_the_fly: bool) -> int:
    """The range of each training item's draw (`Batch.caption_draws`) for `augment` (None or disabled: 1, no draw):
    the index of a cached variant, or, `on_the_fly`, the seed of an augmentation."""
    if augment is None or not augment.enabled:
        return 1
    return SEED_DRAWS if on_the_fly else augment.variants


def upgraded_key(key: str) -> str:
    """A LightningModule state-dict key of a checkpoint written before the conditioner, under its name now."""
    for old, new in RENAMED.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return key


def upgrade_state_dict(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`state` with the keys under `prefix` that use the names before the conditioner renamed (see `upgraded_key`)."""
    return {
        prefix + upgraded_key(key[len(prefix):]) if key.startswith(prefix) else key: value
        for key, value in state.items()
    }


class Shared(Generic[T]):
    """Holds an object outside the module tree: not in `state_dict`, `parameters()` or `.to()`, and shared by copies
    of the module (the EMA callback's averaged copy does not duplicate a frozen language model)."""

    def __init__(self, value: T) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> Shared[T]:
        return self


@dataclass(frozen=True)
class CaptionSets:
    """The captions a run's text side must know: the training ones, and those it evaluates (validation and test).
    The data module lists them (`Text2ImgDataModule.caption_sets`); the conditioner never reads images."""

    train: list[str]
    evaluation: list[str]


@dataclass
class Prompts:
    """Captions (or user prompts), the text the encoder reads for each (its expansion and/or augmentation, else
    itself) and that text's embedding."""

    captions: list[str]
    texts: list[str]
    text: TextEmbedding


@dataclass
class TextTable:
    """Cached frozen-encoder embeddings of every text the run reads, one row per text: filled by `setup`."""

    embedding: TextEmbedding
    row_of: dict[str, int] = field(default_factory=dict)
    # each row's token count, read once: trimming a batch then needs no tensor -> int conversion in a step
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = self.embedding.mask.sum(1).tolist()

    def holds(self, texts: Sequence[str]) -> bool:
        return all(text in self.row_of for text in texts)

    def __getitem__(self, texts: Sequence[str]) -> TextEmbedding:
        return self.embedding[torch.tensor([self.row_of[text] for text in texts], dtype=torch.long)]

    def trimmed(self, texts: Sequence[str]) -> TextEmbedding:
        """`self[texts].trimmed()` (the columns up to the longest text's), computed from the stored lengths."""
        rows = [self.row_of[text] for text in texts]
        length = max(max((self.lengths[row] for row in rows), default=0), 1)
        index = torch.tensor(rows, dtype=torch.long)
        return TextEmbedding(
            self.embedding.tokens[index, :length], self.embedding.mask[index, :length], self.embedding.pooled[index]
        )


class TextConditioner(nn.Module):
    """Captions -> `TextEmbedding`s for the generator's fusion head, owned by the LightningModule (sgm's
    `GeneralConditioner`, for one text encoder).

    It holds the text encoder, frozen or trainable (`encoder.trainable`; only a trainable one is a submodule, so
    its weights are in the model's state dict as `conditioner.encoder.*`); the on-disk `EmbeddingCache` of the
    frozen encoder's embeddings; the `PromptExpander` that rewrites captions before encoding (`expander.train`:
    training captions, `expander.sample`: evaluation and sampling prompts); the `CaptionAugment` of training
    captions; the frozen `reference_encoder` (the trainable encoder's base weights: the evaluation's text side, so
    the yardstick is the same before, during and after training, and the same as a frozen run's); the learned null
    embedding `null_tokens`/`null_pooled` (classifier-free guidance's unconditional branch); and caption dropout.

    What the encoder reads for a training caption: its expansion (`expander.train`), augmented with
    `caption_augment` after expansion. With a frozen encoder, `caption_augment.variants` fixed versions of each
    caption are cached and each training item draws one; with a trainable one (or `augment_on_the_fly`, for
    streamed captions) each item's draw seeds a fresh augmentation. The draw (`Batch.caption_draws`, an integer in
    `[0, caption_draws)`) is made by the data loader from torch's generator, which the loader seeds per batch, so
    a resumed run redraws the same and the training step draws nothing.

    Lifecycle: `prepare` (once per node, on the training device: expands captions and fills the embedding cache,
    then unloads the language models), `setup` (every process: reads the cache into a table, never loading a
    language model), then `encode_captions`/`unconditional`/`drop` in the steps, `reference` for evaluation and
    `sampling` for user prompts.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        cache_dir: str | Path,
        text_dim: int | None = None,
        expander: PromptExpander | None = None,
        caption_augment: CaptionAugment | None = None,
        reference_encoder: TextEncoder | None = None,
        caption_dropout: float = 0.1,
        next_token_loss: bool = False,
        augment_on_the_fly: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"model.caption_dropout={caption_dropout} must be in [0, 1)")
        if encoder.trainable != (reference_encoder is not None) or getattr(reference_encoder, "trainable", False):
            raise ValueError("give a reference_encoder (frozen) exactly when the encoder trains")
        if next_token_loss and not encoder.trainable:
            raise ConfigError(
                "model.text_loss_weight and model.encoder_lr apply to an encoder that trains, but the encoder is "
                "frozen; use peft=lora or encoder.mode=full, or leave them at 0 and null"
            )
        self.trainable = encoder.trainable
        if self.trainable:
            # Loaded now: the optimizer needs its parameters, a resumed checkpoint its LoRA layers, and the null
            # embedding's random init below comes after the weights' (the order runs have always had).
            encoder.load(whole=next_token_loss)
            if next_token_loss:
                encoder.check_next_token_loss()
        self.encoder: TextEncoder | None = encoder if self.trainable else None
        self.frozen = Shared(encoder)
        self._reference = Shared(encoder if reference_encoder is None else reference_encoder)
        self.cache = EmbeddingCache(cache_dir)
        self.expander = expander
        self.caption_augment = caption_augment if caption_augment is not None and caption_augment.enabled else None
        self.augment_on_the_fly = self.caption_augment is not None and (self.trainable or augment_on_the_fly)
        self.caption_dropout = caption_dropout
        text_dim = encoder.features if text_dim is None else text_dim
        self.null_tokens = nn.Parameter(torch.randn(1, text_dim) * 0.02)
        self.null_pooled = nn.Parameter(torch.randn(text_dim) * 0.02)
        # caption -> the texts the encoder may read for it, for training and for evaluation/sampling
        self.texts_of: dict[bool, dict[str, list[str]]] = {True: {}, False: {}}
        self.table: TextTable | None = None

    @property
    def text_encoder(self) -> TextEncoder:
        """The encoder, frozen or trainable."""
        return self.frozen.value

    @property
    def reference_encoder(self) -> TextEncoder:
        """The evaluation's frozen text side: the encoder itself when it is frozen, else its base weights."""
        return self._reference.value

    @property
    def caption_draws(self) -> int:
        """The range of each training item's draw (`Batch.caption_draws`); 1: no draw."""
        return caption_draws(self.caption_augment, self.augment_on_the_fly)

    def __deepcopy__(self, memo: dict[int, Any]) -> TextConditioner:
        # The table and expansions are read-only data that copies (EMA's averaged model) share.
        shared = {"table": self.table, "texts_of": self.texts_of}
        memo.update({id(value): value for value in shared.values()})
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone

    # ----- preparation -------------------------------------------------------------------------------------------

    def _expanded(self, captions: Sequence[str], training: bool, device: torch.device | str = "cpu") -> list[str]:
        """What the encoder reads for each caption before augmentation: its expansion where prompt expansion is on
        for training (`training`) or for evaluation and sampling, else the caption itself."""
        if self.expander is None or not self.expander.enabled_for(training):
            return list(captions)
        return self.expander.expand(captions, device)

    def _options(
        self, captions: Sequence[str], training: bool, device: torch.device | str = "cpu"
    ) -> dict[str, list[str]]:
        """caption -> the texts the encoder may read for it: one, or the cached variants of an augmented training
        caption (an augmentation on the fly starts from the one). Prepared captions are looked up, others (streamed
        training captions, user prompts) computed."""
        known = self.texts_of[training]
        new = sorted(set(captions) - known.keys())
        options = {c: known[c] for c in captions if c in known}
        if new:
            texts = self._expanded(new, training, device)
            if training and self.caption_augment is not None and not self.augment_on_the_fly:
                options.update({c: self.caption_augment.variants_of(t) for c, t in zip(new, texts)})
            else:
                options.update({c: [t] for c, t in zip(new, texts)})
        return options

    def _learn_texts(self, captions: Sequence[str], training: bool, device: torch.device | str = "cpu") -> None:
        self.texts_of[training].update(self._options(captions, training, device))

    def _all_texts(self, captions: CaptionSets, device: torch.device | str = "cpu") -> list[str]:
        """Every text the encoder may read for `captions`, sorted; prompt expansion's model is unloaded after."""
        for training, names in ((True, captions.train), (False, captions.evaluation)):
            self._learn_texts(names, training, device)
        if self.expander is not None:
            self.expander.unload()
        wanted = [(True, c) for c in captions.train] + [(False, c) for c in captions.evaluation]
        return sorted({text for training, c in wanted for text in self.texts_of[training][c]})

    def prepare(self, captions: CaptionSets, device: torch.device | str = "cpu") -> None:
        """Expand the captions and fill the embedding cache (a frozen encoder's: a trainable one's embeddings change
        as it trains), loading each language model only if something is missing, and unload them afterwards.
        Leaves torch's random state as it was, so that a cold cache (a model's conversion or random init, a prompt
        expansion's sampling) does not change how the run trains."""
        with random_state_kept(device):
            texts = self._all_texts(captions, device)
            if not self.trainable:
                self.cache.lookup(self.text_encoder, texts)
                self.text_encoder.unload()

    def setup(self, captions: CaptionSets) -> None:
        """Read the prepared cache into the table the steps read (a frozen encoder only); never loads a model."""
        texts = self._all_texts(captions)
        if not self.trainable and self.table is None:
            embedding = self.cache.lookup(self.text_encoder, texts, padded=False)
            self.table = TextTable(embedding, {t: i for i, t in enumerate(texts)})

    # ----- the steps ---------------------------------------------------------------------------------------------

    def texts(self, captions: Sequence[str], draws: Sequence[int] | None = None, training: bool = False) -> list[str]:
        """What the encoder reads for each caption; `draws` are the training items' `Batch.caption_draws`."""
        options = self._options(captions, training)
        choices = [options[caption] for caption in captions]
        if draws is None:
            return [options[0] for options in choices]
        if self.augment_on_the_fly:
            assert self.caption_augment is not None
            return [
                self.caption_augment(options[0], torch.Generator().manual_seed(int(draw)))
                for options, draw in zip(choices, draws)
            ]
        return [options[draw] for options, draw in zip(choices, draws)]

    def encode(self, texts: Sequence[str]) -> TextEmbedding:
        """Embeddings of the texts the encoder reads, trimmed to the longest, on the module's device: a trainable
        encoder's (with gradients when enabled), else the table's cached rows, else (streamed captions) the frozen
        encoder's, which then stays loaded."""
        device = self.null_tokens.device
        if self.encoder is not None:
            return self.encoder.encode(texts).trimmed()
        if self.table is not None and self.table.holds(texts):
            return self.table.trimmed(texts).to(device)
        with torch.no_grad():
            return self.text_encoder.to(device).encode(texts).trimmed()

    def encode_captions(
        self, captions: Sequence[str], draws: Sequence[int] | None = None, training: bool = False
    ) -> Prompts:
        """`texts` of the captions and their embeddings (`encode`)."""
        texts = self.texts(captions, draws, training)
        return Prompts(list(captions), texts, self.encode(texts))

    def text_loss(self, texts: Sequence[str]) -> Tensor:
        """The trainable encoder's own next-token loss on `texts` (keeps a tuned LLM from drifting from language)."""
        assert self.encoder is not None, "the next-token loss needs an encoder that trains"
        return self.encoder.next_token_loss(texts)

    def unconditional(self, n: int) -> TextEmbedding:
        """The learned unconditional embedding for `n` rows: one token, always attended."""
        device = self.null_tokens.device
        return TextEmbedding(
            tokens=self.null_tokens.expand(n, 1, -1),
            mask=torch.ones(n, 1, dtype=torch.bool, device=device),
            pooled=self.null_pooled.expand(n, -1),
        )

    def drop(self, text: TextEmbedding) -> TextEmbedding:
        """Caption dropout: a random `caption_dropout` fraction of the rows replaced by the null embedding."""
        if self.caption_dropout == 0.0:
            return text
        batch = len(text)
        drop = torch.rand(batch, device=text.tokens.device) < self.caption_dropout
        null_tokens = torch.zeros_like(text.tokens)
        null_tokens[:, 0] = self.null_tokens.to(text.tokens.dtype)
        null_mask = torch.zeros_like(text.mask)
        null_mask[:, 0] = True
        return TextEmbedding(
            tokens=torch.where(drop[:, None, None], null_tokens, text.tokens),
            mask=torch.where(drop[:, None], null_mask, text.mask),
            pooled=torch.where(
                drop[:, None], self.null_pooled.to(text.pooled.dtype).expand_as(text.pooled), text.pooled
            ),
        )

    # ----- evaluation and sampling -------------------------------------------------------------------------------

    def reference(self, captions: Sequence[str]) -> Prompts:
        """The evaluation's text side for evaluated captions: what the encoder reads for them and the frozen
        (reference) encoder's cached embeddings of it, padded to `max_length`, whatever training did to a trainable
        encoder. Read from the cache, which `prepare` filled."""
        texts = self.texts(captions)
        text = self.cache.lookup(self.reference_encoder, texts)
        self.reference_encoder.unload()
        return Prompts(list(captions), texts, text)

    def sampling(self, prompts: Sequence[str]) -> Prompts:
        """User prompts: what the encoder reads (their expansions if `expander.sample`) and its embeddings, padded to
        `max_length` (an image does not depend on its batch's longest prompt): a frozen encoder's from the cache,
        encoding (and caching) only new ones, or a trainable one's current weights'. Language models are unloaded
        afterwards."""
        texts = self._expanded(prompts, training=False)
        if self.expander is not None:
            self.expander.unload()
        if self.encoder is not None:
            with torch.no_grad():
                return Prompts(list(prompts), texts, self.encoder.encode(texts))
        text = self.cache.lookup(self.text_encoder, texts)
        self.text_encoder.unload()
        return Prompts(list(prompts), texts, text)
