"""The sampling runtime of diffusion backends, written once for the generators and for the exported loader.

Classifier-free guidance, the checks of guidance, steps and edit inputs, the unconditional branch padded to the
prompts' length, pixel fold/unfold around the UNet, image-to-image and inpainting, per-sample noise from one CPU
generator per row, and generation in chunks of a fixed size. `DiffusionGenerator.sample` (so latent diffusion
too) and `Text2ImgPipeline` (text2img.pipeline) both sample through `sample` here: an exported model gives the
checkpoint's images because there is only one loop.

Standalone: it imports only torch, diffusers and the standard library, because the export copies it into every
export folder beside the loader, where it runs without text2img. Text travels as plain (tokens, mask, pooled)
tensors; what the model is (a fusion head and a UNet, or an exported program) is the caller's `denoise`, and what
space diffusion runs in (pixels, a first stage's latents) its `to_model_space`/`from_model_space`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from diffusers.models.normalization import AdaLayerNormSingle
from torch import Tensor, nn

# A text embedding as plain tensors: tokens [B, L, D] (zero at padding), mask [B, L] bool, pooled [B, D].
Text = tuple[Tensor, Tensor, Tensor]
# denoise(x, t, tokens, mask, pooled): the model's prediction for x at timesteps t [B], for that text.
Denoise = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

# Images are generated in batches of exactly this many. CPU kernels (oneDNN, MKL) choose their blocking and
# reduction order by tensor shape, so an image computed in a batch of another size differs in its last bits
# (up to a grey level in a PNG); at one fixed shape an image's bits do not depend on what else is generated.
# 8 keeps CPU throughput within a few percent of large batches (measured, see README "Sampling and editing").
GENERATION_CHUNK = 8

# As diffusers' pipelines: image-to-image keeps some of the input's layout, inpainting redraws the region.
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


def generate_in_chunks(count: int, generate_chunk: Callable[[list[int]], Tensor]) -> Tensor:
    """`generate_chunk(rows)` over 0..count-1 in chunks of exactly `GENERATION_CHUNK` rows, the last chunk
    filled up with copies of its last row whose outputs are dropped; the outputs concatenated, [count, ...]."""
    outputs = []
    for start in range(0, count, GENERATION_CHUNK):
        rows = [min(row, count - 1) for row in range(start, start + GENERATION_CHUNK)]
        outputs.append(generate_chunk(rows)[: count - start])
    return torch.cat(outputs)


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded with the row's seed (a chunk's copies included: a generator shared by two
    rows would be drawn from twice)."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def per_sample_noise(shape: tuple[int, ...], generators: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """Standard normal noise [B, *shape], row i drawn from `generators[i]` on the CPU, then moved: a seed gives the
    same sample on every device and in any batch."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@dataclass
class ImageEdit:
    """A text-guided edit of given images: SDEdit image-to-image, or inpainting when `mask` is set.

    images:   [B, 3, H, W] in [-1, 1] at the generator's `image_size`, one per sample
    strength: in (0, 1], the share of the sampling trajectory that is re-run: the images are noised to
              the level of that point and denoised from there (1: from the sampler's first timestep, where
              the default cosine schedule keeps 5e-5 of the input: the prompt and the seed alone decide)
    mask:     [B, 1, H, W] of 0 (keep: those pixels come back unchanged) and 1 (regenerate), or None
    """

    images: Tensor
    strength: float = 1.0
    mask: Tensor | None = None

    def rows(self, rows: Sequence[int]) -> ImageEdit:
        """The edit of the given rows (a generation chunk's)."""
        return replace(self, images=self.images[rows], mask=None if self.mask is None else self.mask[rows])


def sampling_settings(
    guidance_scale: float | None,
    steps: int | None,
    defaults: tuple[float, int],
    num_train_timesteps: int,
    error: type[Exception] = ValueError,
) -> tuple[float, int]:
    """(guidance_scale, steps), each the model's default (`defaults`) when None, checked; a setting out of range
    raises `error` (text2img passes its ConfigError) with a one-line message."""
    guidance_scale = defaults[0] if guidance_scale is None else guidance_scale
    steps = defaults[1] if steps is None else steps
    if guidance_scale < 1.0:
        raise error(f"guidance_scale={guidance_scale} is below 1; use 1 (no guidance) or more")
    if not 1 <= steps <= num_train_timesteps:
        raise error(f"steps={steps} is out of range; use 1..{num_train_timesteps}")
    return guidance_scale, steps


