"""The fusion study's table: test scores, training speed and trainable parameters of each job of its multiruns.

    python experiments/fusion/collect.py heads=outputs/fusion/heads layers=outputs/fusion/layers ...
    python experiments/fusion/collect.py heads=outputs/fusion/heads+outputs/fusion/heads_rerun   # one table

Each job folder of a multirun (`python -m text2img.train -m ... logger=csv`) gives its overrides, its test
scores (the last `val/` and `test/` figures in csv/metrics.csv) and its final checkpoint. The training speed of every job's
configuration is then measured in this one process, job after job (fresh weights, warm-up, median step time),
so machine noise hits all alike. Writes results.json beside this script and prints one Markdown table per
name, its rows labelled by the overrides that vary among its jobs. A job that left no checkpoint (it failed)
is reported and left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "backends"))
from compare import machine, training_speed  # noqa: E402  (the backends study's timing: one definition)

COLUMNS = [
    ("FID", "test/fid_effnet", ".1f"), ("KID", "test/kid_effnet", ".3f"), ("R@32", "test/r_precision", ".3f"),
    ("val R@32", "val/r_precision", ".3f"),
    # the LiT evaluator's text side is the run's (frozen) encoder: its R@32 on real images is that encoder's ceiling
    ("R@32 real", "test/r_precision_real", ".3f"), ("LiT clip score", "test/clip_score_lit", ".2f"),
    ("train img/s", "train_images_per_s", ".1f"),
    ("trainable params", "trainable_parameters", ",d"),
]


def final_scores(job: Path) -> dict[str, float]:
    """The last logged value of every `val/` and `test/` figure in the job's CSV log."""
    scores: dict[str, float] = {}
    with open(job / "csv" / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            scores.update({key: float(value) for key, value in row.items() if key.startswith(("val/", "test/")) and value})
    return scores


def jobs(sweep: Path) -> list[tuple[Path, list[str]]]:
    found = [(job, list(OmegaConf.load(job / ".hydra" / "overrides.yaml"))) for job in sweep.iterdir()
             if (job / ".hydra" / "overrides.yaml").is_file()]
    return sorted(found, key=lambda pair: int(pair[0].name))


def collect(sweeps: list[Path], steps: int, warmup: int) -> list[dict]:
    found = [pair for sweep in sweeps for pair in jobs(sweep)]
    shared = set.intersection(*(set(overrides) for _, overrides in found))
    rows = []
    for job, overrides in found:
        ckpt = job / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            print(f"{job}: no checkpoints/last.ckpt (the job failed); left out", flush=True)
            continue
        images_per_s, trainable = training_speed(str(ckpt), steps, warmup)
        rows.append({
            "job": str(job),
            "label": " ".join(o for o in overrides if o not in shared),
            **final_scores(job),
            "train_images_per_s": images_per_s,
            "trainable_parameters": trainable,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| job | " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [format(row[key], fmt) if key in row else "—" for _, key, fmt in COLUMNS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", help="NAME=DIR[+DIR...]: multirun folders (hydra.sweep.dir) per table")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    groups = dict(table.split("=", 1) for table in args.tables)
    results = {name: collect([Path(d) for d in dirs.split("+")], args.train_steps, args.warmup)
               for name, dirs in groups.items()}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "sweeps": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, rows in results.items():
        print(f"\n{name}\n\n{table(rows)}")


if __name__ == "__main__":
    main()
