"""An image is a function of (checkpoint, prompt, seed, sampler settings) alone: the same bits whatever else is
in its batch and whatever the batch size, in `text2img.sample`, `text2img.evaluate` (by sample key) and the
exported pipeline, and under AVX2-only CPU kernels too (within a grey level of the native kernels' image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train, smoke_overrides, write_imagefolder

from text2img.run.compose import load_model
from text2img.export import write_export
from text2img.pipeline import Text2ImgPipeline
from text2img.sample import sample
from text2img.run.compose import build_model
from text2img.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TESTS = Path(__file__).resolve().parent
SHARED = "a purple hexagon"  # in no training caption: encoded by the checkpoint's encoder when sampled
LONGER = "a yellow triangle number 7 with a long tail"  # more tokens (the tiny encoder reads one per byte)
OTHERS = [LONGER, "a red square number 0", "x", "a green square number 12", "two small red circles at the top",
          "a blue circle"]
# The batches the shared prompt is generated in: alone, beside a longer prompt, with six others.
BATCHES = {"1 prompt": [SHARED], "2 prompts": [SHARED, LONGER], "7 prompts": [SHARED, *OTHERS]}
# Environment read at process start: ATen, oneDNN and MKL restricted to the AVX2 kernels of older CPUs.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ONE_GREY_LEVEL = 1 / 255


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step smoke run's last checkpoint (tiny encoder, pixel diffusion), its embedding cache in its folder."""
    root = tmp_path_factory.mktemp("determinism")
    data = write_imagefolder(root / "data")
    overrides = smoke_overrides(data, "logger=csv", "test=false", "callbacks.sample_grid=null", "trainer.max_steps=3",
                                f"data.embedding_cache_dir={root / 'embeddings'}")
    train(compose_train(root / "run", overrides))
    return root / "run" / "checkpoints" / "last.ckpt"


def shared_images(generate) -> dict[str, torch.Tensor]:
    """The shared prompt's image (seed 7) in each of `BATCHES`; `generate(prompts, seeds)` -> [B, 3, H, W]."""
    return {name: generate(prompts, [7 + i for i in range(len(prompts))])[0] for name, prompts in BATCHES.items()}


def assert_bit_identical(images: dict[str, torch.Tensor]) -> None:
    (first, image), *rest = images.items()
    for name, other in rest:
        assert (other - image).abs().max() <= ONE_GREY_LEVEL, f"{name} vs {first}"
        assert torch.equal(other, image), f"{name} vs {first}: {(other - image).abs().max():.2e} apart"


def checkpoint_images(checkpoint: Path, export_folder: Path) -> dict[str, torch.Tensor]:
    """The shared prompt's images from the checkpoint (`Text2ImgModule.generate`, prompts encoded together)
    and from its export, keyed '<source> <batch>'; the comparison the AVX2 subprocess reruns."""
    _, _, model = load_model(str(checkpoint))
    model.eval()
    pipe = Text2ImgPipeline.from_folder(export_folder)
    images = {}
    for source, generate in {
        "checkpoint": lambda prompts, seeds: model.generate(model.conditioner.text_encoder.encode(prompts), seeds),
        "export": lambda prompts, seeds: pipe(prompts, seed=seeds, output_type="pt"),
    }.items():
        images |= {f"{source} {name}": image for name, image in shared_images(generate).items()}
    return images


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, _, model = load_model(str(checkpoint))
    return write_export(model.eval(), model.conditioner.text_encoder, tmp_path_factory.mktemp("export") / "model")


def test_sample_writes_the_same_png_whatever_the_other_prompts(checkpoint: Path, tmp_path: Path) -> None:
    pngs = {}
    for name, prompts in BATCHES.items():
        args = [f"ckpt={checkpoint}", f"prompts={json.dumps(prompts)}", "seed=7", f"out={tmp_path / name}"]
        pngs[name] = sample(compose_train(tmp_path, args, "sample")).images[0]
    assert {path.name for path in pngs.values()} == {"p000-a-purple-hexagon-seed7.png"}
    assert len({path.read_bytes() for path in pngs.values()}) == 1


