"""Run a seeded study: training runs of a few settings, each for a few seeds, then compare.py on all of them.

    python experiments/study.py STUDY.yaml [--seeds 0 1 2] [--variants A B] [--out DIR] [--results DIR] \
        [overrides ...]

STUDY.yaml names what varies and what does not:

    out: outputs/my_study                    # runs and evaluation reports (git-ignored)
    results: experiments/my_topic/my_study   # compare.py's results.json and grids (committed)
    seeds: [0, 1, 2]
    train: [experiment=openmoji_ldm, trainer.max_time=null]   # overrides of every run
    variants:                                # setting name -> its own overrides
      base: []
      flow: [generator.objective=flow]
    compare: [--n-samples, "1000"]           # arguments of experiments/backends/compare.py

Seeds run outside, variants inside, so a study cut short has every variant at its first seeds. Each run is
`python -m text2img.train <train> <variant> seed=S test=false logger=csv ckpt_path=last <overrides>` in
`<out>/runs/<variant>-s<seed>`; compare.py then evaluates them and summarises each setting over seeds (mean,
95% interval, Welch's p of each pair). Resumable: a finished run (its `done` file) is not retrained, one cut off
resumes from its last.ckpt, and compare.py reuses its evaluation reports. Overrides after the file apply to
every run (give such a study its own --out and --results).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "experiments" / "backends" / "compare.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study's YAML file")
    parser.add_argument("--seeds", type=int, nargs="+", help="instead of the study's seeds")
    parser.add_argument("--variants", nargs="+", help="only these of the study's variants")
    parser.add_argument("--out", type=Path, help="instead of the study's out folder")
    parser.add_argument("--results", type=Path, help="instead of the study's results folder")
    parser.add_argument("--no-compare", action="store_true", help="train only")
    args, overrides = parser.parse_known_args()
    study = OmegaConf.to_container(OmegaConf.load(args.study), resolve=True)
    variants: dict[str, list[str]] = study["variants"]
    names = args.variants or list(variants)
    if unknown := [name for name in names if name not in variants]:
        sys.exit(f"study.py: error: no variant {', '.join(unknown)} in {args.study}; it has {', '.join(variants)}")
    out = ROOT / (args.out or study["out"])
    checkpoints = []
    for seed in args.seeds or study["seeds"]:
        for name in names:
            run = out / "runs" / f"{name}-s{seed}"
            if not (run / "done").exists():
                command = [
                    sys.executable, "-m", "text2img.train", *study.get("train", []), *variants[name], f"seed={seed}",
                    "test=false", "logger=csv", "ckpt_path=last", *overrides, f"hydra.run.dir={run}",
                ]
                print(f"study.py: training {name}-s{seed}: {' '.join(command[3:])}", flush=True)
                subprocess.run(command, cwd=ROOT, check=True)
                (run / "done").touch()
            checkpoints.append(f"{name}-s{seed}={run / 'checkpoints' / 'last.ckpt'}")
    if not args.no_compare:
        results = ROOT / (args.results or study["results"])
        subprocess.run(
            [sys.executable, str(COMPARE), *checkpoints, *study.get("compare", []), "--out", str(results),
             "--eval-dir", str(out / "eval")],
            cwd=ROOT, check=True,
        )


if __name__ == "__main__":
    main()
