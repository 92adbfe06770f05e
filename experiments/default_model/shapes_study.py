"""The shapes benchmark at issue 17's budget: settings of the default model, each over seeds, with intervals.

    python experiments/default_model/shapes_study.py [--settings flow_lr2e-3 ...] [--seeds 0 1 2]

Each setting is a list of overrides of `python -m text2img.train data=shapes`, with a step count that fits
about 2.5 minutes of fitting on a 2-core AVX512 machine (the issue's 6 minutes on the AVX2 one), so the
cosine schedule completes instead of being cut by max_time. Runs go to `--out/runs/<setting>-s<seed>`; a
finished one (its `done` file) is kept, one cut off resumes from its last.ckpt. The figures are the
in-training test stage on the 192 held-out prompts (colour-shape pairs never trained on): per attribute,
`attr_overall` (every attribute right), FID and R@32, with the fit's steps and wall time from train.log.
Writes shapes_results.json beside this script and prints the per-setting table (mean ± 95% interval over seeds,
Welch's p-value for each pair of settings on attr_overall, colour and FID).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "fusion"))
sys.path.insert(0, str(HERE.parent / "bench"))
from collect import final_scores  # noqa: E402  (the fusion study's reader of a run's CSV log: one definition)
from train_throughput import machine  # noqa: E402  (the benchmarks' description of the machine)

from text2img.inspect.seeds import Column, settings_summary, settings_table  # noqa: E402

COMMON = ["data=shapes", "logger=csv", "trainer.max_time=null"]
# name -> (training steps that fit ~2.5 min of fitting on AVX512, overrides)
SETTINGS: dict[str, tuple[int, list[str]]] = {
    "default": (270, []),
    "flow": (270, ["generator.objective=flow"]),
    "flow_lr2e-3": (270, ["generator.objective=flow", "model.optimizer.lr=2e-3"]),
    # 4x4 pixel patches folded into channels: the UNet runs at 8x8, 3.8x fewer FLOPs a step for the same weights
    "flow_lr2e-3_patch4": (540, ["generator.objective=flow", "model.optimizer.lr=2e-3", "generator.patch_size=4"]),
    # the PixArt DiT over 4x4 patches (64 tokens, 6x128): absolute position embeddings, which a UNet lacks
    "dit_patch4": (540, ["generator/denoiser=dit", "generator.objective=flow", "generator.patch_size=4"]),
}
COLUMNS: list[Column] = [
    ("steps", "steps", ".0f"), ("fit s", "fit_seconds", ".0f"),
    ("colour", "test/attr_colour", ".2f"), ("shape", "test/attr_shape", ".2f"), ("size", "test/attr_size", ".2f"),
    ("count", "test/attr_count", ".2f"), ("position", "test/attr_position", ".2f"),
    ("overall", "test/attr_overall", ".3f"), ("FID", "test/fid_effnet", ".1f"), ("R@32", "test/r_precision", ".3f"),
]
TESTED = ("test/attr_overall", "test/attr_colour", "test/fid_effnet")
_FIT_DONE = re.compile(r"training done: ([\d,]+) steps in ((?:\d+:)?\d+:\d+)")


def fit_time(run: Path) -> dict[str, float]:
    """Steps and wall-clock seconds of the run's fit, from the last 'training done' line of its train.log."""
    found = _FIT_DONE.findall((run / "train.log").read_text())
    if not found:
        return {}
    steps, clock = found[-1]
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return {"steps": float(steps.replace(",", "")), "fit_seconds": float(seconds)}


def train(run: Path, steps: int, overrides: list[str], seed: int) -> None:
    """Train one run unless it finished; a run cut off resumes from its last checkpoint."""
    if (run / "done").is_file():
        return
    command = [
        sys.executable, "-m", "text2img.train", *COMMON, *overrides, f"seed={seed}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "ckpt_path=last", f"hydra.run.dir={run}",
    ]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    (run / "done").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "shapes_study")
    parser.add_argument("--results", type=Path, default=HERE / "shapes_results.json")
    args = parser.parse_args()
    results = {}
    for name in args.settings:
        steps, overrides = SETTINGS[name]
        for seed in args.seeds:
            run = (args.out / "runs" / f"{name}-s{seed}").absolute()
            train(run, steps, overrides, seed)
            results[f"{name}-s{seed}"] = {**final_scores(run), **fit_time(run)}
    summary = settings_summary(results, COLUMNS, TESTED)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings_overrides": {name: SETTINGS[name][1] for name in args.settings},
        "runs": results,
        **summary,
    }
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(settings_table(summary, COLUMNS))


if __name__ == "__main__":
    main()