def test_a_prompt_is_encoded_at_a_fixed_shape(checkpoint: Path) -> None:
    _, _, model = load_model(str(checkpoint))
    encodings = {name: model.conditioner.text_encoder.encode(prompts).tokens[0] for name, prompts in BATCHES.items()}
    assert_bit_identical(encodings)  # before: 4.5e-7 apart beside a longer prompt (its padding)


def test_checkpoint_and_export_give_the_same_image_in_any_batch(checkpoint: Path, exported: Path) -> None:
    images = checkpoint_images(checkpoint, exported)
    assert_bit_identical({name: image for name, image in images.items() if name.startswith("checkpoint")})
    assert_bit_identical({name: image for name, image in images.items() if name.startswith("export")})
    assert (images["export 1 prompt"] - images["checkpoint 1 prompt"]).abs().max() <= ONE_GREY_LEVEL


def test_evaluation_gives_a_sample_key_the_same_image_at_any_batch_size(checkpoint: Path) -> None:
    by_key = {}
    for batch_size in (1, 2, 7):
        # 9 samples: batches of 2 and 7 end in a smaller one; captions differ in length within a batch
        _, datamodule, model = load_model(str(checkpoint), {"eval_batch_size": batch_size, "eval_samples": 9})
        datamodule.setup("test")
        images = {}
        for index, batch in enumerate(datamodule.test_dataloader()):
            outputs = model.eval().test_step(batch, index)
            images |= {int(key): image for key, image in zip(outputs.keys, outputs.images, strict=True)}
        by_key[batch_size] = images
    assert sorted(by_key[1]) == list(range(9))
    for key in range(9):
        assert_bit_identical({f"batch size {size}": by_key[size][key] for size in by_key})


@pytest.mark.parametrize("backend", ["ldm", "gan", "vae", "ddpm"])
def test_every_backend_draws_an_image_independently_of_its_batch(
    backend: str, tmp_path: Path, tiny_first_stage: Path
) -> None:
    """Untrained smoke models (the shapes matter, not the weights); `ddpm` is pixel diffusion with an ancestral
    sampler, which draws noise at every step."""
    overrides = {
        "ldm": ["generator=ldm", f"generator.first_stage.source={tiny_first_stage}", "generator.latent_scale=1.0"],
        "gan": ["generator=gan"],
        "vae": ["generator=vae"],
        "ddpm": ["generator.sampler.path=diffusers.DDPMScheduler", "generator.sample_steps=3"],
    }[backend]
    torch.manual_seed(0)
    data = write_imagefolder(tmp_path / "data", n=8)
    _, model = build_model(compose_train(tmp_path, smoke_overrides(data, *overrides)))
    # as evaluation batches arrive: the text trimmed to the batch's longest prompt
    images = shared_images(lambda prompts, seeds: model.eval().generate(
        model.conditioner.text_encoder.encode(prompts).trimmed(), seeds))
    assert_bit_identical(images)


@pytest.mark.slow  # a fresh interpreter under the AVX2 kernels: ~10 s
def test_avx2_kernels_give_the_same_bits_in_any_batch_and_stay_within_a_grey_level(
    checkpoint: Path, exported: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "avx2.pt"
    code = (f"import sys, torch; sys.path.insert(0, {str(TESTS)!r}); torch.set_num_threads(1); "
            "from test_determinism import checkpoint_images; from pathlib import Path; "
            f"torch.save(checkpoint_images(Path({str(checkpoint)!r}), Path({str(exported)!r})), {str(saved)!r})")
    result = subprocess.run([sys.executable, "-c", code], env=os.environ | AVX2_ONLY, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    avx2 = torch.load(saved)
    assert_bit_identical({name: image for name, image in avx2.items() if name.startswith("checkpoint")})
    assert_bit_identical({name: image for name, image in avx2.items() if name.startswith("export")})
    native = checkpoint_images(checkpoint, exported)
    for name, image in native.items():
        pixels = [(x * 255).round().to(torch.uint8).numpy().astype(int) for x in (image, avx2[name])]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1, name  # PNG levels: at most one grey level apart
