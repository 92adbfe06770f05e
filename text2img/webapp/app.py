"""The demo's page (Gradio): prompts and settings once, then one column per checkpoint, each drawing the same prompts
with the same seeds, side by side; image editing from an upload and a drawn mask; per-token attention maps.

The page works offline: analytics are off and Gradio's theme is served with its own fonts. Generation is queued one
click at a time (a model holds the CPU or GPU); a mistake in the input shows as a message in the page.
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from text2img.sampling.images import SamplingOptions
from text2img.utils.progress import Progress
from text2img.webapp.session import (
    DemoEdit,
    DemoError,
    DemoImage,
    LoadedRun,
    attention_gallery,
    check_edits,
    generate,
    load_run,
    parse_prompts,
)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads it then
import gradio as gr

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = "a red circle\na blue square"


@dataclass
class Slot:
    """One column of the page: a checkpoint path and, once it loads, its model (else why it did not)."""

    label: str
    path: str = ""
    run: LoadedRun | None = None
    error: str | None = None

    def status(self) -> str:
        if self.run is not None:
            rows = "\n".join(f"- **{key}**: {value}" for key, value in self.run.summary.items())
            return f"**{self.label}** `{self.run.checkpoint}`\n\n{rows}"
        if self.error is not None:
            return f"**{self.label}**: could not load: {self.error}"
        return f"**{self.label}**: no checkpoint; type a path and press Load"


@dataclass
class DemoState:
    """What the server holds for the page: the columns, where images go, the device, and the clicks so far."""

    slots: list[Slot]
    out_dir: Path
    device: str
    clicks: int = 0
    commands: list[list[str]] = field(default_factory=list)

    def load(self, index: int, path: str) -> None:
        slot = self.slots[index]
        slot.path, slot.run, slot.error = path, None, None
        if not path.strip():
            return
        try:
            slot.run = load_run(path, self.device)
        except DemoError as exc:
            slot.error = str(exc)
            log.warning("%s: %s", slot.label, exc)

    def next_folder(self, slot: Slot, kind: str) -> Path:
        self.clicks += 1
        return self.out_dir / f"{self.clicks:03d}-{kind}-{slot.label}"


def demo_state(checkpoints: Sequence[str], out_dir: Path, device: str = "cpu", empty_slots: int = 1) -> DemoState:
    """The page's columns: one per checkpoint (loaded now; one that fails says why in its column), plus
    `empty_slots` more to load another checkpoint from the page."""
    count = len(checkpoints) + empty_slots
    if count > len(string.ascii_uppercase):
        raise DemoError(f"{len(checkpoints)} checkpoints; compare at most {len(string.ascii_uppercase) - empty_slots}")
    state = DemoState([Slot(f"model {string.ascii_uppercase[i]}") for i in range(count)], out_dir, device)
    for index, path in enumerate(checkpoints):
        state.load(index, str(path))
    return state


def edit_input(editor: dict[str, Any] | None, strength: float) -> DemoEdit | None:
    """The ImageEditor's value as an edit: its background is the image, what was painted on it the mask (white =
    regenerate); None when no image was uploaded."""
    if not editor or editor.get("background") is None:
        return None
    background: Image.Image = editor["background"]
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in editor.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3]
        if alpha.shape != painted.shape:
            raise DemoError(f"a mask layer is {alpha.shape[1]}x{alpha.shape[0]}, not the image's size; draw it again")
        painted |= alpha > 0
    mask = Image.fromarray(painted.astype(np.uint8) * 255) if painted.any() else None
    return DemoEdit(background.convert("RGB"), mask, float(strength))


def chosen_sampler(run: LoadedRun, value: str | None) -> str | None:
    """The dropdown's sampler, None for the checkpoint's own (the command then leaves it out) or a one-pass model."""
    names = run.sampler_names
    return value if value and names and value != names[0] else None


def sampling_options(guidance: float | None, steps: float | None, sampler: str | None) -> SamplingOptions:
    """Guidance and steps 0 (or empty) mean the checkpoint's own; so does sampler None."""
    if steps and steps != int(steps):
        raise DemoError(f"steps={steps} is not a whole number")
    return SamplingOptions(
        guidance=float(guidance) if guidance else None, steps=int(steps) if steps else None, sampler=sampler
    )


def generate_all(
    state: DemoState,
    prompts_text: str,
    seed: float,
    n: float,
    guidance: float | None,
    steps: float | None,
    editor: dict[str, Any] | None,
    strength: float,
    samplers: Sequence[str | None],
    report: Callable[[int, int], None] | None = None,
) -> list[list[DemoImage] | None]:
    """Every loaded column's images for the prompts (None for an empty column); `report(done, total)` after each
    batch. Raises DemoError for input that no column can use."""
    prompts = parse_prompts(prompts_text)
    if seed is None or n is None or seed != int(seed) or n != int(n):
        raise DemoError("seed and images per prompt must be whole numbers")
    loaded = [slot for slot in state.slots if slot.run is not None]
    if not loaded:
        raise DemoError("no checkpoint is loaded; type a checkpoint path in a column and press Load")
    edit = edit_input(editor, strength)
    if edit is not None:
        for slot in loaded:  # before any column draws: a click does all of its columns or none
            check_edits(slot.run)
    total = len(prompts) * int(n) * len(loaded)
    results: list[list[DemoImage] | None] = []
    with Progress("generating", total, "images") as progress:

        def advance(count: int) -> None:
            progress.advance(count)
            if report is not None:
                report(progress.done, total)

        for slot, sampler in zip(state.slots, samplers, strict=True):
            if slot.run is None:
                results.append(None)
                continue
            options = sampling_options(guidance, steps, chosen_sampler(slot.run, sampler))
            if not slot.run.sampler_names:  # a GAN or VAE draws in one pass: guidance and steps are the others'
                options = SamplingOptions()
            folder = state.next_folder(slot, "edit" if edit else "txt2img")
            results.append(generate(slot.run, prompts, int(n), int(seed), options, folder, edit, advance))
    return results


