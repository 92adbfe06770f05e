"""Where the project's config groups live."""

from pathlib import Path

# An absolute path: Hydra reads a relative `config_path` as a Python package when the entry point is imported
# (the `text2img-train` console script) rather than run with `python -m`, and finds no package `conf`.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
