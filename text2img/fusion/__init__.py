from text2img.fusion.base import FusionHead
from text2img.fusion.deep import DeepFusion
from text2img.fusion.film import FiLMHead
from text2img.fusion.perceiver import PerceiverResampler
from text2img.fusion.pooled_mlp import PooledMLP
from text2img.fusion.refiner import TokenRefiner
from text2img.fusion.timestep_aware import TimestepAwarePerceiver
from text2img.fusion.token_projection import TokenProjection

__all__ = [
    "DeepFusion",
    "FiLMHead",
    "FusionHead",
    "PerceiverResampler",
    "PooledMLP",
    "TimestepAwarePerceiver",
    "TokenProjection",
    "TokenRefiner",
]
