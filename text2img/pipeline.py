"""Generate images from a folder written by `python -m text2img.export`, without text2img.

This module imports only torch, diffusers, transformers, safetensors and the standard library: the export
copies it into every folder as `text2img_pipeline.py`, where it runs with `pip install torch diffusers
transformers safetensors` alone. text2img uses its text-encoding functions too (`HFTextEncoder.encode`
calls `tokenize` and `encode_tokens`), so the exported encoder cannot drift from the trained one.

    pipe = Text2ImgPipeline.from_folder("exported/")
    images = pipe(["a red apple", "a green apple"], seed=0)   # PIL images; image i uses seed + i
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.utils import cached_file

log = logging.getLogger(__name__)

# The export folder's layout (written by text2img.export, read here).
FORMAT_VERSION = 1
SETTINGS_FILE = "text2img.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
VAE_DIR = "vae"
TEXT_ENCODER_DIR = "text_encoder"
FUSION_FILE = "fusion/fusion.pt2"
NULL_TEXT_FILE = "fusion/null_text.safetensors"
LOADER_FILE = "text2img_pipeline.py"


# ---- Text encoding: a frozen language model's hidden states, one row per caption ----


def load_gguf(
    name_or_path: str, gguf_file: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Dequantise a GGUF checkpoint into a plain base model (no LM head) and its tokenizer.

    Not `from_pretrained(gguf_file=...)`: in transformers 5 that requires `accelerate`. Building the model
    from the GGUF's config and loading its dequantised tensors gives bit-identical weights.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
    model = AutoModel.from_config(AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file), dtype=dtype)
    path = cached_file(name_or_path, gguf_file)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    # Extra tensors (an untied LM head) are not needed by the base model; missing ones would be random.
    missing, _ = model.load_state_dict(tensors, strict=False)
    if missing:
        raise ValueError(
            f"{gguf_file} has no weights for {len(missing)} parameters of {type(model).__name__} "
            f"(e.g. {missing[0]}); convert the model to safetensors and load that folder instead"
        )
    return tokenizer, model.eval()


def load_text_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, gguf_file: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and base model from a hub name or a local folder (optionally a GGUF file in it)."""
    if gguf_file:
        return load_gguf(name_or_path, gguf_file, dtype)
    remote = {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **remote)
    return tokenizer, AutoModel.from_pretrained(name_or_path, dtype=dtype, **remote)


def prepare_text_model(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, name: str) -> None:
    """Right padding (a caption's real positions then do not depend on its batch), a pad token, no KV cache."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name}'s tokenizer has neither a pad nor an eos token; pick another model")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    *,
    template: str,
    max_length: int,
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids per caption, unpadded, and how many captions `max_length` cut.

    With `chat_template`, the templated caption becomes the user turn of the tokenizer's chat template
    (after a system turn holding `system_prompt`, if set), ending with the assistant prompt so that the last
    token is where the model starts its reply. The rendered text carries its own special tokens, so none are
    added. Truncation keeps the start: a caption too long for `max_length` loses its end and the template's.
    """
    texts = [template.replace("{caption}", caption) for caption in captions]
    if chat_template:
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        texts = [
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for text in texts
        ]
    special = {"add_special_tokens": not chat_template}
    truncated = sum(len(ids) > max_length for ids in tokenizer(texts, **special)["input_ids"])
    encoded = tokenizer(texts, truncation=True, max_length=max_length, **special)
    features = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for row in features:
        if not row["input_ids"]:
            # An empty prompt would be an all-padding row (NaN attention downstream): give it one token.
            row.update({key: [0] for key in row}, input_ids=[fallback], attention_mask=[1])
    return features, truncated