def check_edit(edit: ImageEdit, batch_size: int, image_size: int, error: type[Exception] = ValueError) -> None:
    """Fail clearly on an edit input that does not fit `batch_size` images of `image_size` px: a strength out of
    range raises `error`, malformed images or masks ValueError."""
    if not 0.0 < edit.strength <= 1.0:
        raise error(f"strength={edit.strength} is out of range; use 0 < strength <= 1")
    size = (image_size, image_size)
    if tuple(edit.images.shape) != (batch_size, 3, *size):
        raise ValueError(f"edit images have shape {tuple(edit.images.shape)}; expected {(batch_size, 3, *size)}")
    if edit.mask is not None:
        if tuple(edit.mask.shape) != (batch_size, 1, *size):
            raise ValueError(f"edit mask has shape {tuple(edit.mask.shape)}; expected {(batch_size, 1, *size)}")
        if not ((edit.mask == 0) | (edit.mask == 1)).all():
            raise ValueError("the edit mask must hold 0 (keep) and 1 (regenerate) only; threshold it first")


def unconditional(null_tokens: Tensor, null_pooled: Tensor, batch: int) -> Text:
    """The learned null embedding (`null_tokens` [1, D], `null_pooled` [D]) for `batch` rows: one token, always
    attended."""
    mask = torch.ones(batch, 1, dtype=torch.bool, device=null_tokens.device)
    return null_tokens.expand(batch, 1, -1), mask, null_pooled.expand(batch, -1)


def with_unconditional(text: Text, null_text: Text) -> Text:
    """The guided batch's text: the prompts' rows, then the unconditional ones, both right-padded (zero tokens,
    mask False) to the longer of the two."""
    length = max(text[0].shape[1], null_text[0].shape[1])
    padded = [
        (F.pad(tokens, (0, 0, 0, length - tokens.shape[1])), F.pad(mask, (0, length - mask.shape[1])), pooled)
        for tokens, mask, pooled in (text, null_text)
    ]
    tokens, mask, pooled = (torch.cat(column) for column in zip(*padded))
    return tokens, mask, pooled


def unet_prediction(
    unet: nn.Module, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, vector: Tensor | None, patch_size: int
) -> Tensor:
    """A diffusers UNet's prediction for x [B, C, H, W] at timesteps t [B], cross-attending to `tokens` where
    `mask` is True: p x p pixel patches are folded into channels before it (`pixel_unshuffle`) and unfolded after.
    `vector` feeds the UNet's class embedding (None for a UNet without one)."""
    out = unet(
        F.pixel_unshuffle(x, patch_size), t, encoder_hidden_states=tokens, encoder_attention_mask=mask,
        class_labels=vector,
    ).sample
    return F.pixel_shuffle(out, patch_size)


def transformer_prediction(
    transformer: nn.Module,
    x: Tensor,
    t: Tensor,
    tokens: Tensor,
    mask: Tensor,
    vector_embedding: nn.Module | None,
    vector: Tensor | None,
) -> Tensor:
    """A diffusers diffusion transformer's prediction for x [B, C, H, W] at timesteps t [B], cross-attending to
    `tokens` where `mask` is True (PixArt's arguments; it patchifies x itself).

    With `vector`, `vector_embedding(vector)` is added to the timestep embedding, before the adaLN-single
    modulation and the output layer read it, as a UNet's class embedding is: the transformer has no input for it,
    so it is added to the output of its `AdaLayerNormSingle`'s embedding for the length of this call.

    Deep fusion: tokens as wide as the blocks' cross-attention times their number are one token set per block,
    side by side on the feature axis (`DeepFusion`); block i then reads slice i, swapped into its call for the
    length of this one (the transformer's own forward runs unchanged)."""
    hooks = []
    width = transformer.config.cross_attention_dim
    if tokens.shape[-1] != width and getattr(transformer, "caption_projection", None) is None:
        blocks = transformer.transformer_blocks
        if tokens.shape[-1] != width * len(blocks):
            raise ValueError(
                f"tokens of {tokens.shape[-1]} features fit neither the transformer's cross-attention ({width}) nor "
                f"one set per block ({len(blocks)} x {width})"
            )
        per_block = tokens.split(width, dim=-1)
        hooks += [
            block.register_forward_pre_hook(partial(_own_tokens, own), with_kwargs=True)
            for block, own in zip(blocks, per_block)
        ]
        tokens = per_block[0]
    if vector is not None:
        added = vector_embedding(vector)
        (adaln,) = [module for module in transformer.modules() if isinstance(module, AdaLayerNormSingle)]
        hooks.append(adaln.emb.register_forward_hook(lambda module, inputs, output: output + added.to(output.dtype)))
    try:
        return transformer(x, encoder_hidden_states=tokens, timestep=t, encoder_attention_mask=mask).sample
    finally:
        for hook in hooks:
            hook.remove()