def build_app(state: DemoState) -> gr.Blocks:
    """The page for `state`'s columns."""
    with gr.Blocks(title="text2img demo", analytics_enabled=False) as app:
        gr.Markdown(
            "## text2img: look at your model\nThe same prompts and seeds go to every column. Each image's PNG "
            "holds its prompt and seed; the command under a gallery regenerates the selected image with "
            "`text2img.sample`."
        )
        with gr.Row():
            prompts = gr.Textbox(DEFAULT_PROMPTS, lines=4, label="Prompts (one per line)", elem_id="prompts", scale=3)
            with gr.Column(scale=2):
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    count = gr.Number(2, precision=0, minimum=1, label="Images per prompt", elem_id="count")
                with gr.Row():
                    guidance = gr.Number(0, label="Guidance (0: the checkpoint's)", elem_id="guidance")
                    steps = gr.Number(0, precision=0, label="Steps (0: the checkpoint's)", elem_id="steps")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Accordion("Edit an image (diffusion backends): upload it; paint the part to regenerate", open=False), \
                gr.Row():
            editor = gr.ImageEditor(
                type="pil", label="Image to edit (no paint: image-to-image; paint: inpainting)", layers=False,
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="editor",
            )
            strength = gr.Slider(0.05, 1.0, 0.8, step=0.05, label="Strength (how much is redrawn)")
        columns = []
        with gr.Row(equal_height=False):
            for index, slot in enumerate(state.slots):
                with gr.Column():
                    path = gr.Textbox(slot.path, label=f"{slot.label}: checkpoint", elem_id=f"path-{index}")
                    load = gr.Button("Load", size="sm", elem_id=f"load-{index}")
                    status = gr.Markdown(slot.status(), elem_id=f"status-{index}")
                    sampler = gr.Dropdown(**_sampler_choices(slot), label="Sampler", elem_id=f"sampler-{index}")
                    gallery = gr.Gallery(label=slot.label, columns=4, height="auto", format="png", elem_id=f"gallery-{index}",
                                         buttons=["download", "fullscreen"])
                    command = gr.Textbox(label="Regenerate the selected image", interactive=False,
                                         elem_id=f"command-{index}", buttons=["copy"])
                    commands = gr.State([])
                columns.append((path, load, status, sampler, gallery, command, commands))
                load.click(_loader(state, index), inputs=path, outputs=[status, sampler])
                gallery.select(_selected_command, inputs=commands, outputs=command)
        with gr.Accordion("Where each token looks: cross-attention maps of the first prompt's first image", open=False):
            with gr.Row():
                which = gr.Dropdown([slot.label for slot in state.slots], value=state.slots[0].label,
                                    label="Column", elem_id="maps-column")
                show = gr.Button("Show attention maps", elem_id="maps")
            maps = gr.Gallery(label="Image, then each token's share of attention", columns=6, format="png",
                              elem_id="maps-gallery")

        def on_generate(*values: Any, progress: gr.Progress = gr.Progress()) -> list[Any]:  # noqa: B008 (how Gradio asks)
            prompts_text, seed_value, n, guidance_value, steps_value, editor_value, strength_value = values[:7]
            samplers = values[7:]
            try:
                results = generate_all(
                    state, prompts_text, seed_value, n, guidance_value, steps_value, editor_value, strength_value,
                    samplers, lambda done, total: progress((done, total), desc="generating", unit="images"),
                )
            except DemoError as exc:
                raise gr.Error(str(exc), print_exception=False) from exc
            outputs: list[Any] = []
            for images in results:
                if images is None:
                    outputs += [None, "", []]
                else:
                    outputs += [[(str(i.path), i.caption) for i in images], images[0].command,
                                [i.command for i in images]]
            return outputs

        button.click(
            on_generate,
            inputs=[prompts, seed, count, guidance, steps, editor, strength, *(c[3] for c in columns)],
            outputs=[component for c in columns for component in (c[4], c[5], c[6])],
        )

        def on_maps(label: str, prompts_text: str, seed_value: float, guidance_value: float | None,
                    steps_value: float | None, *samplers: str | None) -> list[tuple[Image.Image, str]]:
            try:
                index = [slot.label for slot in state.slots].index(label)
                slot = state.slots[index]
                if slot.run is None:
                    raise DemoError(f"{label} has no checkpoint loaded; load one, or pick another column")
                options = sampling_options(guidance_value, steps_value, chosen_sampler(slot.run, samplers[index]))
                return attention_gallery(slot.run, parse_prompts(prompts_text)[0], int(seed_value), options)
            except DemoError as exc:
                raise gr.Error(str(exc), print_exception=False) from exc

        show.click(on_maps, inputs=[which, prompts, seed, guidance, steps, *(c[3] for c in columns)], outputs=maps)
    app.queue(default_concurrency_limit=1)  # one generation at a time: the models share the device
    return app


def _sampler_choices(slot: Slot) -> dict[str, Any]:
    names = slot.run.sampler_names if slot.run is not None else []
    return {"choices": names, "value": names[0] if names else None, "visible": bool(names)}


def _loader(state: DemoState, index: int) -> Any:
    def load(path: str) -> tuple[str, Any]:
        state.load(index, path)
        slot = state.slots[index]
        return slot.status(), gr.update(**_sampler_choices(slot))

    return load


def _selected_command(commands: list[str], event: gr.SelectData) -> str:
    return commands[event.index] if event.index is not None and event.index < len(commands) else ""
