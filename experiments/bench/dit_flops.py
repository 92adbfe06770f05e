"""What a training image of a latent DiT preset costs in FLOPs, and the images/s and GPU-hours that implies.

    python experiments/bench/dit_flops.py [--mfu 0.35 0.40] [--peak-tflops 989] [--gpus 8] \
        [--images 1000000] [overrides ...]   # of conf/train.yaml; default: experiment=webdataset_dit_gpu

An estimate, not a measurement. The FLOPs of one image are counted by torch's `FlopCounterMode` (matrix
products, convolutions and attention; 2 FLOPs per multiply-add) on the meta device, so nothing computes and no
weights load:

- the denoiser built from the composed config (`generator.denoiser`, `generator.patch_size`,
  `generator.cond_dim`) on the first stage's latents, forward and backward (it trains), cross-attending to
  `encoder.max_length` tokens;
- the first stage's encoder, forward only (frozen), at `data.source.image_size`, unless
  `generator.cache_latents`; its architecture is its config.json (a local folder, or a hub name in the hub
  cache), else the known config of a Stable Diffusion VAE (KNOWN_FIRST_STAGES);
- the text encoder, forward only (frozen), on `encoder.max_length` tokens: with streamed shards
  (data=webdataset) captions are encoded in every step; omitted where its config cannot be read offline.

Images/s per GPU = MFU x peak / FLOPs per image, at each assumed model FLOP utilisation (MFU) of the GPU's
dense peak (H100 SXM bf16: 989 TFLOP/s). The fusion head (one projection of the tokens: < 0.1%), the loss, the
optimizer and the data pipeline are left out; the MFU assumption has to cover them.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import compose_cfg  # noqa: E402

DEFAULT_OVERRIDES = ["experiment=webdataset_dit_gpu"]
H100_BF16_DENSE_TFLOPS = 989.0
# The config.json of first stages that are often named by hub name, for counting without the network.
_SD_VAE = {
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "in_channels": 3, "out_channels": 3, "act_fn": "silu",
}
KNOWN_FIRST_STAGES = {name: _SD_VAE for name in ("stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema")}


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training image, by part."""

    denoiser: float       # forward + backward
    first_stage: float    # encoder forward (0: latents cached)
    text_encoder: float   # forward (0: embeddings cached, or not counted)
    denoiser_parameters: int

    @property
    def total(self) -> float:
        return self.denoiser + self.first_stage + self.text_encoder

    def images_per_s(self, mfu: float, peak_tflops: float = H100_BF16_DENSE_TFLOPS) -> float:
        return mfu * peak_tflops * 1e12 / self.total


def counted(run) -> float:
    """FLOPs of `run()`, counted, not computed (call it under the meta device)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops())


def first_stage_config(cfg: DictConfig) -> dict:
    source, subfolder = cfg.generator.first_stage.source, cfg.generator.first_stage.get("subfolder")
    if source is None or str(source).endswith(".ckpt"):
        raise ValueError("generator.first_stage.source must be a diffusers AutoencoderKL: folder or hub name")
    try:
        return dict(AutoencoderKL.load_config(str(source), subfolder=subfolder))
    except (OSError, ValueError):  # a hub name not in the hub cache, offline
        if source in KNOWN_FIRST_STAGES:
            return KNOWN_FIRST_STAGES[source]
        raise


def denoiser_flops(cfg: DictConfig, latent_channels: int, latent_size: int) -> tuple[float, int]:
    """Forward + backward FLOPs of the configured denoiser for one sample, and its parameter count."""
    gen = cfg.generator
    tokens = int(cfg.encoder.max_length)
    with torch.device("meta"):
        denoiser = instantiate(gen.denoiser)(
            channels=latent_channels, size=latent_size, cond_dim=gen.cond_dim, patch_size=gen.patch_size,
            time_vector=gen.time_vector,
        )
        x = torch.empty(1, latent_channels, latent_size, latent_size)
        text = torch.empty(1, tokens, gen.cond_dim)
        vector = torch.empty(1, gen.cond_dim) if gen.time_vector else None
        mask = torch.ones(1, tokens, dtype=torch.bool)
        t = torch.full((1,), 500.0)
        flops = counted(lambda: denoiser(x, t, text, mask, vector).sum().backward())
    return flops, sum(p.numel() for p in denoiser.parameters())


def first_stage_flops(config: dict, image_size: int) -> tuple[float, int, int]:
    """Encoder forward FLOPs for one image, and the latents' channels and side."""
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        autoencoder = AutoencoderKL(**keep)
        images = torch.empty(1, autoencoder.config.in_channels, image_size, image_size)
        with torch.no_grad():
            flops = counted(lambda: autoencoder.encode(images))
    downsample = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    return flops, autoencoder.config.latent_channels, image_size // downsample


