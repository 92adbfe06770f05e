"""Command-line checks shared by the entry points, run before Hydra composes the config."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from text2img.utils.paths import CONF_DIR


def search_path(args: list[str]) -> list[Path]:
    """The folders of a `hydra.searchpath=[file://DIR,...]` argument: config roots Hydra adds to conf/."""
    folders = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "hydra.searchpath":
            items = (item.strip().strip("'\"") for item in value.strip("[]").split(","))
            folders += [Path(item.removeprefix("file://")) for item in items if item.startswith("file://")]
    return folders


def unknown_choice(args: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """One line naming a `group=option` argument whose option does not exist, else None.

    Hydra would report it too, but over a dozen lines with its search path; this names the options (those of a
    `hydra.searchpath` folder's group too). Sweeps (`group=a,b`) and lists (`group=[a,b]`) are checked element by
    element.
    """
    roots = [conf_dir, *search_path(args)]
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = conf_dir / key
        if not sep or "@" in key or "(" in value or key == "hydra" or not group.is_dir():
            continue
        options = sorted({path.stem for root in roots for path in (root / key).glob("*.yaml")})
        for option in value.strip("[]").split(","):
            option = option.strip()
            if option and option != "null" and option not in options:
                return f"text2img: error: unknown {key} '{option}'; choose one of: {', '.join(options)}"
    return None


def run_checked(hydra_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function after checking the command line's group options."""
    if (error := unknown_choice(sys.argv[1:])) is not None:
        raise SystemExit(error)
    hydra_main()
