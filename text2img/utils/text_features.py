"""The width of a text encoder's token features, known from its settings before any weights load."""

from __future__ import annotations

from typing import Any


def text_features(hidden_size: int, layers: Any, combine: str, num_layers: int | None = None) -> int:
    """`hidden_size`, times the number of layers read when `combine=concat` joins them on the feature axis (a list of
    them, or `all`: the model's `num_layers` blocks)."""
    if combine != "concat" or layers is None or isinstance(layers, int):
        return hidden_size
    if layers == "all":
        if num_layers is None:
            raise ValueError("encoder.layers=all with encoder.combine=concat needs encoder.num_layers, the model's layers")
        return hidden_size * num_layers
    return hidden_size * len(layers)
