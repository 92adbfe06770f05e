"""Generate images from a folder written by `python -m text2img.export`, without text2img.

The loader: it imports only torch, diffusers, transformers, safetensors, Pillow, the standard library and its
standalone siblings, `text2img.encoders.text_model` (text encoding, also what `HFTextEncoder` encodes with),
`text2img.sampling.runtime` (the sampling loop, also what the diffusion generators sample with) and
`text2img.generators.patch_autoencoder` (the fitted patch code, a first stage), by relative imports. The export
copies them into every folder as the package `text2img_pipeline/` (this module as its
`__init__.py`, the siblings at their paths in text2img), where they run with `pip install torch diffusers
transformers safetensors` alone, and import each other, never an installed text2img: a folder keeps the code it
was exported with. The exported model therefore encodes and samples as the trained one does.

    pipe = Text2ImgPipeline.from_folder("exported/")
    images = pipe(["a red apple", "a green apple"], seed=0)   # PIL images; image i uses seed + i
    edited = pipe(["a green apple"], image=photo, mask_image=mask, strength=0.9)   # inpainting
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, ModelMixin, SchedulerMixin, UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .generators.patch_autoencoder import PatchAutoencoder
from .encoders.text_model import encode_tokens, hidden_indices, load_text_model, prepare_text_model, tokenize
from .sampling.runtime import (
    DEFAULT_STRENGTH,
    GENERATION_CHUNK,
    ImageEdit,
    Text,
    check_edit,
    generate_in_chunks,
    row_generators,
    sample,
    sampling_settings,
    transformer_prediction,
    unconditional,
    unet_prediction,
)

__all__ = ["GENERATION_CHUNK", "ImageEdit", "Sampling", "Text2ImgPipeline", "encode_tokens", "tokenize"]

log = logging.getLogger(__name__)

# The export folder's layout (written by text2img.export, read here).
FORMAT_VERSION = 1
SETTINGS_FILE = "text2img.json"
UNET_DIR = "unet"
# a diffusion transformer instead of the UNet, and its vector embedding (generator.time_vector) beside it
TRANSFORMER_DIR = "transformer"
VECTOR_EMBEDDING_FILE = "transformer/vector_embedding.safetensors"
SCHEDULER_DIR = "scheduler"
VAE_DIR = "vae"
TEXT_ENCODER_DIR = "text_encoder"
FUSION_FILE = "fusion/fusion.pt2"
NULL_TEXT_FILE = "fusion/null_text.safetensors"
# The loader's package: this module as its __init__.py, the modules it imports relatively beside it. Folders
# exported before the sampling runtime had one file, text2img_pipeline.py; the same import line loads either.
LOADER_PACKAGE = "text2img_pipeline"

# What `image=` and `mask_image=` take: one PIL image or tensor for every prompt, or one per prompt.
ImageInput = Image.Image | Sequence[Image.Image] | Tensor


@dataclass
class Sampling:
    """The generator's settings (`text2img.json` "generator"): where diffusion runs and its defaults."""

    image_size: int
    model_channels: int  # 3 for pixels, the first stage's latent channels otherwise
    model_size: int  # side of the space diffusion runs in (image_size / the first stage's downsampling)
    patch_size: int  # p x p patches: folded into channels before a UNet, a transformer's own patch size
    guidance_scale: float
    sample_steps: int
    num_train_timesteps: int


