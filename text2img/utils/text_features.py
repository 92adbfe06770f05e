"""The width of a text encoder's token features, known from its settings before any weights load."""

from __future__ import annotations

from typing import Any


def text_features(hidden_size: int, layers: Any, combine: str) -> int:
    """`hidden_size`, times the number of layers when `combine=concat` joins a list of them on the feature axis."""
    if combine == "concat" and layers is not None and not isinstance(layers, (int, str)):
        return hidden_size * len(layers)
    return hidden_size
