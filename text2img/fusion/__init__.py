from text2img.fusion.base import FusionHead
from text2img.fusion.perceiver import PerceiverResampler
from text2img.fusion.pooled_mlp import PooledMLP
from text2img.fusion.token_projection import TokenProjection

__all__ = ["FusionHead", "PerceiverResampler", "PooledMLP", "TokenProjection"]