class Text2ImgPipeline:
    """Prompt -> text encoder -> fusion head -> denoising loop (classifier-free guidance) -> images, or edited
    images (image-to-image, inpainting); the loop is text2img's own (`text2img.sampling.runtime.sample`).

    The denoiser is `unet`, or `transformer` (a diffusion transformer) with, for a model that adds the fusion head's
    vector to its timestep embedding, `vector_embedding`.

    Image i's noise comes from `torch.Generator().manual_seed(seeds[i])` on the CPU, as in training, and every
    image is computed at the same shapes (prompts padded to the encoder's `max_length`, `GENERATION_CHUNK`
    images at a time), so a seed gives the same image as `Text2ImgModule.generate` with the checkpoint, bit
    for bit whatever else is in the batch.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel | None,
        scheduler: SchedulerMixin,
        fusion: nn.Module,
        null_text: dict[str, Tensor],
        tokenizer: PreTrainedTokenizerBase,
        text_model: PreTrainedModel,
        text_settings: dict[str, Any],
        sampling: Sampling,
        vae: AutoencoderKL | PatchAutoencoder | None = None,
        device: torch.device | str = "cpu",
        transformer: ModelMixin | None = None,
        vector_embedding: nn.Module | None = None,
    ) -> None:
        if (unet is None) == (transformer is None):
            raise ValueError("give the pipeline one denoiser: a unet or a transformer")
        self.unet = unet
        self.transformer = transformer
        self.vector_embedding = vector_embedding
        self.scheduler = scheduler
        self.fusion = fusion
        self.null_text = null_text
        self.tokenizer = tokenizer
        self.text_model = text_model
        self.text_settings = text_settings
        self.sampling = sampling
        self.vae = vae
        self.device = torch.device(device)
        # Exports before layer selection stored `layer` and `layer_mean`.
        self.hidden_indices = text_settings.get("hidden_indices") or hidden_indices(
            None, text_settings["layer"], text_settings.get("layer_mean", 1), text_model.config.num_hidden_layers
        )

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device | str = "cpu") -> Text2ImgPipeline:
        folder = Path(folder).expanduser()
        settings_file = folder / SETTINGS_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{folder} holds no {SETTINGS_FILE}; pass a folder written by text2img.export")
        settings = json.loads(settings_file.read_text())
        if settings.get("format") != FORMAT_VERSION:
            raise ValueError(f"{settings_file} has format {settings.get('format')}; this loader reads {FORMAT_VERSION}")
        unet = transformer = vector_embedding = None
        if (folder / TRANSFORMER_DIR).is_dir():
            transformer_class = json.loads((folder / TRANSFORMER_DIR / "config.json").read_text())["_class_name"]
            transformer = getattr(diffusers, transformer_class).from_pretrained(folder / TRANSFORMER_DIR)
            transformer = transformer.to(device).eval()
            if (folder / VECTOR_EMBEDDING_FILE).is_file():
                vector_embedding = load_vector_embedding(folder / VECTOR_EMBEDDING_FILE).to(device).eval()
        else:
            unet = UNet2DConditionModel.from_pretrained(folder / UNET_DIR).to(device).eval()
        scheduler_class = json.loads((folder / SCHEDULER_DIR / "scheduler_config.json").read_text())["_class_name"]
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder / SCHEDULER_DIR)
        vae = None
        if (folder / VAE_DIR).is_dir():
            # Frozen, as in text2img: some CPU kernels differ in the last bits when the weights require grad.
            vae_class = json.loads((folder / VAE_DIR / "config.json").read_text())["_class_name"]
            vae_class = PatchAutoencoder if vae_class == PatchAutoencoder.__name__ else AutoencoderKL
            vae = vae_class.from_pretrained(folder / VAE_DIR).to(device).eval().requires_grad_(False)
        program = torch.export.load(folder / FUSION_FILE)
        if torch.device(device).type != "cpu":
            program = torch.export.passes.move_to_device_pass(program, device)
        null_text = {name: value.to(device) for name, value in load_file(folder / NULL_TEXT_FILE).items()}
        text = settings["text_encoder"]
        dtype = getattr(torch, text["dtype"])
        if text["weights"] is not None:
            tokenizer, text_model = load_text_model(str(folder / text["weights"]), dtype)
        else:
            reference = text["reference"]
            tokenizer, text_model = load_text_model(
                reference["model"], dtype, reference.get("gguf_file"), reference.get("trust_remote_code", False)
            )
        prepare_text_model(tokenizer, text_model, text["identity"]["model"])
        if text_model.config.hidden_size != text["hidden_size"]:
            raise ValueError(
                f"the text encoder has hidden size {text_model.config.hidden_size} but the fusion head expects "
                f"{text['hidden_size']}; the reference {text['reference']} points to other weights"
            )
        return cls(
            unet=unet,
            scheduler=scheduler,
            fusion=program.module(),
            null_text=null_text,
            tokenizer=tokenizer,
            text_model=text_model.to(device).eval(),
            text_settings=text,
            sampling=Sampling(**settings["generator"]),
            vae=vae,
            device=device,
            transformer=transformer,
            vector_embedding=vector_embedding,
        )

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """The text encoder's tokens [B, L, D], mask [B, L] and pooled [B, D] for the prompts."""
        text = self.text_settings
        # Settings added after format 1 was fixed default to their old behaviour for earlier exports.
        texts = tokenize(
            self.tokenizer, prompts, template=text["template"], max_length=text["max_length"],
            chat_template=text.get("chat_template", False), system_prompt=text.get("system_prompt"),
            keep_tokens=text.get("keep_tokens", "all"),
        )
        if texts.truncated:
            log.warning(
                "%d of %d prompts truncated to max_length=%d tokens", texts.truncated, len(prompts), text["max_length"]
            )
        return encode_tokens(
            self.text_model, self.tokenizer, texts, max_length=text["max_length"], hidden_indices=self.hidden_indices,
            layer_norm=text.get("layer_norm", False), combine=text.get("combine", "mean"), pooling=text["pooling"],
            batch_size=text["batch_size"], device=self.device,
        )

    def _denoise(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Tensor:
        """The model's prediction for x at timesteps t; the fusion head runs at every step (it may use t).

        A UNet with a class embedding, or a transformer with a vector embedding, adds the head's vector to its
        timestep embedding (`generator.time_vector`); its fusion program then returns the vector as a third output.
        """
        cond_tokens, cond_mask, *vector = self.fusion(tokens, mask, pooled, t)
        if self.transformer is not None:
            added = vector[0] if self.vector_embedding is not None else None
            return transformer_prediction(self.transformer, x, t, cond_tokens, cond_mask, self.vector_embedding, added)
        class_labels = vector[0] if self.unet.config.class_embed_type is not None else None
        return unet_prediction(self.unet, x, t, cond_tokens, cond_mask, class_labels, self.sampling.patch_size)

    def to_model_space(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> what diffusion runs on: the first stage's scaled posterior mean, or the pixels."""
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def from_model_space(self, x: Tensor) -> Tensor:
        """The inverse of `to_model_space`: images in [-1, 1] (before clamping)."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        guidance_scale: float | None = None,
        steps: int | None = None,
        edit: ImageEdit | None = None,
    ) -> Tensor:
        """Images [B, 3, H, W] float in [0, 1]; image i depends only on prompts[i], seeds[i] and its edit input.

        `edit` (images in [-1, 1], see `ImageEdit`) edits given images instead of drawing new ones."""
        if not prompts:
            raise ValueError("no prompts given; pass one or more")
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        sampling = self.sampling
        guidance_scale, steps = sampling_settings(
            guidance_scale, steps, (sampling.guidance_scale, sampling.sample_steps), sampling.num_train_timesteps
        )
        if edit is not None:
            check_edit(edit, len(prompts), sampling.image_size)
        tokens, mask, pooled = self.encode(prompts)  # [B, max_length, D]: every prompt at the same length

        def generate_chunk(rows: list[int]) -> Tensor:
            text = (tokens[rows], mask[rows], pooled[rows])
            chunk_edit = None if edit is None else edit.rows(rows)
            return self._generate_chunk(text, [seeds[row] for row in rows], guidance_scale, steps, chunk_edit)

        return generate_in_chunks(len(prompts), generate_chunk)

    def _generate_chunk(
        self, text: Text, seeds: Sequence[int], guidance_scale: float, steps: int, edit: ImageEdit | None
    ) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for one chunk of encoded prompts and their seeds."""
        sampling = self.sampling
        null_text = unconditional(self.null_text["tokens"], self.null_text["pooled"], len(seeds))
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # samplers keep state between steps
        images = sample(
            self._denoise, scheduler, text, null_text, row_generators(seeds),
            (sampling.model_channels, sampling.model_size, sampling.model_size), guidance_scale, steps, edit=edit,
            to_model_space=self.to_model_space, from_model_space=self.from_model_space,
        )
        return (images.float() + 1) / 2

    def edit_input(
        self,
        count: int,
        image: ImageInput | None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
    ) -> ImageEdit | None:
        """The `ImageEdit` of `count` images for `image=`, `mask_image=` and `strength=`, or None without `image`.

        `image`: PIL images (transparency on white, centre-cropped and resized to the model's size as text2img's
        `init_image` is), or a tensor [B, 3, H, W] (or [3, H, W]) in [0, 1] at the model's size, as
        `output_type="pt"` gives. `mask_image`: white (or 1) regenerates, black (or 0) keeps; PIL images are
        thresholded at 127 after the image's crop, tensors [B, 1, H, W] must hold 0 and 1. One image or mask is
        used for every prompt. `strength` defaults to 0.8 for image-to-image and 1.0 for inpainting (diffusers').
        """
        if image is None:
            for name, value in (("mask_image", mask_image), ("strength", strength)):
                if value is not None:
                    raise ValueError(f"{name}= needs image=, the image to edit")
            return None
        size = self.sampling.image_size
        images = self._batch(image, count, "image", lambda pils: pils_to_tensor(pils, size), lambda pt: pt * 2 - 1)
        mask = None
        if mask_image is not None:
            mask = self._batch(mask_image, count, "mask_image", lambda pils: pils_to_mask(pils, size), Tensor.float)
        if strength is None:
            strength = DEFAULT_STRENGTH["img2img" if mask is None else "inpaint"]
        return ImageEdit(images=images, strength=float(strength), mask=mask)

    @staticmethod
    def _batch(
        value: ImageInput,
        count: int,
        name: str,
        from_pil: Callable[[list[Image.Image]], Tensor],
        from_tensor: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """`count` rows from one image or tensor, or from one per prompt."""
        if isinstance(value, Tensor):
            rows = from_tensor(value if value.dim() == 4 else value[None])
        else:
            rows = from_pil([value] if isinstance(value, Image.Image) else list(value))
        if len(rows) == 1:
            return rows.expand(count, -1, -1, -1)
        if len(rows) != count:
            raise ValueError(f"got {len(rows)} {name}s for {count} prompts; give one, or one per prompt")
        return rows

    def __call__(
        self,
        prompts: str | Sequence[str],
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        steps: int | None = None,
        output_type: str = "pil",
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
    ) -> list[Image.Image] | Tensor:
        """PIL images (`output_type="pil"`) or a [B, 3, H, W] tensor in [0, 1] ("pt"); an int seed gives
        image i the seed `seed + i`. `guidance_scale` and `steps` default to the trained model's.

        With `image`, the images are edited: image-to-image (SDEdit), or inpainting with `mask_image`; `strength`
        in (0, 1] is the share of the sampling trajectory that is re-run (see `edit_input`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type={output_type!r} is unknown; use pil or pt")
        edit = self.edit_input(len(prompts), image, mask_image, strength)
        images = self.generate(prompts, seeds, guidance_scale, steps, edit)
        if output_type == "pt":
            return images
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(array) for array in pixels]


def load_vector_embedding(path: Path) -> TimestepEmbedding:
    """The `TimestepEmbedding` (Linear -> SiLU -> Linear) saved at `path`, sized from its weights."""
    weights = load_file(path)
    width, features = weights["linear_1.weight"].shape
    embedding = TimestepEmbedding(features, width)
    embedding.load_state_dict(weights)
    return embedding


def pils_to_tensor(images: Sequence[Image.Image], size: int) -> Tensor:
    """[B, 3, size, size] float32 in [-1, 1]: transparency on white, centre-cropped and resized (Lanczos), as
    text2img reads `init_image=` (`load_rgb_square`, `uint8_to_tensor`), in its memory layout too: channels last,
    as the permuted [H, W, 3] pixels are, which CPU convolutions round differently from a contiguous batch."""
    rows = []
    for image in images:
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        rgb = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)
        rows.append(pixels.permute(2, 0, 1).float().div(127.5).sub(1.0))
    return torch.stack(rows).contiguous(memory_format=torch.channels_last)


def pils_to_mask(images: Sequence[Image.Image], size: int) -> Tensor:
    """[B, 1, size, size] of 0 (keep) and 1 (regenerate): grey above 127 regenerates, after the image's crop
    (nearest-neighbour keeps the mask's edge where it was drawn), as text2img reads `mask=`."""
    rows = []
    for image in images:
        grey = ImageOps.fit(image.convert("L"), (size, size), Image.Resampling.NEAREST)
        rows.append(torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(1, size, size) > 127)
    return torch.stack(rows).float()
