"""Evaluation: the metrics the `Evaluation` callback and `text2img.evaluate` run (their frozen networks live in
`text2img.networks`)."""

from text2img.metrics.alignment import FixedTextLiTAlignment, LiTAlignment
from text2img.metrics.attributes import AttributeAccuracy, ShapesAttributeChecker
from text2img.metrics.base import EvalBatch, EvalContext, EvalMetric
from text2img.metrics.clip_score import CLIPScoreMetric, LocalCLIPScore
from text2img.metrics.distribution import ImageDistribution
from text2img.metrics.diversity import SampleDiversity
from text2img.metrics.inception import InceptionFeatures
from text2img.metrics.reconstruction import ReconstructionQuality

__all__ = [
    "AttributeAccuracy",
    "CLIPScoreMetric",
    "EvalBatch",
    "EvalContext",
    "EvalMetric",
    "ImageDistribution",
    "InceptionFeatures",
    "FixedTextLiTAlignment",
    "LiTAlignment",
    "LocalCLIPScore",
    "SampleDiversity",
    "ReconstructionQuality",
    "ShapesAttributeChecker",
]
