"""The demo (`python -m text2img.demo`): its functions on a tiny checkpoint (the images are `text2img.sample`'s, edits,
errors, attention maps), and the page itself driven through a headless Chromium."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_train, smoke_overrides, write_imagefolder
from PIL import Image, ImageDraw

from text2img.sample import sample
from text2img.sampling.images import SamplingOptions
from text2img.train import train

gradio = pytest.importorskip("gradio", reason="the demo's extra is not installed: pip install -e '.[demo]'")

# imported after the importorskip above, so that a machine without gradio skips this file
from text2img.webapp.app import DemoState, Slot, build_app, demo_state, edit_input, generate_all  # noqa: E402
from text2img.webapp.session import (  # noqa: E402
    DemoError,
    attention_gallery,
    generate,
    load_run,
    parse_prompts,
    prepare_edit,
    run_summary,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step smoke run's last checkpoint (tiny encoder, pixel UNet with cross-attention)."""
    root = tmp_path_factory.mktemp("demo")
    data = write_imagefolder(root / "data")
    overrides = smoke_overrides(data, "logger=csv", "test=false", f"data.embedding_cache_dir={root / 'embeddings'}")
    train(compose_train(root / "run", overrides))
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def state(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoState:
    """The page's state: the checkpoint in column A, column B empty."""
    return demo_state([str(checkpoint)], tmp_path_factory.mktemp("demo-images"))


def sampled(tmp_path: Path, checkpoint: Path, prompts: list[str], *overrides: str) -> list[np.ndarray]:
    args = [f"ckpt={checkpoint}", f"prompts={json.dumps(prompts, ensure_ascii=False)}", f"out={tmp_path / 'sample'}"]
    return [png(path) for path in sample(compose_train(tmp_path, [*args, *overrides], "sample")).images]


def png(path: Path | bytes) -> np.ndarray:
    import io

    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_summary_names_encoder_layers_fusion_generator_and_steps() -> None:
    config = {
        "encoder": {"_target_": "text2img.encoders.SmolLM2Encoder", "layers": [10, 20, 30], "combine": "concat"},
        "fusion": {"_target_": "text2img.fusion.TokenProjection"},
        "generator": {"_target_": "text2img.generators.LatentDiffusionGenerator", "objective": "flow",
                      "denoiser": {"_target_": "text2img.generators.denoisers.DiTDenoiser"}, "image_size": 32,
                      "first_stage": {"_target_": "text2img.generators.first_stage.patch_pca_first_stage"}},
    }
    assert run_summary({"text2img_config": config, "global_step": 1000}) == {
        "encoder": "SmolLM2Encoder", "layers": "[10, 20, 30] (concat)", "fusion": "TokenProjection",
        "generator": "LatentDiffusionGenerator (DiTDenoiser, flow, latents of patch_pca_first_stage)",
        "image size": "32 px", "steps trained": "1000",
    }
    config["encoder"] = {"_target_": "text2img.encoders.HFTextEncoder", "model_name": "m", "layer": -2, "layer_mean": 4}
    summary = run_summary({"text2img_config": config, "global_step": 7})
    assert summary["encoder"] == "HFTextEncoder (m)" and summary["layers"] == "-2, mean of the last 4"


def test_the_page_draws_the_images_text2img_sample_draws(state: DemoState, checkpoint: Path, tmp_path: Path) -> None:
    prompts = ["a red circle", 'a "blue" square, ß']
    options = SamplingOptions(guidance=2.0, steps=4, sampler="EulerAncestralDiscreteScheduler", batch_size=3)
    counted = []
    images = generate(state.slots[0].run, prompts, 2, 7, options, tmp_path / "page", on_image=counted.append)
    assert [image.path.name for image in images] == [
        "p000-a-red-circle-seed7.png", "p000-a-red-circle-seed8.png", "p001-a-blue-square-seed9.png",
        "p001-a-blue-square-seed10.png",
    ]
    assert [image.caption for image in images][2] == f"{prompts[1]} (seed 9)" and sum(counted) == 4
    expected = sampled(tmp_path, checkpoint, prompts, "n=2", "seed=7", "guidance=2", "steps=4",
                       "sampler=EulerAncestralDiscreteScheduler")
    for image, pixels in zip(images, expected, strict=True):
        assert np.array_equal(png(image.path), pixels)
    with Image.open(images[3].path) as file:
        assert file.text["prompt"] == prompts[1] and file.text["seed"] == "10"
        assert file.text["command"] == images[3].command
    args = shlex.split(images[3].command)
    assert args[4:] == [f"prompts={json.dumps([prompts[1]], ensure_ascii=False)}", "n=1", "seed=10", "guidance=2.0",
                        "steps=4", "sampler=EulerAncestralDiscreteScheduler"]
    again = sample(compose_train(tmp_path / "again", [*args[3:], f"out={tmp_path / 'again' / 'out'}"], "sample"))
    assert np.array_equal(png(again.images[0]), png(images[3].path))


def painted_editor(size: int = 40) -> dict:
    """What the page's ImageEditor sends: an uploaded picture, and a layer painted over its right half."""
    picture = Image.new("RGB", (size + 8, size), "white")
    ImageDraw.Draw(picture).ellipse([6, 6, size - 6, size - 6], fill=(40, 40, 230))
    layer = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle([picture.width // 2, 0, picture.width, size], fill=(255, 255, 255, 255))
    return {"background": picture, "layers": [layer], "composite": picture}


def test_an_uploaded_image_with_paint_is_inpainted_as_the_command_does(
    state: DemoState, checkpoint: Path, tmp_path: Path
) -> None:
    editor = painted_editor()
    edit = edit_input(editor, 0.6)
    assert edit is not None and edit.strength == 0.6
    mask = np.asarray(edit.mask)
    assert mask.shape == (40, 48) and mask[:, 24:].min() == 255 and mask[:, :24].max() == 0
    assert edit_input({"background": editor["background"], "layers": []}, 0.6).mask is None  # no paint: img2img
    assert edit_input({"background": None, "layers": []}, 0.6) is None  # nothing uploaded: draw from noise
    (image,) = generate(state.slots[0].run, ["a green circle"], 1, 3, SamplingOptions(steps=4), tmp_path / "x", edit)
    args = shlex.split(image.command)
    inputs = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for arg in args[3:]}
    assert Path(inputs["init_image"]).is_file() and Path(inputs["mask"]).is_file() and inputs["strength"] == "0.6"
    again = sample(compose_train(tmp_path / "again", [*args[3:], f"out={tmp_path / 'again' / 'out'}"], "sample"))
    assert np.array_equal(png(again.images[0]), png(image.path))
    kept = png(image.path)[:, :8]  # the left of the 32-px square: unpainted, so the input's pixels exactly
    prepared, _ = prepare_edit(state.slots[0].run, edit, tmp_path / "y")
    assert np.array_equal(kept, (prepared.images[0].permute(1, 2, 0).numpy()[:, :8] * 127.5 + 127.5).round())


def test_uploads_of_any_pixel_kind_become_rgb_and_a_misfit_mask_says_so() -> None:
    for image in [Image.new("CMYK", (20, 30), (0, 255, 255, 0)), Image.new("I;16", (30, 20), 40000),
                  Image.new("LA", (25, 25), (10, 0)), Image.new("P", (16, 16), 3)]:
        edit = edit_input({"background": image, "layers": []}, 0.5)
        assert edit.image.mode == "RGB" and edit.image.size == image.size and edit.mask is None, image.mode
    layer = Image.new("RGBA", (10, 10), (255, 255, 255, 255))
    with pytest.raises(DemoError, match="^a mask layer is 10x10, not the image's size; draw it again$"):
        edit_input({"background": Image.new("RGB", (20, 20)), "layers": [layer]}, 0.5)


def test_the_columns_draw_the_same_prompts_and_seeds(checkpoint: Path, tmp_path: Path) -> None:
    state = demo_state([str(checkpoint), str(checkpoint)], tmp_path)
    assert [slot.label for slot in state.slots] == ["model A", "model B", "model C"] and state.slots[2].run is None
    reports = []
    a, b, empty = generate_all(state, "a red circle\n\n  a blue square ", 0, 1, 0, 4, None, 0.8,
                               ["DPMSolverMultistepScheduler", "DDIMScheduler", None],
                               lambda done, total: reports.append((done, total)))
    assert empty is None and reports[-1] == (4, 4)
    assert [image.caption for image in a] == ["a red circle (seed 0)", "a blue square (seed 1)"]
    assert "sampler" not in a[0].command and b[0].command.endswith("steps=4 sampler=DDIMScheduler")  # A: its own
    assert a[0].path.parent != b[0].path.parent
    assert not np.array_equal(png(a[0].path), png(b[0].path))  # another sampler from the same noise


def test_attention_maps_of_the_first_image(state: DemoState, tmp_path: Path) -> None:
    tiles = attention_gallery(state.slots[0].run, "a red circle", 5, SamplingOptions(steps=4))
    (image,) = generate(state.slots[0].run, ["a red circle"], 1, 5, SamplingOptions(steps=4), tmp_path)
    assert np.array_equal(np.asarray(tiles[0][0]), png(image.path)) and tiles[0][1] == "a red circle (seed 5)"
    shares = [float(caption.rsplit(": ", 1)[1].rstrip("%")) for _, caption in tiles[1:]]
    assert len(tiles) > 2 and sum(shares) == pytest.approx(100, abs=len(shares))  # each token's share, rounded
    assert all(tile.size == (32, 32) for tile, _ in tiles[1:])


BAD_INPUT = {
    "no prompt": ({"prompts_text": " \n "}, "the prompt box is empty; type a prompt (one per line for several)"),
    "too many images": ({"n": 40}, "2 prompts x 40 images = 80 images; ask for at most 64 at once"),
    "fractional seed": ({"seed": 1.5}, "seed and images per prompt must be whole numbers"),
    "guidance below 1": ({"guidance": 0.5}, "guidance_scale=0.5 is below 1; use 1 (no guidance) or more"),
    "too many steps": ({"steps": 5000}, "steps=5000 is out of range; use 1..1000"),
    "sampler of another schedule": (
        {"samplers": ["FlowMatchEulerDiscreteScheduler", None]},
        "sampler FlowMatchEulerDiscreteScheduler does not apply to DiffusionGenerator",
    ),
    "strength out of range": ({"editor": painted_editor(), "strength": 0.0},
                              "strength=0.0 is out of range; use 0 < strength <= 1"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_clear_line(state: DemoState, case: str) -> None:
    values = {"prompts_text": "a\nb", "seed": 0, "n": 1, "guidance": 0, "steps": 0, "editor": None, "strength": 0.8,
              "samplers": [None, None]}
    changes, message = BAD_INPUT[case]
    with pytest.raises(DemoError) as error:
        generate_all(state, **(values | changes))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_checkpoint_that_does_not_load_says_why(state: DemoState, tmp_path: Path) -> None:
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for path, message in [
        ("", "no checkpoint given; type the path of a .ckpt written by text2img.train"),
        (str(tmp_path / "missing.ckpt"), f"ckpt='{tmp_path / 'missing.ckpt'}' does not exist; pass a .ckpt"),
        (str(tmp_path / "notes.ckpt"), f"ckpt='{tmp_path / 'notes.ckpt'}' is not a text2img checkpoint"),
    ]:
        with pytest.raises(DemoError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
            load_run(path)
    page = DemoState([Slot("model A")], tmp_path, "cpu")
    page.load(0, str(tmp_path / "notes.ckpt"))
    assert page.slots[0].run is None and "could not load: ckpt=" in page.slots[0].status()
    with pytest.raises(DemoError, match="^no checkpoint is loaded; type a checkpoint path in a column and press Load"):
        generate_all(page, "a", 0, 1, 0, 0, None, 0.8, [None])


def test_a_gan_column_draws_beside_a_diffusion_one_and_refuses_to_edit(checkpoint: Path, tmp_path: Path) -> None:
    data = write_imagefolder(tmp_path / "data")
    overrides = smoke_overrides(data, "generator=gan", "logger=csv", "test=false",
                                f"data.embedding_cache_dir={tmp_path / 'embeddings'}")
    train(compose_train(tmp_path / "gan", overrides))
    state = demo_state([str(checkpoint), str(tmp_path / "gan" / "checkpoints" / "last.ckpt")], tmp_path / "images")
    gan = state.slots[1].run
    assert gan.sampler_names == [] and gan.summary["generator"].startswith("GANGenerator")
    diffusion, drawn, _ = generate_all(state, "a red circle", 0, 2, 3, 4, None, 0.8,
                                       ["DPMSolverMultistepScheduler", None, None])
    assert diffusion[0].command.endswith("seed=0 guidance=3.0 steps=4")  # guidance and steps: the diffusion column's
    assert drawn[1].command.endswith("""'prompts=["a red circle"]' n=1 seed=1""")
    expected = sampled(tmp_path, tmp_path / "gan" / "checkpoints" / "last.ckpt", ["a red circle"], "n=2")
    assert all(np.array_equal(png(image.path), pixels) for image, pixels in zip(drawn, expected, strict=True))
    before = sorted(state.out_dir.iterdir())
    with pytest.raises(DemoError, match="^GANGenerator cannot edit images .*; remove the image to edit, or load a"):
        generate_all(state, "a red circle", 0, 1, 0, 0, painted_editor(), 0.8, [None, None, None])
    assert sorted(state.out_dir.iterdir()) == before  # refused before the diffusion column drew anything
    assert parse_prompts("one\n\n two \n") == ["one", "two"]


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "ckpt is required, e.g. ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt"),
        (("ckpt=a.ckpt", "device=warp9"), "device='warp9' is not a device; use cpu, cuda or cuda:<index>"),
    ],
)
def test_the_command_line_stops_in_one_line(entry_point, args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    out = entry_point("demo", *args, f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1] == f"text2img: error: {message}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_the_page_in_a_real_browser(state: DemoState, checkpoint: Path, tmp_path: Path) -> None:
    """Type prompts, generate, and find on the page the images `text2img.sample` draws; bad input shows a message
    and the page goes on working; nothing is fetched from outside this machine."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    port = free_port()
    app = build_app(state)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(state.out_dir)], footer_links=[])
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            hosts = set()
            page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#prompts").get_by_role("textbox").fill("")
            page.click("#generate")
            assert "the prompt box is empty" in page.locator(".toast-body").first.inner_text(timeout=30_000)
            page.locator("#prompts").get_by_role("textbox").fill("a red circle\na blue square")
            page.fill("#count input", "2")
            page.fill("#seed input", "3")
            clicked = time.monotonic()
            page.click("#generate")
            page.locator("#gallery-0 img").nth(3).wait_for(timeout=120_000)
            seconds = time.monotonic() - clicked
            sources = [img.get_attribute("src") for img in page.locator("#gallery-0 .thumbnail-item img").all()]
            shown = [png(page.request.get(src).body()) for src in sources]
            command = page.locator("#command-0").get_by_role("textbox").input_value()
            page.get_by_text("Where each token looks").click()
            page.click("#maps")
            page.locator("#maps-gallery .thumbnail-item img").nth(2).wait_for(timeout=60_000)  # the image, 2+ tokens
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            page.locator("#path-1").get_by_role("textbox").fill(str(tmp_path / "missing.ckpt"))
            page.click("#load-1")
            page.get_by_text("could not load: ckpt=").wait_for(timeout=30_000)
            browser.close()
    finally:
        app.close()
    expected = sampled(tmp_path, checkpoint, ["a red circle", "a blue square"], "n=2", "seed=3")
    assert len(shown) == 4 and all(np.array_equal(a, b) for a, b in zip(shown, expected, strict=True))
    assert command.endswith("""'prompts=["a red circle"]' n=1 seed=3""")
    assert hosts == {f"127.0.0.1:{port}"}, hosts
    print(f"click to images: {seconds:.1f} s; screenshot {tmp_path / 'demo.png'}")
