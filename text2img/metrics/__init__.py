"""Evaluation: feature extractors, the metrics the `Evaluation` callback and `text2img.evaluate` run."""

from text2img.metrics.alignment import LiTAlignment
from text2img.metrics.attributes import AttributeAccuracy, ShapesAttributeChecker
from text2img.metrics.base import EvalBatch, EvalContext, EvalMetric
from text2img.metrics.clip_score import CLIPScoreMetric, LocalCLIPScore
from text2img.metrics.distribution import ImageDistribution
from text2img.metrics.diversity import SampleDiversity
from text2img.metrics.effnet import EfficientNetLite0Features
from text2img.metrics.features import RealFeatureCache
from text2img.metrics.inception import InceptionFeatures
from text2img.metrics.lit import LiTConfig, LiTEvaluator, load_or_train_lit
from text2img.metrics.reconstruction import ReconstructionQuality

__all__ = [
    "AttributeAccuracy",
    "CLIPScoreMetric",
    "EfficientNetLite0Features",
    "EvalBatch",
    "EvalContext",
    "EvalMetric",
    "ImageDistribution",
    "InceptionFeatures",
    "LiTAlignment",
    "LiTConfig",
    "LiTEvaluator",
    "LocalCLIPScore",
    "RealFeatureCache",
    "SampleDiversity",
    "load_or_train_lit",
    "ReconstructionQuality",
    "ShapesAttributeChecker",
]
