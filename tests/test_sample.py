"""`python -m text2img.sample` on a tiny checkpoint: files and names, seeds, the embedding cache, editing, errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train, smoke_overrides, write_imagefolder
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from text2img.data.imagefolder import load_rgb_square
from text2img.sample import Sampled, sample
from text2img.sampling.images import SamplingOptions, image_name, image_seed, sample_command, slug
from text2img.train import train
from text2img.utils.grid import captioned_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step smoke run's last checkpoint, with its embedding cache in its own folder."""
    root = tmp_path_factory.mktemp("sample")
    data = write_imagefolder(root / "data")
    overrides = smoke_overrides(data, "logger=csv", "test=false", f"data.embedding_cache_dir={root / 'embeddings'}")
    train(compose_train(root / "run", overrides))
    return root / "run" / "checkpoints" / "last.ckpt"


def run_sample(tmp_path: Path, checkpoint: Path, prompts: list[str], *overrides: str) -> Sampled:
    args = [f"ckpt={checkpoint}", f"prompts={json.dumps(prompts, ensure_ascii=False)}", *overrides]
    if not any(arg.startswith("out=") for arg in overrides):
        args.append(f"out={tmp_path / 'out'}")
    return sample(compose_train(tmp_path, args, "sample"))


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_names_say_prompt_index_prompt_and_seed() -> None:
    assert slug("Red apple, shiny!") == "red-apple-shiny" and slug("🍎") == "prompt"
    assert image_name(3, "Red apple, shiny!", 17) == "p003-red-apple-shiny-seed17.png"
    assert [image_seed(10, i, 3, j) for i in range(2) for j in range(3)] == [10, 11, 12, 13, 14, 15]


