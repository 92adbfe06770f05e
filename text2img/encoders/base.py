"""The text-encoder contract shared by every language model the framework can use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import nn

from text2img.types import TextEmbedding


class TextEncoder(nn.Module, ABC):
    """Turns captions into a `TextEmbedding`.

    Weights are loaded lazily, on the first `encode`, so that a run whose captions are all in the
    embedding cache never loads the language model. `identity()` lists everything the output depends
    on besides the caption; the embedding cache keys its files by a hash of it.
    """

    hidden_size: int
    # the width of each token's features (hidden_size, or a multiple when several layers are concatenated)
    features: int
    max_length: int
    trainable: bool = False

    @abstractmethod
    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        """Embed captions; tokens are right-padded to `max_length`."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of what determines the output (model, layer, template, max length...)."""

    @property
    @abstractmethod
    def is_loaded(self) -> bool:
        """Whether the language model's weights are in memory."""

    def unload(self) -> None:
        """Free the language model's weights (a frozen encoder is not needed once its captions are cached)."""
