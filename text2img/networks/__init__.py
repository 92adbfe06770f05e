"""Frozen networks shared by training and evaluation: image feature extractors, their feature cache and the
LiT alignment model (the GAN's alignment loss and the alignment metrics both read them)."""

from text2img.networks.effnet import EfficientNetLite0Features
from text2img.networks.features import RealFeatureCache
from text2img.networks.frozen import FrozenNetwork, ImageFeatureExtractor
from text2img.networks.lit import LiTConfig, LiTEvaluator, load_or_train_lit

__all__ = [
    "EfficientNetLite0Features", "FrozenNetwork", "ImageFeatureExtractor", "LiTConfig", "LiTEvaluator",
    "RealFeatureCache", "load_or_train_lit",
]
