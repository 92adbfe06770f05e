from text2img.fusion.base import FusionHead
from text2img.fusion.token_projection import TokenProjection

__all__ = ["FusionHead", "TokenProjection"]