def test_writes_one_png_per_image_a_captioned_grid_and_a_manifest(checkpoint: Path, tmp_path: Path) -> None:
    prompts = ["a red square", "Green apple, shiny!"]
    result = run_sample(tmp_path, checkpoint, prompts, "n=3", "seed=10", "batch_size=4")
    expected = [f"p000-a-red-square-seed{s}.png" for s in (10, 11, 12)] + [
        f"p001-green-apple-shiny-seed{s}.png" for s in (13, 14, 15)
    ]
    assert [path.name for path in result.images] == expected
    assert sorted(path.name for path in result.folder.iterdir()) == sorted([*expected, "grid.png", "samples.json"])
    pixels = [png(path) for path in result.images]
    assert all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for p in pixels)
    assert len({p.tobytes() for p in pixels}) == 6  # every seed draws another image
    with Image.open(result.grid) as grid:  # one row of three per prompt
        assert grid.size == captioned_grid(torch.zeros(6, 3, 32, 32), [""] * 6, ncols=3).size
    manifest = json.loads((result.folder / "samples.json").read_text())
    assert [(e["file"], e["prompt"], e["seed"]) for e in manifest["images"]] == [
        (name, prompts[i // 3], 10 + i) for i, name in enumerate(expected)
    ]
    assert manifest["step"] == 6 and manifest["edit"] is None


def test_an_image_regenerated_alone_is_the_same(checkpoint: Path, tmp_path: Path) -> None:
    prompts = ["a blue circle", "a yellow triangle number 7"]
    together = run_sample(tmp_path / "a", checkpoint, prompts, "n=2", "seed=0", "batch_size=1")
    alone = run_sample(tmp_path / "b", checkpoint, prompts[1:], "n=1", "seed=3", "batch_size=1")
    assert together.images[3].name == "p001-a-yellow-triangle-number-7-seed3.png"
    assert alone.images[0].name == "p000-a-yellow-triangle-number-7-seed3.png"
    assert together.images[3].read_bytes() == alone.images[0].read_bytes()
    # beside another prompt, and at any batch size: generation runs at fixed shapes, so bit-identical
    pair = run_sample(tmp_path / "c", checkpoint, prompts, "n=2", "seed=0", "batch_size=2")
    mixed = run_sample(tmp_path / "d", checkpoint, ["a green square", prompts[1]], "n=1", "seed=2", "batch_size=2")
    assert pair.images[3].read_bytes() == mixed.images[1].read_bytes()  # seed 3: with seed 2 / beside seed 2
    for one, two in zip(together.images, pair.images, strict=True):
        assert one.read_bytes() == two.read_bytes()


def test_each_png_holds_its_prompt_seed_and_the_command_that_regenerates_it(checkpoint: Path, tmp_path: Path) -> None:
    prompts = ['a "red" square', "ein grüner Kreis"]
    result = run_sample(tmp_path / "a", checkpoint, prompts, "n=2", "seed=5", "guidance=2", "steps=4",
                        "sampler=EulerAncestralDiscreteScheduler")
    with Image.open(result.images[3]) as image:
        metadata = dict(image.text)
    assert metadata["prompt"] == prompts[1] and metadata["seed"] == "8"
    args = shlex.split(metadata["command"])
    assert args[:3] == ["python", "-m", "text2img.sample"] and args[3] == f"ckpt={checkpoint.absolute()}"
    assert args[4:] == [f'prompts=["{prompts[1]}"]', "n=1", "seed=8", "guidance=2", "steps=4",
                        "sampler=EulerAncestralDiscreteScheduler"]
    alone = sample(compose_train(tmp_path / "b", [*args[3:], f"out={tmp_path / 'b' / 'out'}"], "sample"))
    assert np.array_equal(png(alone.images[0]), png(result.images[3]))
    manifest = json.loads((result.folder / "samples.json").read_text())
    assert manifest["sampler"] == "EulerAncestralDiscreteScheduler"
    assert [entry["command"] for entry in manifest["images"]][3] == metadata["command"]


def test_another_sampler_draws_from_the_same_noise(checkpoint: Path, tmp_path: Path) -> None:
    own = run_sample(tmp_path / "a", checkpoint, ["a blue circle"], "steps=4")
    named_own = run_sample(tmp_path / "b", checkpoint, ["a blue circle"], "steps=4",
                           "sampler=DPMSolverMultistepScheduler")  # the generator's own
    other = run_sample(tmp_path / "c", checkpoint, ["a blue circle"], "steps=4", "sampler=DDIMScheduler")
    assert np.array_equal(png(own.images[0]), png(named_own.images[0]))
    difference = np.abs(png(own.images[0]).astype(int) - png(other.images[0]).astype(int))
    assert 0 < difference.mean() < 64  # another path from the same noise: changed, but no new picture


@pytest.mark.parametrize(
    "prompt", ["a red apple", 'say "hi", please', "back\\slash", "ends in \\", 'q\\"x', "é 🍎", "x=1, [y]",
               "it's", "cost ${x}", "a \\${y}"],
)
def test_the_command_reads_back_as_the_prompt(prompt: str) -> None:
    (override,) = [arg for arg in shlex.split(sample_command("m.ckpt", prompt, 3, SamplingOptions())) if
                   arg.startswith("prompts=")]
    parsed = OverridesParser.create().parse_override(override).value()
    assert list(OmegaConf.create({"prompts": parsed}).prompts) == [prompt]


def test_prompts_missing_from_the_cache_are_encoded_once(checkpoint: Path, tmp_path: Path) -> None:
    (shards,) = {path.parent for path in (checkpoint.parents[2] / "embeddings").glob("*/*.safetensors")}
    before = set(shards.glob("*.safetensors"))
    first = run_sample(tmp_path / "a", checkpoint, ["a purple hexagon", "a red square number 0"])
    added = set(shards.glob("*.safetensors")) - before
    assert len(added) == 1  # one shard with the new prompt; the training caption was a hit
    again = run_sample(tmp_path / "b", checkpoint, ["a purple hexagon"])
    assert set(shards.glob("*.safetensors")) == before | added
    assert again.images[0].read_bytes() == first.images[0].read_bytes()


def write_edit_inputs(folder: Path, size: int = 48, mask_size: int = 48) -> tuple[Path, Path]:
    """A 48-px picture (resized to the model's 32 px) and a mask whose lower half is white (regenerate)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse([6, 6, size - 6, size - 6], fill=(230, 40, 40))
    mask = Image.new("L", (mask_size, mask_size), 0)
    ImageDraw.Draw(mask).rectangle([0, mask_size // 2, mask_size, mask_size], fill=255)
    image.save(folder / "image.png")
    mask.save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png"


def test_inpainting_keeps_the_black_part_of_the_mask(checkpoint: Path, tmp_path: Path) -> None:
    image, mask = write_edit_inputs(tmp_path)
    result = run_sample(tmp_path, checkpoint, ["a red circle"], "n=2", f"init_image={image}", f"mask={mask}", "steps=8")
    resized = load_rgb_square(image, 32)  # what the model edits: the image at its resolution
    for path in result.images:
        out = png(path)
        assert np.array_equal(out[:16], resized[:16])
        assert np.abs(out[16:].astype(int) - resized[16:]).mean() > 10
    manifest = json.loads((result.folder / "samples.json").read_text())
    assert manifest["edit"] == {"init_image": str(image), "mask": str(mask), "strength": 1.0}


def test_img2img_strength_sets_how_far_from_the_input(checkpoint: Path, tmp_path: Path) -> None:
    image, _ = write_edit_inputs(tmp_path)
    resized = load_rgb_square(image, 32).astype(float)

    def distance(strength: float) -> float:
        result = run_sample(tmp_path / str(strength), checkpoint, ["a red circle"], "n=3", f"init_image={image}",
                            f"strength={strength}", "steps=10")
        return float(np.mean([np.abs(png(path) - resized).mean() for path in result.images]))

    near, far = distance(0.2), distance(0.9)
    assert near < far


def test_cli_writes_into_the_checkpoints_run_folder_and_says_where(checkpoint: Path, tmp_path: Path, entry_point) -> None:
    out = entry_point("sample", f"ckpt={checkpoint}", 'prompts=["red apple","green apple"]', "n=2", "seed=4", "guidance=3", "steps=3",
              f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    folder = Path(out.stdout.strip().splitlines()[-1].split(" -> ")[1])
    assert folder.parent == checkpoint.parents[1] / "samples" and folder.name.endswith("-last-txt2img-seed4")
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "grid.png", "p000-red-apple-seed4.png", "p000-red-apple-seed5.png", "p001-green-apple-seed6.png",
        "p001-green-apple-seed7.png",
    ]


def test_bad_input_on_the_command_line_is_one_line(checkpoint: Path, tmp_path: Path, entry_point) -> None:
    image, _ = write_edit_inputs(tmp_path)
    out = entry_point("sample", f"ckpt={checkpoint}", "prompts=[apple]", f"init_image={image}", "strength=1.5", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "text2img: error: strength=1.5 is out of range; use 0 < strength <= 1"
    )


def test_missing_prompts_are_one_line(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"""^text2img: error: prompts is required, e.g. prompts='\["red apple"\]'$"""):
        sample(compose_train(tmp_path, [f"ckpt={checkpoint}"], "sample"))


BAD = {
    "guidance below 1": (["guidance=0.5"], "guidance_scale=0.5 is below 1; use 1 (no guidance) or more"),
    "no steps": (["steps=0"], "steps=0 is out of range; use 1..1000"),
    "too many steps": (["steps=5000"], "steps=5000 is out of range; use 1..1000"),
    "n below 1": (["n=0"], "n=0 must be at least 1"),
    "batch size below 1": (["batch_size=0"], "batch_size=0 must be at least 1"),
    "empty prompt list": (["prompts=[]"], "prompts=[] gives no prompt; pass a list"),
    "blank prompt": (['prompts=["apple"," "]'], "prompts[1]=' ' is not a prompt; every prompt must be non-empty text"),
    "no such device": (["device=warp9"], "device='warp9' is not a device; use cpu, cuda or cuda:<index>"),
    "no such sampler": (
        ["sampler=WarpScheduler"],
        "sampler=WarpScheduler is not a sampler of this model's DDPM noise schedule; use one of "
        "DPMSolverMultistepScheduler, DDIMScheduler, DDPMScheduler, ",
    ),
    "strength zero": (["init_image={image}", "strength=0"], "strength=0.0 is out of range; use 0 < strength <= 1"),
    "strength without image": (["strength=0.5"], "strength=0.5 needs init_image=PATH, the image to edit"),
    "mask without image": (["mask={mask}"], "mask={mask} needs init_image=PATH, the image to edit"),
    "missing image": (["init_image={missing}"], "init_image='{missing}' does not exist; pass an image file"),
    "missing mask": (["init_image={image}", "mask={missing}"], "mask='{missing}' does not exist; pass an image file"),
    "not an image": (["init_image={text}"], "init_image='{text}' is not an image PIL can read"),
    "mask of another size": (
        ["init_image={image}", "mask={small_mask}"],
        "mask='{small_mask}' is 40x40 but init_image='{image}' is 48x48; give a mask of the image's size",
    ),
    "missing checkpoint": (["ckpt={missing}"], "ckpt='{missing}' does not exist; pass a .ckpt written by text2img.train"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(checkpoint: Path, tmp_path: Path, case: str) -> None:
    image, mask = write_edit_inputs(tmp_path)
    _, small_mask = write_edit_inputs(tmp_path / "small", mask_size=40)
    (tmp_path / "notes.png").write_text("not an image")
    paths = {"image": image, "mask": mask, "small_mask": small_mask, "missing": tmp_path / "nope.png",
             "text": tmp_path / "notes.png"}
    overrides, message = BAD[case]
    overrides = [o.format(**paths) for o in overrides]
    args = [f"ckpt={checkpoint}", 'prompts=["apple"]', f"out={tmp_path / 'out'}", *overrides]
    with pytest.raises(SystemExit) as exc:
        sample(compose_train(tmp_path, args, "sample"))
    text = str(exc.value.code)
    assert text.startswith(f"text2img: error: {message.format(**paths)}") and "\n" not in text
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_an_option_this_version_lacks_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["text2img_config"]["fusion"]["retired_option"] = 1  # as if written before the option was removed
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    with pytest.raises(SystemExit) as exc:
        sample(compose_train(tmp_path, [f"ckpt={old}", 'prompts=["apple"]', f"out={tmp_path / 'out'}"], "sample"))
    text = str(exc.value.code)
    assert text.startswith(f"text2img: error: {old} was trained with an option this text2img no longer has (")
    assert "unexpected keyword argument 'retired_option'" in text and text.endswith("or train it again")
    assert "\n" not in text