def _own_tokens(tokens: Tensor, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A transformer block's inputs with `tokens` as its encoder_hidden_states: a keyword in the plain call, the third
    argument under gradient checkpointing."""
    if "encoder_hidden_states" in kwargs:
        return args, {**kwargs, "encoder_hidden_states": tokens}
    return (*args[:2], tokens, *args[3:]), kwargs


def _identity(x: Tensor) -> Tensor:
    return x


def is_flow(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler` is one of diffusers' flow-matching schedulers (FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler, ...): they move along x_t = (1 - sigma) x0 + sigma noise from sigma 1, noise
    with `scale_noise` and have no `add_noise`, `init_noise_sigma` or input scaling."""
    return hasattr(scheduler, "scale_noise")


def noised(scheduler: SchedulerMixin, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """`x0` noised to the scheduler's level at timesteps `t` [B] with `noise`, as its own forward process does."""
    return scheduler.scale_noise(x0, t, noise) if is_flow(scheduler) else scheduler.add_noise(x0, noise, t)


@torch.no_grad()
def sample(
    denoise: Denoise,
    scheduler: SchedulerMixin,
    text: Text,
    null_text: Text,
    generators: Sequence[torch.Generator],
    shape: tuple[int, int, int],
    guidance_scale: float,
    steps: int,
    edit: ImageEdit | None = None,
    to_model_space: Callable[[Tensor], Tensor] = _identity,
    from_model_space: Callable[[Tensor], Tensor] = _identity,
    error: type[Exception] = ValueError,
) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] for the text's B rows, with classifier-free guidance (`guidance_scale` > 1:
    `null_text` is the unconditional branch) over `steps` timesteps of `scheduler`, a fresh sampler (they keep
    state between steps). Diffusion runs in a space of `shape` (C, S, S); `from_model_space` turns its result into
    images and `to_model_space` images into it (for edits). Settings are the caller's, checked
    (`sampling_settings`, `check_edit`); steps that `scheduler` cannot take raise `error`.

    Row i's noise comes from `generators[i]` on the CPU, so the images of a seed do not depend on the device or on
    the rest of the batch (at the batch size of `generate_in_chunks`, not even in their last bits).

    With `edit`, the images are edited instead of drawn from noise, as diffusers' img2img and inpainting
    pipelines do: the last steps x strength (rounded, at least one) of the `steps` timesteps are run, starting from
    the input noised to the first of them. With a mask, after every step the kept region is replaced by the input
    noised to the next timestep (with the same noise), so the regenerated region is denoised in agreement with it;
    the result is composited in pixel space, which keeps the unmasked pixels exactly. All of it happens in model
    space, so latent diffusion edits the same way.
    """
    device = text[0].device
    try:
        scheduler.set_timesteps(steps, device=device)
    except ValueError as exc:  # e.g. PNDM's Runge-Kutta warm-up needs at least 4 steps
        raise error(
            f"{type(scheduler).__name__} cannot sample in {steps} steps ({exc}); give more steps or another sampler"
        ) from exc
    flow = is_flow(scheduler)
    guided = guidance_scale != 1.0
    both = with_unconditional(text, null_text) if guided else text
    noise = per_sample_noise(shape, generators, device)
    timesteps = scheduler.timesteps
    x0 = keep = None
    if edit is None:
        x = noise if flow else noise * scheduler.init_noise_sigma
    else:
        x0 = to_model_space(edit.images.to(device))
        begin = (steps - max(1, round(steps * edit.strength))) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):  # multistep solvers index their sigmas from here
            scheduler.set_begin_index(begin)
        x = noised(scheduler, x0, noise, timesteps[:1].expand(len(x0)))
        if edit.mask is not None:
            # A model-space position is regenerated if any pixel it covers is (max-pooling the mask).
            keep = 1.0 - F.adaptive_max_pool2d(edit.mask.to(device, x.dtype), shape[-1])
    # Stochastic samplers draw each row's step noise from its generator; deterministic ones may not take any.
    step_noise = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        model_in = torch.cat([x, x]) if guided else x
        model_in = model_in if flow else scheduler.scale_model_input(model_in, t)
        pred = denoise(model_in, t.expand(model_in.shape[0]).to(device), *both)
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x, **step_noise).prev_sample
        if keep is not None:
            last = i + 1 == len(timesteps)
            known_t = x0 if last else noised(scheduler, x0, noise, timesteps[i + 1 : i + 2].expand(len(x0)))
            x = keep * known_t + (1.0 - keep) * x
    images = from_model_space(x).clamp(-1, 1)
    if edit is not None and edit.mask is not None:
        images = torch.where(edit.mask.to(device).bool(), images, edit.images.to(device, images.dtype))
    return images
