"""The dtype each kind of weight is loaded in, derived from `trainer.precision` (the one place precision is set).

Configs read it through the `weights_dtype` resolver (text2img.run.resolvers) (`oc.select`: a
config composed without a trainer means 32-true):

    dtype: ${weights_dtype:${oc.select:trainer.precision,32-true}}           # a frozen network (the first stage)
    dtype: ${weights_dtype:${oc.select:trainer.precision,32-true},${.mode}}  # a text encoder, frozen or trainable

Frozen weights are only ever read, so under a low precision they are loaded in it (half the memory, and the
embedding and latent caches are keyed by it). Trainable weights stay float32: `*-mixed` precisions compute in
the low precision under autocast and keep float32 master weights (LoRA adapters on a bfloat16 base included);
`*-true` precisions convert the whole LightningModule themselves.
"""

from __future__ import annotations

from text2img.errors import ConfigError

# The dtypes weights can be loaded in (`encoder.dtype`, `generator.first_stage.dtype`)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
# Lightning's precision settings (`trainer.precision`) -> the dtype of frozen weights
FROZEN_DTYPES = {
    "32-true": "float32", "32": "float32",
    # float64 would not fit the float32 embedding cache; Lightning converts the module itself
    "64-true": "float32", "64": "float32",
    "bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "bf16": "bfloat16",
    "16-mixed": "float16", "16-true": "float16", "16": "float16",
}


def weights_dtype(precision: str | int, mode: str = "frozen") -> str:
    """The dtype name ("float32", "bfloat16", "float16") to load weights in under `precision`; `mode` is a text
    encoder's (`frozen`, `lora`: a frozen base with float32 adapters, `full`: every weight trains, so float32)."""
    dtype = FROZEN_DTYPES.get(str(precision))
    if dtype is None:
        raise ConfigError(
            f"trainer.precision={precision} has no known weights dtype; use one of {', '.join(FROZEN_DTYPES)}, "
            "or set encoder.dtype and generator.first_stage.dtype yourself"
        )
    return "float32" if mode == "full" else dtype
