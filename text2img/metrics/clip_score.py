"""CLIPScore (torchmetrics' definition) from a local CLIP folder, working with transformers 5.

torchmetrics' `CLIPScore` normalises whatever `CLIPModel.get_image_features` / `get_text_features` return;
transformers 5 returns a `BaseModelOutputWithPooling` (the embeddings are its `pooler_output`) instead of a
tensor, so upstream fails with "'BaseModelOutputWithPooling' object has no attribute 'norm'". Upstream also
accepts only a few hub names. `LocalCLIPScore` keeps torchmetrics' update, states and compute and hands it a
model adapter that returns the embedding tensors.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics.multimodal.clip_score import CLIPScore

from text2img.errors import ConfigError
from text2img.metrics.base import EvalBatch, EvalMetric
from text2img.networks.frozen import FrozenNetwork, check_images

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor


class CLIPEmbeddings(FrozenNetwork):
    """A frozen CLIPModel whose `get_image_features` / `get_text_features` return the embedding tensors."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False)
        # torchmetrics reads `config.text_config.max_position_embeddings` to truncate long captions.
        self.config = clip.config
        self.eval()

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        # bf16/fp16 autocast would put ~0.5% noise on every cosine; embed in the weights' dtype.
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            output = self.clip.get_image_features(pixel_values=pixel_values.to(self.clip.dtype))
        return output.pooler_output  # the projected embeddings

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.autocast(device_type=input_ids.device.type, enabled=False):
            output = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return output.pooler_output


def load_clip(model_name_or_path: str) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIPModel and its CLIPProcessor from a `save_pretrained` folder or a hub name."""
    # Imported here: transformers' CLIP costs ~2 s to import, paid only when the metric is built.
    from transformers import CLIPModel, CLIPProcessor

    source = os.path.expanduser(model_name_or_path)
    try:
        return CLIPModel.from_pretrained(source), CLIPProcessor.from_pretrained(source)
    except OSError as exc:  # transformers' error for a missing folder, missing files or an unreachable hub
        raise ConfigError(
            f"clip_score: no CLIP model at '{model_name_or_path}': save a transformers CLIPModel and its "
            "CLIPProcessor there (model.save_pretrained(path); processor.save_pretrained(path)), "
            "or name a hub model such as openai/clip-vit-large-patch14 when online"
        ) from exc


class LocalCLIPScore(CLIPScore):
    """torchmetrics' CLIPScore, `max(100 * mean cos(E_image, E_caption), 0)`, on a CLIP model given by path.

    States are the running sum of 100*cos and the sample count (both reduced by sum across processes).
    Note torchmetrics clips the *mean* at 0, not each sample; real CLIP image-caption cosines are positive,
    so the two agree in practice.
    """

    metric_name = "clip_score"

    def __init__(self, model_name_or_path: str, **kwargs: Any) -> None:
        clip, processor = load_clip(model_name_or_path)
        super().__init__(model_name_or_path=lambda: (CLIPEmbeddings(clip), processor), **kwargs)

    def update(self, images: Tensor, captions: list[str]) -> None:
        """Add a batch: images [B,3,H,W] float in [0,1], one caption per image."""
        check_images(images)
        # CLIP processors rescale by 1/255 themselves and reject non-integer values above 1: give them 8 bits.
        pixels = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)
        super().update(pixels, captions)


class CLIPScoreMetric(EvalMetric):
    """`clip_score` of generated images and their prompts, for users who have CLIP weights (off by default:
    `metrics=[image,clip_score] metrics.clip_score.model=/path/to/clip`)."""

    FIGURES = (LocalCLIPScore.metric_name,)

    def __init__(self, model: str) -> None:
        super().__init__()
        self.clip = LocalCLIPScore(model)

    def update(self, batch: EvalBatch) -> None:
        self.clip.update(batch.outputs.images, batch.outputs.captions)

    def compute(self) -> dict[str, Tensor]:
        return {LocalCLIPScore.metric_name: self.clip.compute()}

    def reset(self) -> None:
        super().reset()
        self.clip.reset()  # a child metric: torchmetrics resets only the parent's own states
