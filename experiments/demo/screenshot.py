"""The README's picture of the demo, and the time from a click to images: starts the demo on the given checkpoints,
types prompts into the page in a headless Chromium, clicks Generate, waits for every column's images, and saves
a screenshot.

    .venv/bin/python experiments/demo/screenshot.py CKPT [COMPARE ...] [--out experiments/demo/screenshot.png]

Clicks three times (the same prompts, new seeds) and prints each click's seconds: the first includes encoding the
prompts with each checkpoint's text encoder (loaded for it), the others hit the embedding cache.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from text2img.webapp.app import build_app, demo_state

PROMPTS = "a red circle\na blue square\na smiling face with sunglasses\na green tree"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_images(page, columns: int) -> list[str | None]:
    """The address of each column's last image (None while a gallery is empty)."""
    return page.evaluate(
        """(columns) => [...Array(columns).keys()].map((c) => {
            const imgs = document.querySelectorAll(`#gallery-${c} .thumbnail-item img`);
            return imgs.length ? imgs[imgs.length - 1].src : null;
        })""",
        columns,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", default=str(Path(__file__).with_name("screenshot.png")))
    parser.add_argument("--prompts", default=PROMPTS, help="the prompt box's text, one prompt per line")
    parser.add_argument("--count", type=int, default=2, help="images per prompt")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on this machine; on Debian: apt-get install chromium")
    state = demo_state(args.checkpoints, Path(tempfile.mkdtemp(prefix="demo-screenshot-")), empty_slots=0)
    port = free_port()
    app = build_app(state)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(state.out_dir)], footer_links=[])
    images = len([line for line in args.prompts.splitlines() if line.strip()]) * args.count
    seconds = []
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#prompts").get_by_role("textbox").fill(args.prompts)
            page.locator("#count").get_by_role("spinbutton").fill(str(args.count))
            for click in range(3):
                page.locator("#seed").get_by_role("spinbutton").fill(str(click * images))  # new images each click
                before = last_images(page, len(args.checkpoints))
                clicked = time.monotonic()
                page.click("#generate")
                # new images have new addresses (Gradio names files by content): wait for every column's last one
                page.wait_for_function(
                    """([columns, count, before]) => [...Array(columns).keys()].every((c) => {
                        const imgs = document.querySelectorAll(`#gallery-${c} .thumbnail-item img`);
                        return imgs.length === count && imgs[count - 1].src !== before[c];
                    })""",
                    arg=[len(args.checkpoints), images, before], timeout=600_000, polling=50,
                )
                seconds.append(time.monotonic() - clicked)
                print(f"click {click + 1}: {seconds[-1]:.2f} s to {images} images x {len(args.checkpoints)} columns")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"first click {seconds[0]:.2f} s (encodes the prompts), later clicks median {statistics.median(seconds[1:]):.2f} s")
    print(f"screenshot -> {args.out}")


if __name__ == "__main__":
    main()
