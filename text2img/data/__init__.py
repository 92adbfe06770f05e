"""Image-caption data sources, their deterministic splits and training augmentation."""

from text2img.data.augment import ImageAugment
from text2img.data.base import ArrayImageDataset, ImageCaptionDataset, ImageCaptionSource
from text2img.data.captions import caption_from_name, emoji_caption
from text2img.data.imagefolder import ImageFolderSource
from text2img.data.openmoji import OpenMojiSource
from text2img.data.shapes import ShapesSource
from text2img.data.splits import SPLITS, split_indices
from text2img.data.webdataset import WebDatasetSource

__all__ = [
    "SPLITS",
    "ArrayImageDataset",
    "ImageAugment",
    "ImageCaptionDataset",
    "ImageCaptionSource",
    "ImageFolderSource",
    "OpenMojiSource",
    "ShapesSource",
    "WebDatasetSource",
    "caption_from_name",
    "emoji_caption",
    "split_indices",
]