def pool_hidden(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """One vector per row: the last real token's state ("last") or the mean over real tokens ("mean")."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def encode_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    features: Sequence[dict[str, list[int]]],
    *,
    max_length: int,
    hidden_index: int,
    layer_mean: int = 1,
    pooling: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [B, max_length, D] (zero at padding), mask [B, max_length] bool, pooled [B, D], float32, from
    `tokenize`'s features.

    The hidden state is the mean of the `layer_mean` consecutive entries of the model's `hidden_states`
    ending at `hidden_index` (0 = embeddings). Without gradients (the embedding cache, sampling, this
    pipeline) a batch holds captions of one token length only, so no caption is padded: a caption's embedding
    is bit for bit its own whatever else is encoded with it (padding moved SmolLM2's deep layers by 5e-5 under
    AVX2 kernels; at a fixed length the batch size changed no bit, measured on both kernel sets), and short
    captions cost no more than their tokens. A training step (`grad` with autograd on) pads each batch to
    its own longest caption, sorted by length, which is cheaper and equal to rounding.
    """
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    if grad and torch.is_grad_enabled():
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    else:
        batches = []
        for _, same_length in groupby(order, key=lambda i: len(features[i]["input_ids"])):
            rows = list(same_length)
            batches += [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    tokens, masks, pooled = [], [], []
    with nullcontext() if grad else torch.inference_mode():
        for indices in batches:
            rows = [features[i] for i in indices]
            batch = tokenizer.pad(rows, padding=True, return_tensors="pt").to(device)
            out = model(**batch, output_hidden_states=True)
            read = out.hidden_states[hidden_index - layer_mean + 1 : hidden_index + 1]
            # Averaged in float32, so a single layer (layer_mean=1) is exactly that layer's state.
            hidden = torch.stack([state.float() for state in read]).mean(0)
            mask = batch["attention_mask"].bool()
            # `where`, not a product: padded positions of some attention kernels are NaN.
            hidden = torch.where(mask[..., None], hidden, 0.0)
            pad = max_length - mask.shape[1]
            tokens.append(F.pad(hidden, (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad)))
            pooled.append(pool_hidden(hidden, mask, pooling))
    # Built outside inference mode, so the result is an ordinary tensor that autograd may save.
    restore = torch.argsort(torch.tensor(order, device=device))
    return torch.cat(tokens)[restore], torch.cat(masks)[restore], torch.cat(pooled)[restore]


# ---- Generation at fixed shapes ----

# Images are generated in batches of exactly this many. CPU kernels (oneDNN, MKL) choose their blocking and
# reduction order by tensor shape, so an image computed in a batch of another size differs in its last bits
# (up to a grey level in a PNG); at one fixed shape an image's bits do not depend on what else is generated.
# 8 keeps CPU throughput within a few percent of large batches (measured, see README "Sampling and editing").
GENERATION_CHUNK = 8


def generate_in_chunks(count: int, generate_chunk: Callable[[list[int]], Tensor]) -> Tensor:
    """`generate_chunk(rows)` over 0..count-1 in chunks of exactly `GENERATION_CHUNK` rows, the last chunk
    filled up with copies of its last row whose outputs are dropped; the outputs concatenated, [count, ...]."""
    outputs = []
    for start in range(0, count, GENERATION_CHUNK):
        rows = [min(row, count - 1) for row in range(start, start + GENERATION_CHUNK)]
        outputs.append(generate_chunk(rows)[: count - start])
    return torch.cat(outputs)


# ---- The exported model ----


def check_sampling(guidance_scale: float, steps: int, num_train_timesteps: int) -> None:
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale={guidance_scale} is below 1; use 1 (no guidance) or more")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps={steps} is out of range; use 1..{num_train_timesteps}")


@dataclass
class Sampling:
    """The generator's settings (`text2img.json` "generator"): where diffusion runs and its defaults."""

    image_size: int
    model_channels: int  # 3 for pixels, the first stage's latent channels otherwise
    model_size: int  # side of the space diffusion runs in (image_size / the first stage's downsampling)
    patch_size: int  # p x p patches folded into channels before the UNet
    guidance_scale: float
    sample_steps: int
    num_train_timesteps: int


class Text2ImgPipeline:
    """Prompt -> text encoder -> fusion head -> UNet denoising loop (classifier-free guidance) -> images.

    Image i's noise comes from `torch.Generator().manual_seed(seeds[i])` on the CPU, as in training, and every
    image is computed at the same shapes (prompts padded to the encoder's `max_length`, `GENERATION_CHUNK`
    images at a time), so a seed gives the same image as `Text2ImgModule.generate` with the checkpoint, bit
    for bit whatever else is in the batch.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        fusion: nn.Module,
        null_text: dict[str, Tensor],
        tokenizer: PreTrainedTokenizerBase,
        text_model: PreTrainedModel,
        text_settings: dict[str, Any],
        sampling: Sampling,
        vae: AutoencoderKL | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.fusion = fusion
        self.null_text = null_text
        self.tokenizer = tokenizer
        self.text_model = text_model
        self.text_settings = text_settings
        self.sampling = sampling
        self.vae = vae
        self.device = torch.device(device)
        self.hidden_index = text_settings["layer"] % (text_model.config.num_hidden_layers + 1)

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device | str = "cpu") -> Text2ImgPipeline:
        folder = Path(folder).expanduser()
        settings_file = folder / SETTINGS_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{folder} holds no {SETTINGS_FILE}; pass a folder written by text2img.export")
        settings = json.loads(settings_file.read_text())
        if settings.get("format") != FORMAT_VERSION:
            raise ValueError(f"{settings_file} has format {settings.get('format')}; this loader reads {FORMAT_VERSION}")
        unet = UNet2DConditionModel.from_pretrained(folder / UNET_DIR).to(device).eval()
        scheduler_class = json.loads((folder / SCHEDULER_DIR / "scheduler_config.json").read_text())["_class_name"]
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder / SCHEDULER_DIR)
        vae = None
        if (folder / VAE_DIR).is_dir():
            # Frozen, as in text2img: some CPU kernels differ in the last bits when the weights require grad.
            vae = AutoencoderKL.from_pretrained(folder / VAE_DIR).to(device).eval().requires_grad_(False)
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
        )

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """The text encoder's tokens [B, L, D], mask [B, L] and pooled [B, D] for the prompts."""
        text = self.text_settings
        # Settings added after format 1 was fixed default to their old behaviour for earlier exports.
        features, truncated = tokenize(
            self.tokenizer, prompts, template=text["template"], max_length=text["max_length"],
            chat_template=text.get("chat_template", False), system_prompt=text.get("system_prompt"),
        )
        if truncated:
            log.warning(
                "%d of %d prompts truncated to max_length=%d tokens", truncated, len(prompts), text["max_length"]
            )
        return encode_tokens(
            self.text_model, self.tokenizer, features, max_length=text["max_length"], hidden_index=self.hidden_index,
            layer_mean=text.get("layer_mean", 1), pooling=text["pooling"], batch_size=text["batch_size"],
            device=self.device,
        )

    def _denoise(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Tensor:
        """The model's prediction for x at timesteps t; the fusion head runs at every step (it may use t).

        A UNet with a class embedding adds the head's vector to its timestep embedding (`generator.time_vector`);
        its fusion program then returns the vector as a third output.
        """
        cond_tokens, cond_mask, *vector = self.fusion(tokens, mask, pooled, t)
        patch = self.sampling.patch_size
        out = self.unet(
            F.pixel_unshuffle(x, patch), t, encoder_hidden_states=cond_tokens, encoder_attention_mask=cond_mask,
            class_labels=vector[0] if self.unet.config.class_embed_type is not None else None,
        ).sample
        return F.pixel_shuffle(out, patch)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        guidance_scale: float | None = None,
        steps: int | None = None,
    ) -> Tensor:
        """Images [B, 3, H, W] float in [0, 1]; image i depends only on prompts[i] and seeds[i]."""
        if not prompts:
            raise ValueError("no prompts given; pass one or more")
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        sampling = self.sampling
        guidance_scale = sampling.guidance_scale if guidance_scale is None else guidance_scale
        steps = sampling.sample_steps if steps is None else steps
        check_sampling(guidance_scale, steps, sampling.num_train_timesteps)
        tokens, mask, pooled = self.encode(prompts)  # [B, max_length, D]: every prompt at the same length

        def generate_chunk(rows: list[int]) -> Tensor:
            return self._generate_chunk(
                tokens[rows], mask[rows], pooled[rows], [seeds[row] for row in rows], guidance_scale, steps
            )

        return generate_in_chunks(len(prompts), generate_chunk)

    def _generate_chunk(
        self, tokens: Tensor, mask: Tensor, pooled: Tensor, seeds: Sequence[int], guidance_scale: float, steps: int
    ) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for one chunk of encoded prompts and their seeds."""
        sampling = self.sampling
        batch = len(seeds)
        guided = guidance_scale != 1.0
        if guided:  # the learned null embedding: one always-attended token, padded to the prompts' length
            null_tokens = F.pad(self.null_text["tokens"].expand(batch, 1, -1), (0, 0, 0, tokens.shape[1] - 1))
            null_mask = torch.zeros_like(mask)
            null_mask[:, 0] = True
            tokens = torch.cat([tokens, null_tokens])
            mask = torch.cat([mask, null_mask])
            pooled = torch.cat([pooled, self.null_text["pooled"].expand(batch, -1)])
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # samplers keep state between steps
        scheduler.set_timesteps(steps, device=self.device)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        shape = (sampling.model_channels, sampling.model_size, sampling.model_size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        x = noise.to(self.device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            pred = self._denoise(model_in, t.expand(model_in.shape[0]).to(self.device), tokens, mask, pooled)
            if guided:
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(pred, t, x, generator=generators).prev_sample
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return (x.clamp(-1, 1).float() + 1) / 2

    def __call__(
        self,
        prompts: str | Sequence[str],
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        steps: int | None = None,
        output_type: str = "pil",
    ) -> list[Image.Image] | Tensor:
        """PIL images (`output_type="pil"`) or a [B, 3, H, W] tensor in [0, 1] ("pt"); an int seed gives
        image i the seed `seed + i`. `guidance_scale` and `steps` default to the trained model's."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type={output_type!r} is unknown; use pil or pt")
        images = self.generate(prompts, seeds, guidance_scale, steps)
        if output_type == "pt":
            return images
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(array) for array in pixels]