def text_encoder_flops(cfg: DictConfig) -> float:
    """Forward FLOPs of the text encoder on `encoder.max_length` tokens; 0 where its config is not readable
    here."""
    from transformers import AutoModel

    from text2img.encoders.hf import pretrained_config

    encoder = instantiate(cfg.encoder)
    try:
        config = encoder.text_config() or pretrained_config(**encoder.reference())
    except Exception:  # a hub model not in the cache, offline: say so rather than guess
        print(f"text encoder: config of {cfg.encoder._target_} not readable offline; not counted",
              file=sys.stderr)
        return 0.0
    with torch.device("meta"):
        model = AutoModel.from_config(config)
        ids = torch.zeros(1, int(cfg.encoder.max_length), dtype=torch.long)
        with torch.no_grad():
            return counted(lambda: model(input_ids=ids))


def step_flops(cfg: DictConfig, text_encoder: bool = True) -> StepFlops:
    """The FLOPs of one training image of a latent diffusion config (`generator=ldm`)."""
    image_size = int(cfg.data.source.image_size)
    first_stage, channels, size = first_stage_flops(first_stage_config(cfg), image_size)
    denoiser, parameters = denoiser_flops(cfg, channels, size)
    cached = bool(cfg.generator.get("cache_latents"))
    text = text_encoder_flops(cfg) if text_encoder else 0.0
    return StepFlops(denoiser, 0.0 if cached else first_stage, text, parameters)


def sizing_table(flops: StepFlops, mfus: list[float], peak_tflops: float, gpus: int, images: float) -> str:
    """The README's sizing table: a row per way of feeding the denoiser, a column pair per MFU."""
    rows = {
        "VAE and text encoder in every step (streamed shards)": flops,
        "latents and text embeddings precomputed":
            StepFlops(flops.denoiser, 0.0, 0.0, flops.denoiser_parameters),
    }
    head = ["step", "GFLOPs / image"]
    for mfu in mfus:
        head += [f"img/s per GPU at {mfu:.0%} MFU",
                 f"{images / 1e6:g}M images on {gpus} GPUs at {mfu:.0%}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name, f"{row.total / 1e9:,.0f}"]
        for mfu in mfus:
            rate = row.images_per_s(mfu, peak_tflops)
            seconds = images / (rate * gpus)
            cells += [f"{rate:,.0f}", f"{seconds / 60:.1f} min, {seconds * gpus / 3600:.2f} GPU-h"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.35, 0.40])
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--images", type=float, default=1e6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "dit_flops"
    cfg = compose_cfg(args.overrides or DEFAULT_OVERRIDES, out)
    flops = step_flops(cfg)
    print(f"denoiser {flops.denoiser_parameters / 1e6:.1f}M parameters: forward+backward "
          f"{flops.denoiser / 1e9:,.1f} GFLOPs; first-stage encoder {flops.first_stage / 1e9:,.1f} GFLOPs; "
          f"text encoder {flops.text_encoder / 1e9:,.1f} GFLOPs (per image)")
    print(sizing_table(flops, args.mfu, args.peak_tflops, args.gpus, args.images))


if __name__ == "__main__":
    main()
