"""Text encoders (language models as caption encoders) and the on-disk embedding cache."""

from text2img.encoders.base import TextEncoder
from text2img.encoders.cache import CacheStats, EmbeddingCache
from text2img.encoders.hf import HFTextEncoder
from text2img.encoders.minilm import MiniLMEncoder
from text2img.encoders.smollm2 import SmolLM2Encoder
from text2img.encoders.tiny import TinyEncoder

__all__ = [
    "CacheStats",
    "EmbeddingCache",
    "HFTextEncoder",
    "MiniLMEncoder",
    "SmolLM2Encoder",
    "TextEncoder",
    "TinyEncoder",
]
