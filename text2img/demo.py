"""Demo entry point: `python -m text2img.demo ckpt=A [compare=B]`, a local web page to look at checkpoints.

Type prompts (one per line), a seed, images per prompt, guidance, steps and each column's sampler; every loaded
checkpoint draws the same prompts with the same seeds, side by side, exactly the images `text2img.sample` draws
(the command under each gallery regenerates the selected one). An uploaded image is edited instead (img2img; with
paint on it, inpainting); the attention section shows where each text token looks. See `text2img.webapp`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from text2img.errors import ConfigError
from text2img.run.command_line import run_checked
from text2img.run.compose import one_line_errors
from text2img.run.config_checks import check_device
from text2img.utils.paths import CONF_DIR
from text2img.webapp.app import build_app, demo_state

log = logging.getLogger(__name__)


def checkpoints(cfg: DictConfig) -> list[str]:
    """`ckpt`, then `compare` (one path or a list)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("ckpt is required, e.g. ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt")
    compare = cfg.compare
    others = [] if compare is None else list(compare) if isinstance(compare, ListConfig) else [compare]
    return [str(path) for path in (cfg.ckpt, *others)]


def demo(cfg: DictConfig) -> None:
    with one_line_errors():
        paths = checkpoints(cfg)
        device = check_device(cfg.device)
        state = demo_state(paths, Path(cfg.paths.output_dir) / "images", str(device))
    app = build_app(state)
    log.info("images go to %s", state.out_dir)
    app.launch(server_name=cfg.host, server_port=cfg.port, inbrowser=cfg.open_browser,
               allowed_paths=[str(state.out_dir)], footer_links=[])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="demo")
def hydra_main(cfg: DictConfig) -> None:
    demo(cfg)


def main() -> None:
    run_checked(hydra_main)


if __name__ == "__main__":
    main()
